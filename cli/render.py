"""Rich rendering of library results: tables to stdout, progress to stderr (stdout stays clean for --json)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cli.hints import with_hint
from cli.lines import shown, warning
from fcexport.results import Status

class _Out(Console):
    def on_broken_pipe(self) -> None:
        """`fcx ... | head`: the reader stopped; that is no failure of ours (rich would exit 1, verify's 'failed')."""
        import os

        self.quiet = True
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)


# Piped output (CI logs, files) gets 120 columns instead of rich's 80, so tables are not truncated.
out = _Out(width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True)


def table(title: str, columns: list[str], rows: list[list], console: Console = out, text: tuple[int, ...] = (0,)) -> None:
    """Cells are shown literally (a file named `photos [red]/a.png` stays as it is) and escaped (`shown`);
    pass rich Text objects for styled cells. Columns numbered in `text` (names, files) align left and wrap
    rather than being cut; the others (numbers) align right."""
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i in text else "right", overflow="fold" if i in text else "ellipsis")
    for r in rows:
        t.add_row(*[v if isinstance(v, Text) else Text(shown(fmt(v))) for v in r])
    console.print(t)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def duration(ms: float) -> str:
    """A time in the unit that fits it: 85.3 us, 12.4 ms, 1.10 s."""
    if ms < 1:
        return f"{ms * 1e3:.1f} us"
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1e3:.2f} s"


def key_values(title: str, items: dict, console: Console = out) -> None:
    table(title, ["", "value"], [[k, v] for k, v in items.items()], console, text=(0, 1))  # values may be sentences


@contextlib.contextmanager
def steps(command: str, enabled: bool = True):
    """A one-line progress display on stderr (spinner, the step running now, time so far) for a command's
    `on_step` listener; nothing at all when stderr is not a terminal or `enabled` is False (--json, --quiet)."""
    if not (enabled and err.is_terminal):
        yield None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn(f"[bold]{command}[/] {{task.description}}"), TimeElapsedColumn(),
                  console=err, transient=True) as progress:
        task = progress.add_task("starting", total=None)
        yield lambda text: progress.update(task, description=escape(shown(text)))


class training_progress:
    """Context manager yielding an on_epoch callback that drives a rich progress bar on stderr.

    The bar starts at the first finished epoch, so errors while loading data print cleanly.
    """

    def __init__(self, epochs: int, folds: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.total = epochs * max(folds, 1)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=err,
        )
        self.task = None

    def __enter__(self):
        def on_epoch(record: dict) -> None:
            if self.task is None:
                self.progress.start()
                self.task = self.progress.add_task("train", total=self.total, status="")
            fold = f"fold {record['fold']} " if "fold" in record else ""
            val = record["val_accuracy"]
            status = (
                f"{fold}epoch {record['epoch']} loss {record['train_loss']:.4f} "
                + (f"val acc {val:.2%} " if val is not None else "")
                + f"{record['samples_per_second']:,.0f} samples/s"
            )
            self.progress.update(self.task, advance=1, status=status)

        return on_epoch

    def __exit__(self, *exc):
        if self.task is not None:
            self.progress.stop()
        return False


def train_summary(result: dict) -> None:
    m = result["metrics"]
    items = {
        "dataset": result["dataset"],
        f"test accuracy on the {m['test_images']:,} test images": f"{m['test_accuracy']:.2%}",
        "best validation accuracy": f"{m['val_accuracy']:.2%}" if m["val_accuracy"] is not None else None,
        "best epoch": f"{m['best_epoch']} of {m['epochs_run']}",
        "training time": f"{m['train_seconds']:.1f} s on {m['device']}",
        "throughput": f"{m['samples_per_second']:,.0f} samples/s",
        "parameters": f"{m['parameters']:,}",
    }
    cv = m.get("cross_validation")
    if cv:
        items["cross-validation"] = (
            f"{cv['mean_val_accuracy']:.2%} ± {cv['std_val_accuracy']:.2%} over {cv['folds']} folds (kept fold {cv['kept_fold']})"
        )
    if m["interrupted"]:
        items["note"] = "interrupted: kept the best epoch so far"
    items["artifacts"] = result["artifacts"]
    key_values("fcx train", items)


# report key -> short header; the first is always shown, the others with --wide (all are in --json)
ERROR_COLUMNS = {"max_abs": "max abs", "noise_ratio": "x own", "mean_abs": "mean abs", "p99_abs": "p99 abs", "max_rel": "max rel"}


def status_text(status: Status) -> Text:
    if status is Status.SKIPPED:
        return Text("skipped", style="yellow")
    return Text("pass", style="green") if status is Status.PASS else Text("FAIL", style="bold red")


def _error_cell(row, column: str) -> str:
    value = row.value(column)
    return "-" if value is None else f"{value:.1f}" if column == "noise_ratio" else f"{value:.1e}"


def comparison_table(title: str, report, wide: bool = False, artifacts=None) -> None:
    """One row per backend x device (a ParityReport); problems, then skips (one line per reason), below."""
    # --wide on a narrow terminal: the extra errors go in a second table below, so no number is ever cut
    stacked = wide and out.width < 104
    columns = list(ERROR_COLUMNS) if wide and not stacked else ["max_abs", "noise_ratio"]
    more = [c for c in ERROR_COLUMNS if c not in columns] if stacked else []
    rows, extra, remarks, skipped = [], [], [], {}
    for r in report.rows:
        if r.status is Status.SKIPPED:
            # one line per reason: "no CUDA here" once for every backend it stops
            reason = with_hint(r.reason, r.hint, artifacts)
            skipped.setdefault((r.device, reason), []).append(r.backend)
            continue
        for problem in r.problems:
            remarks.append(f"[bold red]FAIL[/] {escape(r.backend)} on {r.device}: {escape(shown(problem))}")
        if where := r.value("first_divergent_layer"):  # the first layer the user wrote whose output leaves its band
            remarks.append(f"[bold red]FAIL[/] {escape(r.backend)} on {r.device}: first out of its noise band at layer "
                           f"{escape(shown(where['layer']))} ({escape(shown(where['layer_type']))}): max abs "
                           f"{where['max_abs']:.1e} > {where['band']:.1e}")
        for name, numbers in (r.value("other_outputs") or {}).items():  # an output besides the logits that failed
            if not numbers.get("passed", True):
                why = numbers.get("missing") or numbers.get("shape_mismatch") or (
                    f"max abs {numbers['max_abs']:.1e} > {numbers['allowed_max_abs']:.1e}" if "allowed_max_abs" in numbers
                    else f"top-1 agreement {numbers.get('decisive_agreement') or 0:.2%} on decisive pixels")
                remarks.append(f"[bold red]FAIL[/] {escape(r.backend)} on {r.device}: its output '{escape(name)}' is off: {escape(shown(why))}")
        if by_layer := [row for row in r.value("error_by_layer") or () if row["share"] > 0][:3]:  # what to leave unquantised
            shares = ", ".join(f"{escape(shown(row['layer']))} {row['share']:.0%}" for row in by_layer)
            remarks.append(f"[bright_black]{escape(r.backend)} on {r.device}: its error drops most with one layer left "
                           f"float32: {shares}[/]")
        errors = [_error_cell(r, c) for c in columns]
        accuracy = f"{r.value('accuracy'):.2%}" if r.value("accuracy") is not None else "-"
        rows.append([r.backend, r.device, status_text(r.status), *errors, f"{r.value('top1_agreement') or 0:.2%}", accuracy])
        extra.append([r.backend, r.device, *[_error_cell(r, c) for c in more]])
    table(title, ["backend", "device", "status", *[ERROR_COLUMNS[c] for c in columns], "top-1", "accuracy"], rows)
    precision_note(report.rows)
    if more and extra:
        table("the other errors (--wide)", ["backend", "device", *[ERROR_COLUMNS[c] for c in more]], extra)
    for line in remarks:
        out.print(line, highlight=False)
    ran_on = {r.device for r in report.rows if r.status is not Status.SKIPPED}
    parts = []
    for device in dict.fromkeys(d for d, _ in skipped):
        reasons = [(reason, backends) for (d, reason), backends in skipped.items() if d == device]
        if device not in ran_on and len(reasons) > 1:  # nothing ran there: the first reason says why, once
            reasons = [(reasons[0][0], ["everything"])]
        parts += [f"{', '.join(backends)} on {device} ({reason})" for reason, backends in reasons]
    if parts:  # one grey line: skips are information, not warnings
        out.print(Text(shown("skipped: " + "; ".join(parts)), style="bright_black"))
    ref = report.reference_accuracy
    others: dict[str, list[float]] = {}  # each output besides the logits: its ratios to its own error, exact rows
    for r in report.rows:
        for name, numbers in (r.value("other_outputs") or {}).items():
            exact = numbers.get("criterion") == "noise" and numbers.get("noise_ratio") is not None
            others.setdefault(name, []).extend([numbers["noise_ratio"]] if exact else [])
    if others:  # the outputs besides the logits (torchvision's "aux"): judged on every row by the same rule
        out.print(Text(shown("other outputs, judged on every row by the same rule: " + ", ".join(
            name + (f" (largest {max(ratios):.1f} x own)" if ratios else "") for name, ratios in others.items()))))
    unjudged = next((r.value("other_outputs_not_compared") for r in report.rows if r.value("other_outputs_not_compared")), None)
    if unjudged:
        warning(unjudged)
    out.print(Text(f"inputs: {shown(report.inputs)}"))
    if report.weak:
        warning(report.weak)
    out.print(f"pass: {report.criterion}; model.pt's own float32 error {report.own_float32_error:.1e}"
              + (f"; model.pt's accuracy on those test images (float64) {ref:.2%}" if ref is not None else ""), highlight=False)
    own_rules = {r.backend: (r.value("noise_factor"), r.value("noise_floor_steps")) for r in report.rows
                 if r.value("noise_factor") not in (None, report.tolerance.factor)}
    if own_rules:  # a runtime with float32 kernels of its own carries its own calibrated factor (and floor)
        out.print("runtimes with float32 kernels of their own: " + ", ".join(
            f"{b} <= {f:g} x (at least {steps:g} steps)" for b, (f, steps) in own_rules.items()), highlight=False)
    if any(r.value("criterion") == "agreement" for r in report.rows):
        from fcexport.compare import DECISIVE_MARGIN

        out.print(f"approximate backends (int8, bf16) pass on top-1 agreement >= {report.tolerance.min_agreement:.1%} "
                  f"on decisive inputs (top-1 ahead by > {DECISIVE_MARGIN:.0%} of the largest logit) and "
                  f"accuracy drop <= {report.tolerance.max_accuracy_drop * 100:g} pt; their float errors are shown, not judged", highlight=False)


def precision_note(rows) -> None:
    """One grey line naming what the CUDA rows computed in (TF32 off for exact rows), when any ran on CUDA."""
    on_cuda = {}
    for r in rows:
        precision = r.value("precision") if hasattr(r, "value") else getattr(r, "precision", None)
        if r.device == "cuda" and r.status is not Status.SKIPPED and precision:
            on_cuda.setdefault(precision, []).append(r.backend)
    if on_cuda:
        parts = [f"{', '.join(dict.fromkeys(backends))} in {precision}" for precision, backends in on_cuda.items()]
        out.print(Text(shown("on cuda: " + "; ".join(parts)), style="bright_black"))


def import_summary(path) -> None:
    where = "" if str(path) == "artifacts/model.pt" else f" (with --artifacts {path.parent})"
    out.print(Text(f"wrote {shown(path)} (fcx inspect {shown(path)}: the classes, normalisation, input size and preparation "
                   f"it recorded)\nnext: fcx fuse-bn --verify, fcx export, fcx verify, fcx predict IMAGE{where}"))


FOLDS_LISTED = 8  # more folds than this are summarised by kind unless --wide


def fuse_summary(result, wide: bool = False) -> None:
    """A FuseResult: the folds, parameters and latency, and the verification when it ran."""
    rep = result.report
    if len(rep.folded) > FOLDS_LISTED and not wide:  # a resnet's 20 folds in a few lines; --wide lists each
        groups: dict = {}
        for f in rep.folded:
            groups.setdefault((f.layer_type, f.direction), []).append(f)
        rows = [[f"{len(fs)} x {kind}", f"{fs[0].into}, ...", f"{how} (--wide: each)"] for (kind, how), fs in groups.items()]
    else:
        rows = [[f"{f.layer} ({f.layer_type})", f.into, f.direction] for f in rep.folded]
    rows += [[f"{x.layer} ({x.layer_type})", "-", f"left in place: {x.reason}"] for x in rep.left]
    table("folds", ["layer", "into", "how"], rows, text=(0, 1, 2))
    key_values("fcx fuse-bn", {
        "parameters": f"{rep.parameters_before:,} -> {rep.parameters_after:,}",
        f"batch-1 latency, interpreter ({result.device}, p50)": (
            f"{duration(result.latency_before_ms)} -> {duration(result.latency_after_ms)}"
            if result.latency_before_ms is not None and result.latency_after_ms is not None
            else "left out: too slow to time fairly in a second (fcx bench times the exported files)"),
        "written": result.output if result.written else "nothing (verification failed)",
    })
    for note in rep.notes:
        out.print(Text(f"note: {shown(note)}"))
    if result.verification is not None:
        comparison_table("fused vs original", result.verification, wide)


def export_summary(result) -> None:
    """An ExportResult: each file and what happened to it, then the manifest's digest."""
    rows = [[path, "written"] for path in result.written] + [[result.manifest, "sha256 + sizes"]]
    if result.signature:
        rows.append([result.signature, "signature (OpenSSF)"])
    rows += [[path, "removed"] for path in result.removed]
    rows += [[name, f"not written: {why}"] for name, why in result.skipped.items()]
    table("fcx export" + (" (fused)" if result.fused else " (unfused)"), ["file", ""], rows)
    if result.removed:  # the why once, below, so paths keep their line at 80 columns
        out.print(Text("removed: files built on what this export wrote again, or not asked for this time (ask for them "
                       "to keep them: --int8, --triton ...); an old signature vouches for the previous set only",
                       style="bright_black"))
    if result.check is not None and result.check.rows:
        parts = [f"{r.backend} {r.status.value}" + (f" (max abs {fmt(r.value('max_abs'))})" if r.value("max_abs") is not None
                                                     else f" ({shown(r.reason)})" if r.reason else "")
                 + "".join(f", its output '{name}' off" for name, numbers in (r.value("other_outputs") or {}).items()
                           if not numbers.get("passed", True))
                 for r in result.check.rows]
        style = "green" if result.passed else "red"
        out.print(Text(f"checked on {result.check.inputs} against model.pt: {', '.join(parts)}", style=style))
    manifest_digest(result.manifest_sha256)


def manifest_digest(sha256: str) -> None:
    """The digest to keep elsewhere; `fcx verify --expect-digest` checks a folder against it."""
    out.print(Text(f"manifest sha256 {sha256}"), soft_wrap=True)  # one line of 80 characters, to copy whole
    out.print(Text("keep it elsewhere: fcx verify --expect-digest SHA checks a copy", style="dim"))


def sign_summary(result: dict) -> None:
    out.print(Text(f"signed {shown(result['folder'])}: {shown(result['signature'])}"))
    manifest_digest(result["manifest_sha256"])


def trust_table(checks) -> None:
    """Signature and digest checks (TrustCheck), which come before anything in the folder is loaded."""
    if checks:
        rows = [[c.check, status_text(c.status), c.detail] for c in checks]
        table("fcx verify: the folder as a whole", ["check", "status", "detail"], rows, text=(0, 1, 2))


def verify_report(result, wide: bool = False, artifacts=None) -> None:
    """A VerifyReport: the trust checks, then the comparison table."""
    trust_table(result.trust)
    if result.rows:
        served = all(row.source and "://" in row.source for row in result.rows)
        title = "fcx verify: the served model vs model.pt (KServe v2)" if served else "fcx verify: each artifact vs model.pt on cpu"
        comparison_table(title, result.parity, wide, artifacts)
    out.print("[green]PASSED[/]" if result.passed else "[red]FAILED[/]")


def _outputs(details: Mapping, limit: int = 6) -> str:
    """A model's recorded outputs, name and shape, the predicted one marked; at most `limit` of them, then how many more."""
    outputs = details["outputs"]
    def short(value) -> str:
        text = str(list(value) if isinstance(value, tuple) else value)
        return shown(text if len(text) <= 40 else text[:39] + "...")

    listed = [f"{short(name)} {short(shape)}"
              + (" (predicted)" if name == details.get("output") else "") for name, shape in list(outputs.items())[:limit]]
    return ", ".join(listed) + (f", ... ({len(outputs)} in all)" if len(outputs) > limit else "")


def inspection(result) -> None:
    """An Inspection: one block per file, then the manifest digest and the signature."""
    for report in result.files:
        items = {"format": report.artifact or "-", "size": f"{report.size:,} bytes", "manifest": report.manifest}
        spec = report.spec
        if spec is not None:
            names = ", ".join(spec.class_names[:6]) + (f", ... ({len(spec.class_names)} in all)" if len(spec.class_names) > 6 else "")
            norm = spec.normalization
            made = spec.provenance
            items |= {
                "input": f"float32 (N, {', '.join(map(str, spec.input_shape))}) in [0, 1]",
                "classes": names,
                **({"output": f"per-pixel {'probabilities' if spec.probabilities else 'logits'} "
                              f"(N, {', '.join(map(str, spec.output_shape))}): segmentation"} if spec.dense else
                   {"output": f"probabilities (N, {spec.output_shape[0]}), made by the model's last op: predict shows "
                              "them as they are"} if spec.probabilities else {}),
                **({"model's outputs": _outputs(spec.architecture.details)}
                   if isinstance(spec.architecture.details.get("outputs"), Mapping) else {}),
                **({"exported beside the logits": ", ".join(f"{name} {list(shape)}" for name, shape in spec.other_outputs)
                    + " (every file returns them; verify judges them)"} if spec.other_outputs else {}),
                "normalisation": f"mean {', '.join(f'{v:.4g}' for v in norm.mean)}, std {', '.join(f'{v:.4g}' for v in norm.std)} (inside the model)" if norm else "none",
                "preparation": spec.preprocess.describe(),
                "architecture": spec.architecture.kind,
                "fused": f"yes, {len(made.folds)} folds" + (f", {len(made.left)} left" if made.left else "") if made.fused else "no",
            }
            if made.source:
                from fcexport import registry

                exporter = registry.exporters().get(report.artifact)
                opset = f", opset {made.opset}" if made.opset and exporter is not None and exporter.format == "onnx" else ""
                items["made from"] = f"{made.source} (sha256 {str(made.source_sha256)[:12]}){opset}"
            if made.versions:
                items["versions"] = ", ".join(f"{k} {v}" for k, v in made.versions.items())
        for key, value in report.details.items():
            items[key] = ", ".join(f"{k} {list(v) if isinstance(v, tuple) else v}" for k, v in value.items()) if isinstance(value, Mapping) else f"{value:,}" if isinstance(value, int) else str(value)
        if report.problem:
            items["problem"] = report.problem
        table(report.file, ["", "value"], [[k, v] for k, v in items.items()], text=(0, 1))
    if result.manifest_sha256:
        manifest_digest(result.manifest_sha256)
    if result.signature:
        out.print(Text(f"signed: {shown(result.signature)} (check it with fcx verify --public-key KEY)"))


def bench_table(rows, artifacts=None, warmup: int = 0) -> None:
    """BenchRows: measured ones in the table, skipped ones below with the reason, then (grey) the rows whose
    warm-up the time budget cut short of `warmup` calls."""
    body, skipped = [], []
    cold = [f"{r.backend} b{r.batch_size} {r.warmup_calls}/{warmup}" for r in rows
            if r.status is Status.OK and r.warmup_calls is not None and r.warmup_calls < warmup]
    for r in rows:
        if r.status is Status.SKIPPED:
            skipped.append(shown(f"skipped {r.backend} on {r.device}: {with_hint(r.reason, r.hint, artifacts)}"))
        else:
            body.append([r.backend, r.device, r.batch_size, duration(r.p50_ms), duration(r.p90_ms), f"{r.throughput:,.0f}"])
    table("fcx bench", ["backend", "device", "batch", "p50", "p90", "samples/s"], body)
    precision_note(rows)
    for line in skipped:
        out.print(Text(line, style="yellow"))
    if cold:
        out.print(Text(f"warm-up calls made of --warmup, where --seconds cut them short: {', '.join(cold)}; a longer "
                       "--seconds gives steadier figures", style="bright_black"))


def note(message: str) -> None:
    err.print(Text(shown(message)))


def serving(running) -> None:
    """fcx serve's first lines: what serves (said plainly: a stand-in), where, what was left out; stdout, flushed."""
    from fcexport.serve import STANDIN_NOTE

    out.print(Text(f"tritonserver {running.version} from nvidia-pytriton on 127.0.0.1: {STANDIN_NOTE}"))
    out.print(Text(f"ready: {running.http_url}  {running.grpc_url}  models: {', '.join(shown(m) for m in running.models)}"),
              soft_wrap=True)
    for name, why in running.left.items():
        out.print(Text(f"not served: {shown(name)} ({shown(why)})", style="bright_black"))
    first = running.models[0]
    out.print(Text(f"try: fcx verify --url {running.http_url} --model {shown(first)}   (Ctrl-C stops the server)"))
    sys.stdout.flush()
