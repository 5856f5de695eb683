"""Orchestration: the one module that calls several stages. Each public function is one `fcx` command.

Every way in (train, import) writes the same model.pt; every later step reads it with
`checkpoint.load_model` and never needs to know how the model came in.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from fcexport import artifacts as names
from fcexport import machine_cache, parity, registry, verification
from fcexport.compare import Tolerance
from fcexport.errors import FcxError, check_choices
from fcexport.results import BenchRow, ExportResult, FileReport, FuseResult, Inspection, Status, VerifyReport
from fcexport.spec import random_pixels, thawed
from fcexport.targets import DEVICES, Checks, DeviceUnavailable, ExportSettings, Predictor, TritonSettings, Unsupported
from fcexport.targets.program import program_predictor

DEFAULT_TOLERANCE = Tolerance()
log = logging.getLogger("fcexport")
MAX_BENCH_BATCH = 65536

# ---- ways in -----------------------------------------------------------------------------


def train(opts, on_epoch=None) -> dict:
    """`fcx train`: load data, train (split or k-fold), evaluate on test, write model.pt, metrics and plots. Seeded by
    `opts.seed`; the caller's random number generators are left as they were (a notebook's own runs stay put)."""
    import torch

    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        return _train(opts, on_epoch)


def _train(opts, on_epoch=None) -> dict:
    from fcexport import plots
    from fcexport.program import capture
    from fcexport.data import dataset_source, load_dataset
    from fcexport.files import check_writable_folder, write_json_atomic, write_text_atomic
    from fcexport.models import count_parameters
    from fcexport.preprocess import object_fill
    from fcexport.spec import Architecture, ModelSpec, Normalization, Preprocess
    from fcexport.training import evaluate, history_csv, resolve_device

    opts = opts.with_arch_defaults()
    opts.validate()
    resolve_device(opts.device)
    out = Path(opts.artifacts)
    log = []

    def log_epoch(record: dict) -> None:
        """history.csv grows after every epoch, so progress can be followed (tail -f) and survives a kill."""
        log.append(record)
        write_text_atomic(out / "history.csv", history_csv(log))
        if on_epoch:
            on_epoch(record)

    dataset = load_dataset(opts.data, opts.data_root, test_data=opts.test_data, class_names=opts.class_names,
                           label_column=opts.label_column)
    check_writable_folder(out)  # after the data is found (a failed start leaves no folder), before minutes of training
    if opts.flip is None:
        opts.flip = dataset.name == "fashion-mnist"
    names.set_aside_history(out)  # this run writes history.csv as it goes; the model still here keeps its own
    started = time.perf_counter()
    try:
        result, config, cv_summary = _fit(dataset, opts, log_epoch)
    except BaseException:  # an error (a Ctrl-C ends training normally): the folder's model keeps its history
        names.restore_history(out)
        raise
    seconds = time.perf_counter() - started
    device = next(result.model.parameters()).device
    test_loss, test_acc, test_pred = evaluate(result.model, dataset.test, device)
    metrics = {
        "test_accuracy": test_acc,
        "test_images": len(dataset.test),
        "test_loss": test_loss,
        "val_accuracy": result.best_val_accuracy,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "interrupted": result.interrupted,
        "train_seconds": seconds,
        "samples_per_second": result.samples_per_second,
        "parameters": count_parameters(result.model),
        "device": str(device),
        "cross_validation": cv_summary,
    }
    normalize = config["normalize"]
    spec = ModelSpec(
        input_shape=list(config["input_shape"]),
        class_names=list(dataset.class_names),
        preprocess=Preprocess("object", object_fill(dataset.train.images[:2000, 0].numpy())),
        normalization=Normalization((normalize["mean"],), (normalize["std"],)) if normalize else None,
        architecture=Architecture(config["arch"], config),
        dataset={
            "name": dataset.name,
            "source": dataset_source(opts.data),
            "test_source": dataset_source(opts.test_data) if opts.test_data else None,
            "root": str(Path(opts.data_root).resolve()) if opts.data_root else None,
            "train": len(dataset.train),
            "test": len(dataset.test),
        },
        metrics=metrics,
        training=asdict(opts),
    )
    _save_model(capture(result.model.cpu().eval(), spec.input_shape), spec, out)
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "history.csv", history_csv(result.history))
    title = f"{config['arch']} on {dataset.name}: test accuracy {test_acc:.2%}"
    plots.save_curves(result.history, out / "curves.png", result.best_epoch, title)
    plots.save_confusion(dataset.test.labels, test_pred, dataset.class_names, out / "confusion.png")
    return {"metrics": metrics, "history": result.history, "artifacts": str(out), "dataset": dataset.name}


def import_weights(
    weights: str | Path,
    model_def: str,
    input_shape,
    model_args: dict | None = None,
    key: str | None = None,
    class_names: list[str] | None = None,
    mean=None,
    std=None,
    artifacts: str | Path = "artifacts",
    on_step=None,
    output: str | None = None,
) -> Path:
    """`fcx import`: a state dict plus the model's code -> ARTIFACTS/model.pt (no code needed afterwards). The
    code runs in a child process: whatever it does, it cannot end this one. Of several outputs, `output` names
    the one kept (import_model)."""
    from fcexport.sources import from_state_dict_isolated

    _step(on_step, "starting a process for the model's code")
    program, spec = from_state_dict_isolated(weights, model_def, input_shape, model_args, key, class_names, mean, std,
                                             on_step, output)
    _step(on_step, f"writing {names.MODEL}")
    _save_model(program, spec, Path(artifacts))
    return Path(artifacts) / names.MODEL


def import_model(
    module,
    input_shape,
    class_names: list[str] | None = None,
    mean=None,
    std=None,
    artifacts: str | Path = "artifacts",
    output: str | None = None,
) -> Path:
    """A live nn.Module (a notebook's model) -> ARTIFACTS/model.pt, ready for fuse, export, verify, predict, bench.

    `input_shape` is (C, H, W); `mean`/`std` (one value or one per channel) is the normalisation the
    model expects on [0, 1] pixels: it becomes part of the stored model, so artifacts take [0, 1] pixels. It
    returns logits (N, classes) or per-pixel logits (N, classes, H, W); of several outputs (torchvision's
    {"out", "aux"}), `output` names the one kept ("out", "logits", else the first by default).
    """
    from fcexport.sources import from_module

    program, spec = from_module(module, input_shape, class_names, mean, std, output=output)
    _save_model(program, spec, Path(artifacts))
    return Path(artifacts) / names.MODEL


def import_pretrained(source, artifacts: str | Path = "artifacts", input_shape=None, class_names: list[str] | None = None,
                      mean=None, std=None, on_step=None) -> Path:
    """`fcx import DIR`: a model as libraries ship it -> ARTIFACTS/model.pt: a Hugging Face folder (save_pretrained:
    config.json, safetensors or pytorch_model.bin, preprocessor_config.json), or a live transformers or timm model;
    class names, mean / std and input size from the model's own files and config unless given."""
    from fcexport.sources import HF_PREPROCESSOR, from_pretrained

    program, spec = from_pretrained(source, input_shape, class_names, mean, std, on_step)
    if isinstance(source, (str, Path)) and mean is None and std is None and not (Path(source) / HF_PREPROCESSOR).is_file():
        log.warning(f"{source} has no {HF_PREPROCESSOR}, so nothing says how the model's pixels were normalised: it "
                    "gets [0, 1] pixels as they are. Give --mean and --std if it was trained on normalised ones.")
    _step(on_step, f"writing {names.MODEL}")
    _save_model(program, spec, Path(artifacts))
    return Path(artifacts) / names.MODEL


def _fit(dataset, opts, log_epoch):
    """(TrainResult, model config, cross-validation summary or None) for `fcx train`'s options."""
    from fcexport.data import train_val_split
    from fcexport.models import build_for
    from fcexport.training import cross_validate, fit

    if opts.folds:
        return cross_validate(dataset, opts, lambda: build_for(dataset, opts), log_epoch)
    train_split, val = train_val_split(dataset.train, opts.val_split, opts.seed)
    model, config = build_for(dataset, opts)
    return fit(model, train_split, val, opts, log_epoch), config, None


def _save_model(program, spec, folder: Path) -> None:
    """Write FOLDER/model.pt; a model.pt already there is retired first (see _retire)."""
    from fcexport.checkpoint import save_program

    _retire(folder)
    save_program(program, spec, folder / names.MODEL)


def _retire(folder: Path) -> None:
    """Move the folder's model.pt with everything made from it aside (artifacts.retire_generation); a warning on
    the "fcexport" logger says where it went."""
    superseded = names.retire_generation(folder)
    if superseded is not None:
        log.warning(f"{folder / names.MODEL} replaced: the previous model, its exports and results moved to {superseded}")


# ---- fuse --------------------------------------------------------------------------------


def fused_model(stored, source: Path | None = None):
    """(fused Program, FuseReport, spec of the fused program) for a checked model.pt (StoredModel)."""
    from fcexport.folding import fuse_program

    fused, report = fuse_program(stored.program, stored.spec.input_shape)
    described = report.as_dict()
    origin = {"source": source.name, "source_sha256": stored.sha256} if source is not None else {}
    provenance = replace(stored.spec.provenance, fused=True, folds=described["folded"], left=described["left"], **origin)
    return fused, report, replace(stored.spec, provenance=provenance)


class _Model:
    """One command's model.pt: read and hashed once, folded at most once. With `reuse_fused`, a model.fused.pt that
    the manifest says was made from these bytes is read instead of folding again; verify never reuses it, since
    model.fused.pt is one of the files it judges against a fresh fold."""

    def __init__(self, path: Path, reuse_fused: bool = True):
        self.path = Path(path)
        self.stored = _read_model(self.path)
        self.reuse_fused = reuse_fused
        self._fused = None

    @property
    def fused(self):
        """(program, spec, folds) of the fused model."""
        if self._fused is None:
            self._fused = (self.reuse_fused and self._proved_fused()) or self._fold()
        return self._fused

    def _fold(self):
        program, report, spec = fused_model(self.stored, self.path)
        return program, spec, report.as_dict()["folded"]

    def _proved_fused(self):
        """model.fused.pt beside model.pt, when the manifest lists it as made from this model.pt and it matches."""
        from fcexport.checkpoint import read_file, read_model

        path = self.path.parent / names.FUSED
        manifest = names.read_manifest(self.path.parent) if path.is_file() else None
        if manifest is None or (manifest["files"].get(names.FUSED) or {}).get("source_sha256") != self.stored.sha256:
            return None
        data = read_file(path)  # read once: the bytes checked are the bytes loaded
        if names.check_against_manifest(path, manifest, self.stored.sha256, data):
            return None
        fused = read_model(path, data)
        return fused.program, fused.spec, thawed(fused.spec.provenance.folds)

    def program_for(self, spec):
        """The checked program an artifact with this spec was exported from (fused or not), for runtimes that
        rebuild it (pt2) rather than unpickle it."""
        wanted = spec.provenance.source_sha256
        if wanted != self.stored.sha256:
            raise FcxError(f"{self.path} is not the model.pt it was exported from (it names sha256 {str(wanted)[:12]})", hint="export")
        if differences := parity.spec_differences(self.stored.spec, spec):  # labels and input answer for model.pt too
            raise FcxError(f"it says otherwise than {self.path} about the model: {'; '.join(differences)}", hint="export")
        return self.fused[0] if spec.provenance.fused else self.stored.program


FUSE_TIMED_CALLS = 20  # fewer timed calls in bench's second: fuse-bn leaves its latency line out


def fuse(
    model_path: Path,
    out_path: Path,
    verify: bool = False,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    device: str = "cpu",
    data: str | None = None,
    data_root: str | None = None,
    on_step=None,
    inputs: int | None = None,
) -> FuseResult:
    """`fcx fuse-bn`: write the fused model, time both at batch 1, optionally verify parity first (on `inputs`
    inputs, when given: see _parity)."""
    from fcexport.timing import measure

    model_path, out_path = Path(model_path), Path(out_path)
    inputs = parity.checked_budget(inputs)
    if out_path.resolve() == model_path.resolve():
        raise FcxError(f"{out_path}: the fused model would overwrite its own source; write it elsewhere")
    exported = registry.suffixes().get(model_path.suffix.lower())
    if exported not in (None, "model", "fused"):
        raise FcxError(f"{model_path}: an exported model ({exported}); fcx fuse-bn folds the stored model: pass the "
                       f"{names.MODEL} it was exported from (BatchNorm is already folded in exports)")
    _step(on_step, f"reading {model_path.name}")
    stored = _read_model(model_path)
    from fcexport.checkpoint import save_program  # (torch: after the model.pt check)

    _step(on_step, "folding BatchNorm and normalisation (float64)")
    fused, report, fused_spec = fused_model(stored, model_path)
    _step(on_step, "timing both at batch 1 (fcexport's interpreter)")
    before = program_predictor(stored.program, "eager", device, model_path, stored.spec)
    after = program_predictor(fused, "fused", device, out_path, fused_spec)
    one = np.random.default_rng(0).random((1, *stored.spec.input_shape), dtype=np.float32)
    timed = [measure(p, one) for p in (before, after)]  # bench's own defaults: 20 warm-up calls, up to 200 in 1 s
    # fewer calls than that is not a latency anyone should compare: left out (None), said so
    latency = tuple(t["p50_ms"] if t["calls"] >= FUSE_TIMED_CALLS else None for t in timed)
    proof = None
    if verify:
        proof = verification.numbers(stored, model_path, [after], [[]], data, data_root, tolerance, on_step, inputs)
    result = FuseResult(str(model_path), str(out_path), report, *latency, device, proof,
                        written=proof is None or proof.passed)
    if not result.written:
        return result  # a failed fold is reported, never written
    save_program(fused, fused_spec, out_path)
    if out_path.parent.resolve() == model_path.parent.resolve() and out_path.name == names.FUSED:
        from fcexport.checkpoint import now_iso

        names.record_in_manifest(out_path.parent, {names.FUSED: stored.sha256}, names.versions(), now_iso(), stored.sha256)
    return result


def _read_model(path: Path):
    """checkpoint.read_model, after the one check that needs no torch: a missing file is said at once (importing
    torch takes seconds)."""
    if not Path(path).is_file():
        raise FcxError(f"{path}: file not found", hint="train-or-import")
    from fcexport.checkpoint import read_model

    return read_model(path)


def _step(on_step, text: str) -> None:
    """Tell a command's `on_step` listener (the CLI's progress line) what is about to run."""
    if on_step is not None:
        on_step(text)


# ---- export ------------------------------------------------------------------------------


def export_formats(formats) -> tuple[str, ...]:
    """The exporters to run, in registry order, with those they build on (int8 needs onnx)."""
    known = registry.exporters()
    formats = tuple(formats)
    unknown = sorted(set(formats) - set(known))
    if unknown or not formats:
        raise FcxError(f"formats are {', '.join(known)}, got {', '.join(unknown) or 'nothing'}")
    wanted = set(formats)
    for name in formats:
        while known[name].builds_on:
            name = known[name].builds_on
            wanted.add(name)
    return tuple(name for name in known if name in wanted)


def export_files(program, spec, formats, settings: ExportSettings, stage: Path, on_step=None, source=None) -> dict[str, str]:
    """Run each exporter into `stage` (on `program`, or on model.pt's own `source` program where the exporter asks
    for it); returns the formats that could not be made (name -> why), and those that build on them are skipped too."""
    skipped = {}
    for name in formats:
        exporter = registry.exporters()[name]
        _step(on_step, f"exporting {name}")
        if exporter.builds_on in skipped:
            skipped[name] = f"it is made from {exporter.builds_on}, which failed"
            continue
        for file in exporter.files:  # file sets may have sub-folders
            (stage / file).parent.mkdir(parents=True, exist_ok=True)
        try:
            exporter.write(source if exporter.from_source and source is not None else program, spec, stage, settings)
        except FcxError as exc:
            skipped[name] = str(exc)
    return skipped


@machine_cache.one_command()  # with FCX_FRESH=1: an ONNX file checked as it is written is not checked again when loaded
def export(model_path: Path, artifacts: Path, formats=None, opset: int | None = None, fuse: bool = True,
           sign_key: Path | None = None, triton: TritonSettings | None = None, check: bool = True,
           on_step=None, calibration: str | None = None) -> ExportResult:
    """`fcx export`: model.pt -> (fused) program -> each format's files (default: torchscript, onnx, pt2) ->
    manifest.json [-> model.sig, signed with `sign_key`]; the result carries the manifest's sha256 for out-of-band
    checks. A model.fused.pt proved from this model.pt (fcx fuse-bn) is used instead of folding again. With
    `check`, each written file is then loaded as predict would and compared with model.pt on a few inputs.
    `calibration`: the folder of images int8-static calibrates on (else the model's own training images)."""
    import fcexport
    from fcexport.files import publish, staging_folder

    formats = export_formats(registry.default_exporters() if formats is None else formats)
    model_path, artifacts = Path(model_path), Path(artifacts)
    if sign_key is not None and (problem := names.key_problem(Path(sign_key), private=True)):
        raise FcxError(problem)  # before minutes of exporting
    if calibration is not None and not Path(calibration).is_dir():
        raise FcxError(f"{calibration}: calibration folder not found; name a folder of the model's kind of images")
    model = _Model(model_path)  # read once: the hash below is of the bytes exported
    from fcexport.checkpoint import now_iso  # (torch: after the model.pt check, so a missing file is said at once)

    stored = model.stored
    program, spec, folds = stored.program, stored.spec, []
    if fuse:
        _step(on_step, "folding BatchNorm and normalisation")
        program, spec, folds = model.fused
    settings = ExportSettings(opset or ExportSettings.opset, triton or TritonSettings(), calibration)
    made = spec.provenance
    spec = replace(spec, provenance=replace(made, exported=now_iso(), source=model_path.name, source_sha256=stored.sha256,
                                            fused=fuse or made.fused, opset=settings.opset,
                                            versions={**made.versions, **names.versions(), "fcexport": fcexport.__version__}))
    with staging_folder(artifacts) as stage:  # the previous set stays whole until everything is written
        skipped = export_files(program, spec, formats, settings, stage, on_step, source=stored.program)
        if len(skipped) == len(formats):
            raise FcxError(next(iter(skipped.values())) if len(formats) == 1 else
                           "no format could be exported: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
        _record_fingerprints(program, spec, settings, stage, [name for name in formats if name not in skipped])
        written = publish(stage, artifacts)
    # Files this export did not write but that would now answer for another model.pt: formats that failed, and
    # those built on a format written again (an old model.int8.onnx next to a new model.onnx).
    rewritten = set(formats) - set(skipped)
    stale = [name for name, e in registry.exporters().items()
             if name in skipped or (name not in rewritten and e.builds_on in rewritten)]
    written_names = {names.manifest_name(artifacts, p) for p in written}
    removed = []
    for name, exporter in registry.exporters().items():
        # a stale file set goes whole; a folder written again keeps only what this export wrote into it
        old = names.artifact_files(artifacts, exporter.files) if name in stale or name in rewritten else []
        for path in (artifacts / f for f in old if name in stale or f not in written_names):
            path.unlink()
            removed.append(str(path))
        names.prune_empty_folders(artifacts, exporter.files)
    here = model_path.resolve() == (artifacts / names.MODEL).resolve()
    recorded = {"triton": asdict(settings.triton)} if "triton" in rewritten else None  # what verify rebuilds its configs from
    manifest = names.record_in_manifest(artifacts, {names.manifest_name(artifacts, p): stored.sha256 for p in written}, names.versions(), now_iso(),
                                        stored.sha256 if here else None, recorded)
    signature = artifacts / names.SIGNATURE
    if sign_key is not None:
        names.sign_folder(artifacts, Path(sign_key))
    elif signature.is_file():  # it vouches for the previous set: it would only fail
        signature.unlink()
        removed.append(str(signature))
    report = export_check(model, artifacts, [name for name in formats if name in rewritten], on_step) if check else None
    return ExportResult(tuple(str(p) for p in written), tuple(removed), skipped, str(manifest), names.read_manifest_bytes(artifacts)[1],
                        str(signature) if sign_key else None, fuse, tuple(folds), report)


EXPORT_CHECK_INPUTS = 16


def export_check(model: _Model, artifacts: Path, exported: list[str], on_step=None):
    """What export says about its own files: each exported artifact, read through the manifest check and opened
    by its first runtime on cpu, against model.pt in float64 on EXPORT_CHECK_INPUTS random inputs (fcx verify
    is the full proof: real data, probes, structure, every backend and device). Approximate files are left to
    verify, which judges them on real data."""
    stored = model.stored
    vouch = verification.manifest_vouch(artifacts, names.read_manifest(artifacts), stored.sha256)
    candidates = []
    for artifact in exported:
        chosen = next((b for b in registry.backends().values() if b.artifact == artifact), None)
        if chosen is None:
            continue  # nothing runs it here (a Triton repository: fcx serve and verify --url do)
        if chosen.approximate:
            candidates.append(parity.Skipped(chosen.name, "cpu", "approximate: fcx verify judges it on real data"))
            continue
        _step(on_step, f"checking {chosen.name}")
        try:
            candidates.append(open_backend(chosen.name, artifacts, "cpu", model, vouch=vouch))
        except DeviceUnavailable as exc:
            candidates.append(parity.Skipped(chosen.name, "cpu", str(exc)))
    x = random_pixels(stored.spec.input_shape, EXPORT_CHECK_INPUTS)  # verify's first: fuse-bn --verify's answers serve
    inputs = parity.Inputs(x, None, f"{EXPORT_CHECK_INPUTS} random inputs")
    reference, own_error, others = verification.float64_reference(stored, model.path, x)
    rows = parity.compare_predictors(reference, own_error, candidates, inputs, DEFAULT_TOLERANCE, others=others)
    return parity.report(rows, inputs, reference, None, own_error, DEFAULT_TOLERANCE)


def sign(artifacts: Path, private_key: Path, signature: Path | None = None) -> dict:
    """`fcx sign`: sign an exported folder as it is (its files must match its manifest)."""
    artifacts = Path(artifacts)
    path = names.sign_folder(artifacts, Path(private_key), signature)
    return {"signature": str(path), "folder": str(artifacts), "manifest_sha256": names.read_manifest_bytes(artifacts)[1]}


def _record_fingerprints(program, spec, settings: ExportSettings, stage: Path, exported: list[str]) -> None:
    """What export just wrote is a fresh export: remembered, so verify's structure check need not make it again."""
    from fcexport import machine_cache
    from fcexport.program import fingerprint

    program_fingerprint = None
    for name in exported:
        exporter = registry.exporters()[name]
        if exporter.fingerprint is None or exporter.files[0].endswith("/"):
            continue
        program_fingerprint = program_fingerprint or fingerprint(program)
        machine_cache.store_fingerprint(machine_cache.fresh_export_key(program_fingerprint, spec, name, settings.opset),
                                        exporter.fingerprint((stage / exporter.files[0]).read_bytes()))


def _fresh_fingerprint(program, artifact: str, spec, settings: ExportSettings) -> dict[str, str]:
    """What `artifact` holds when `program` is exported afresh with `settings` (verify's structure check)."""
    import tempfile

    exporter = registry.exporters()[artifact]
    with tempfile.TemporaryDirectory(prefix="fcx-fresh-") as stage:
        skipped = export_files(program, spec, export_formats([artifact]), settings, Path(stage))
        if skipped:
            raise FcxError(skipped.get(artifact) or next(iter(skipped.values())))
        return exporter.fingerprint((Path(stage) / exporter.files[0]).read_bytes())


# ---- use ---------------------------------------------------------------------------------


def open_backend(backend: str, artifacts: Path, device: str, model: _Model | None = None, admit=None, vouch=None) -> Predictor:
    """A backend's files from a folder (fcexport.registry). Without model.fused.pt, `fused` is model.pt folded in
    memory; `model` (this command's checked model.pt) saves reading it again and lets pt2 rebuild from it; `vouch`
    checks the bytes read against the manifest and `admit` vets them against a fresh export, before loading."""
    artifacts = Path(artifacts)
    model_path = artifacts / names.MODEL
    if model is None and model_path.is_file() and backend in ("fused", "pt2"):
        model = _Model(model_path)
    if backend == "fused" and not (artifacts / names.FUSED).is_file() and model is not None:
        program, spec, _ = model.fused
        return program_predictor(program, "fused", device, Path("(fused in memory from model.pt)"), spec)
    if backend == "eager" and model is not None:
        return program_predictor(model.stored.program, "eager", device, model_path, model.stored.spec)
    checks = Checks(admit, model.program_for if model is not None else None, vouch)
    return registry.open_backend(backend, artifacts, device, checks)


def model_to_run(model: str | Path | None, artifacts: str | Path):
    """(the file predict runs: `model`, or the best in the folder; a warning when it is stale; the check its bytes
    must pass when they are read, or None). A file the folder's manifest lists is loaded only when the bytes read
    match it; one it does not list runs only when named (`model`): then it is the user's own file."""
    from fcexport.files import sha256_file

    path = Path(model) if model is not None else names.find_default_model(Path(artifacts))
    folder = path.parent
    if path.name == names.MODEL or not path.is_file():
        return path, None, None  # model.pt is data, checked as it is read; a missing file is the loader's error
    manifest = names.read_manifest(folder)
    if manifest is None or path.name not in manifest["files"]:
        if model is None:
            raise FcxError(f"{path}: {names.MANIFEST} does not vouch for it, so it is not loaded unasked; name it as the "
                           "model to run it as it is", hint="export")
        return path, None, None  # named by the user and not part of the exported set: their own file

    def vouch(read: Path, data: bytes) -> str | None:
        return names.integrity_problem(read, manifest, data)

    model_path = folder / names.MODEL
    stale = names.stale_problem(path, manifest, sha256_file(model_path)) if model_path.is_file() else None
    return path, stale, vouch


def open_for_predict(model: str | Path | None, artifacts: str | Path, device: str = "cpu",
                     runtime: str | None = None, batch: int = 1) -> tuple[Predictor, str | None]:
    """(the checked model to predict with, opened; a staleness warning or None). The runtime is `runtime`, else
    the fastest measured on this machine for this file near `batch` (by `fcx bench`, or by a short measurement on
    the file's first use here), else the first registered."""
    from fcexport import speeds

    path, warning, vouch = model_to_run(model, artifacts)
    if runtime is None and path.is_file():
        runtime = speeds.fastest_runtime(path, batch, device)
    model_path = path.parent / names.MODEL
    source = _Model(model_path).program_for if registry.artifact_of(path) == "pt2" and model_path.is_file() else None
    checks = Checks(source=source, vouch=vouch)
    if runtime is None and path.is_file():
        fastest = speeds.measure_first_use(path, batch, device, lambda name: registry.open_predictor(path, device, checks, name))
        if fastest is not None:
            return fastest, warning
    return registry.open_predictor(path, device, checks, runtime), warning


class StaleArtifact(FcxError):
    """The artifact to run was made from another model.pt than the one next to it."""


@dataclass(frozen=True)
class Predictions:
    """What predict returns: iterate it for one dict per image as its batch is done (file, label, index,
    probability, top; or file, error); `predictor` is the model that answers, `stale` a warning or None."""

    rows: Iterator[dict]
    predictor: Predictor
    stale: str | None

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)


def predict(images: list[str | Path], model: str | Path | None = None, artifacts: str | Path = "artifacts",
            top_k: int = 3, invert: str = "auto", device: str = "cpu", runtime: str | None = None,
            save_prepared: Path | None = None, allow_stale: bool = False, masks: str | Path = "masks") -> Predictions:
    """Classify image files with `model`, or the best artifact in the folder (ONNX > fused > model), with
    `runtime` or the fastest measured here; `save_prepared` gets the image each file became, as PNG; a segmentation
    model writes each file's mask and overlay PNGs into `masks`. An artifact made from another model.pt than the
    folder's is an error, unless `allow_stale` (then `stale` says so)."""
    from fcexport.classify import BATCH_SIZE, predict_files
    from fcexport.preprocess import collect_image_files

    files = list(collect_image_files(str(i) for i in images))  # bounded (preprocess.MAX_MATCHES); sizes the batch
    predictor, warning = open_for_predict(model, artifacts, device, runtime, min(BATCH_SIZE, max(1, len(files))))
    if warning and not allow_stale:
        raise StaleArtifact(f"{warning}, so it would answer for another model", hint="stale")
    rows = predict_files(predictor, files, top_k, invert, save_prepared=save_prepared, masks=Path(masks))
    return Predictions(rows, predictor, warning)


def inspect(target: str | Path = "artifacts") -> Inspection:
    """`fcx inspect`: what a model file (or every model file of a folder) holds, read and checked but never run:
    spec, format details (inputs, outputs, opsets, weights, records), provenance, and the manifest's word on it."""
    from fcexport.files import sha256_file

    target = Path(target)
    if not target.exists():
        raise FcxError(f"{target}: no such file or folder", hint="train-or-import")
    folder_artifact = next((name for name, e in registry.exporters().items() if f"{target.name}/" in e.files), None)
    folder = target.parent if target.is_file() or (target.is_dir() and folder_artifact) else target
    found = names.read_manifest_bytes(folder)
    manifest, digest = found if found else (None, None)
    # staleness is judged against the manifest only: without one, model.pt is not hashed (it may be gigabytes)
    model_sha256 = sha256_file(folder / names.MODEL) if manifest is not None and (folder / names.MODEL).is_file() else None
    if target.is_dir() and folder_artifact:  # the repository itself: that one artifact
        report = _inspect_folder(folder, folder_artifact, f"{target.name}/", manifest, model_sha256)
        if report.problem:
            raise FcxError(report.problem)
        return Inspection(str(folder), (report,), digest, None)
    if target.is_dir():
        paths = [folder / f for files in registry.artifacts().values() for f in files if (folder / f).is_file()]
        if not paths:
            raise FcxError(f"{folder}: holds no model file ({', '.join(f for fs in registry.artifacts().values() for f in fs)})",
                           hint="train-or-import")
    else:
        paths = [target]
    signature = folder / names.SIGNATURE
    files = tuple(_inspect_file(p, manifest, model_sha256) for p in dict.fromkeys(paths))
    if target.is_dir():
        files += tuple(_inspect_folder(folder, name, entry, manifest, model_sha256) for name, exporter in registry.exporters().items()
                       for entry in exporter.files if entry.endswith("/") and (folder / entry).is_dir())
    if target.is_file() and files[0].problem:
        raise FcxError(files[0].problem)  # the one file asked about cannot be read: an error, not a row
    return Inspection(str(folder), files, digest, str(signature) if signature.is_file() else None)


def _inspect_folder(folder: Path, artifact: str, entry: str, manifest: dict | None, model_sha256: str | None) -> FileReport:
    """A folder artifact (a Triton repository) as inspect sees it: every file against the manifest, then its description."""
    files = names.artifact_files(folder, [entry])
    size = sum((folder / f).stat().st_size for f in files)
    read = verification.VouchedReader(folder, manifest, model_sha256)
    if manifest is None:
        state = f"no {names.MANIFEST} here"
    else:
        problems = read.every(files)
        state = problems[0] if problems else f"{len(files)} files match, made from this model.pt"
    try:  # a folder's describe gets the reader: each file read once, the bytes the manifest check saw
        spec, details = registry.exporters()[artifact].describe(read, folder / entry.rstrip("/"))
    except FcxError as exc:
        return FileReport(str(folder / entry), artifact, size, state, problem=str(exc))
    return FileReport(str(folder / entry), artifact, size, state, spec, details)


def _inspect_file(path: Path, manifest: dict | None, model_sha256: str | None) -> FileReport:
    from fcexport.checkpoint import read_file, read_model
    from fcexport.targets import read_bytes

    size = path.stat().st_size
    try:
        artifact = registry.artifact_of(path)
        data = read_file(path) if artifact in registry.STORED_ARTIFACTS else read_bytes(path)  # model.pt: directory first
    except FcxError as exc:
        return FileReport(str(path), None, size, "not read", problem=str(exc))
    if manifest is None:
        state = f"no {names.MANIFEST} here"
    elif path.name == names.MODEL:
        state = names.integrity_problem(path, manifest, data) or f"matches {names.MANIFEST}"
    else:
        state = names.check_against_manifest(path, manifest, model_sha256, data) or "matches, made from this model.pt"
    try:
        if artifact in registry.STORED_ARTIFACTS:
            stored = read_model(path, data)
            spec = stored.spec
            details = {"parameters": stored.program.parameter_count(), "nodes": len(stored.program.nodes),
                       "multiply-accumulates per image": stored.shapes.macs,
                       "values visited per image": stored.shapes.work - stored.shapes.macs,
                       "bytes alive at once per image": stored.shapes.peak}
        else:
            spec, details = registry.exporters()[artifact].describe(data, path)
    except FcxError as exc:
        return FileReport(str(path), artifact, size, state, problem=str(exc))
    return FileReport(str(path), artifact, size, state, spec, details)


def verify(
    artifacts: str | Path = "artifacts",
    backends=None,
    devices=DEVICES,
    data: str | None = None,
    data_root: str | None = None,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    public_key: Path | None = None,
    signature: Path | None = None,
    expect_digest: str | None = None,
    on_step=None,
    inputs: int | None = None,
) -> VerifyReport:
    """`fcx verify`: the folder against its signature (`public_key`) or manifest digest (`expect_digest`) first,
    loading nothing if it fails; then model.pt in float64 on cpu is the reference and every backend x device is
    compared with it, after its files are checked against manifest.json and before their structure is compared
    with a fresh export."""
    backends = registry.verified_by_default() if backends is None else tuple(backends)
    inputs = parity.checked_budget(inputs)
    check_choices("backends", backends, tuple(registry.backends()))
    check_choices("devices", devices, DEVICES)
    artifacts = Path(artifacts)
    trust = tuple(verification.trust_checks(artifacts, public_key, signature, expect_digest))
    if any(check.status is Status.FAIL for check in trust):
        return VerifyReport(trust, None)  # nothing in the folder is loaded
    model = _Model(artifacts / names.MODEL, reuse_fused=False)
    stored = model.stored
    manifest = names.read_manifest(artifacts)
    trust += tuple(verification.folder_checks(artifacts, manifest, stored.sha256))
    exported = {f for name, files in registry.artifacts().items() if name != "model" for f in names.artifact_files(artifacts, files)}
    if not exported:
        raise FcxError(f"{artifacts}: nothing to verify: the folder holds model.pt but no fused or exported model", hint="export")
    fresh = verification.FreshExports(model, _fresh_fingerprint)
    vouch = verification.manifest_vouch(artifacts, manifest, stored.sha256)  # what is not what was exported is never loaded
    found = verification.open_candidates(backends, devices, lambda backend, device: open_backend(
        backend, artifacts, device, model, admit=fresh.admit, vouch=vouch), on_step)
    with machine_cache.one_command():  # model.pt's float64 answers computed once for both
        parity_report = verification.numbers(stored, model.path, *found, data, data_root, tolerance, on_step, inputs)
        reference = verification.reference_check(artifacts, manifest, stored, model.path, inputs)
    trust += (reference,) if reference else ()
    return VerifyReport(trust, parity_report)


def verify_with_reference(artifacts: str | Path = "artifacts", backends=None, devices=DEVICES,
                          tolerance: Tolerance = DEFAULT_TOLERANCE, public_key: Path | None = None,
                          signature: Path | None = None, expect_digest: str | None = None, on_step=None) -> VerifyReport:
    """`fcx verify --reference` (and fcx verify where torch is not installed): the signature or digest first, then each
    ONNX file of the folder, vouched for by the manifest, against the float64 answers export stored in reference.npz.
    Needs neither model.pt nor torch; proves the numbers on the reference's inputs, not the structure."""
    backends = registry.verified_by_default() if backends is None else tuple(backends)
    check_choices("backends", backends, tuple(registry.backends()))
    check_choices("devices", devices, DEVICES)
    artifacts = Path(artifacts)
    trust = tuple(verification.trust_checks(artifacts, public_key, signature, expect_digest))
    if any(check.status is Status.FAIL for check in trust):
        return VerifyReport(trust, None)
    manifest = names.read_manifest(artifacts)
    found, source, weak = verification.read_reference(artifacts, manifest)
    vouch = verification.manifest_vouch(artifacts, manifest, source)
    runnable = [b for b in backends if registry.backend(b).runtime.format == "onnx"]  # the runtimes that need no torch
    opened = verification.open_candidates(runnable, devices, lambda backend, device: registry.open_backend(
        backend, artifacts, device, Checks(vouch=vouch)), on_step)
    return VerifyReport(trust, verification.against_reference(*opened, found, weak, tolerance))


def bench(artifacts: str | Path = "artifacts", batch_sizes=(1, 64, 1024), backends=None, device: str = "cpu",
          warmup: int = 20, repeat: int = 200, max_seconds: float = 1.0, seed: int = 0, on_step=None) -> list[BenchRow]:
    """`fcx bench`: one row per backend x batch size; unavailable backends are rows with a reason. Each
    throughput is recorded for this machine, so `fcx predict` can pick the fastest runtime for a file."""
    from fcexport import speeds
    from fcexport.timing import measure

    backends = tuple(registry.backends()) if backends is None else tuple(backends)
    check_choices("backends", backends, tuple(registry.backends()))
    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > MAX_BENCH_BATCH:
        raise FcxError(f"batch sizes must be integers from 1 to {MAX_BENCH_BATCH}, got {list(batch_sizes)}")
    if warmup < 0 or repeat < 1 or not 0 < max_seconds <= 600:
        raise FcxError(f"--warmup must be >= 0, --repeat >= 1 and --seconds more than 0 and at most 600; got --warmup "
                       f"{warmup}, --repeat {repeat}, --seconds {max_seconds:g}")
    artifacts = Path(artifacts)
    names.find_default_model(artifacts)  # a clear error when the folder holds no model at all
    model = _Model(artifacts / names.MODEL) if (artifacts / names.MODEL).is_file() else None
    rng = np.random.default_rng(seed)
    rows, measured, opened = [], [], []
    for backend in backends:  # every one opened before any runs, as verify does (on an H200 with torch 2.11, loading
        _step(on_step, f"opening {backend} on {device}")  # an AOTInductor package after others had run crashed)
        try:
            opened.append((backend, open_backend(backend, artifacts, device, model)))
        except (DeviceUnavailable, Unsupported) as exc:
            opened.append((backend, BenchRow(backend, device, Status.SKIPPED, reason=str(exc), hint=exc.hint)))
    for backend, predictor in opened:
        if isinstance(predictor, BenchRow):
            rows.append(predictor)
            continue
        for batch in batch_sizes:
            _step(on_step, f"timing {backend} on {device} at batch {batch}")
            x = rng.random((batch, *predictor.spec.input_shape), dtype=np.float32)
            rows.append(BenchRow(backend, device, Status.OK, batch, **measure(predictor, x, warmup, repeat, max_seconds),
                                 precision=predictor.precision))
            measured.append((predictor, rows[-1]))
    speeds.record(measured)
    return rows


# ---- deploy ------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(artifacts: str | Path = "artifacts", repository: str | Path | None = None, http_port: int = 8000,
          grpc_port: int = 8001, server_env: Path | None = None):
    """`fcx serve`: the folder's Triton repository (or `repository`), checked file by file against the manifest of
    the folder it is in and config by config against its models, served by tritonserver on 127.0.0.1 until the
    block ends. Yields a fcexport.serve.Running."""
    from fcexport import serve as serving
    from fcexport.targets.triton import check_repository
    from fcexport.triton_config import LABELS_FILE, REPOSITORY

    env = serving.find_server_env(server_env)  # before reading anything: says how to make it when missing
    repository = Path(repository) if repository is not None else Path(artifacts) / REPOSITORY
    folder = repository.parent
    model_path = folder / names.MODEL
    manifest = names.read_manifest(folder)
    from fcexport.files import sha256_file

    read = verification.VouchedReader(folder, manifest, sha256_file(model_path) if model_path.is_file() else None)
    problems = []
    if manifest is not None:  # every file of the repository, as fcx verify's row judges it; then its configs
        problems = read.every([f for f in names.artifact_files(folder, [f"{repository.name}/"])])
    served, found = check_repository(repository, read, folder if manifest is not None else None) if not problems else ([], [])
    problems += found
    if problems:
        raise FcxError(f"not served: {'; '.join(problems[:3])}", hint="export-triton")
    models = [serving.ServedModel(m.name, m.config, read(m.model_file.parent.parent / LABELS_FILE), read(m.model_file))
              for m in served]
    with serving.running_server(env, models, http_port, grpc_port) as running:
        yield running


def verify_remote(urls: list[str], model: str | None, artifacts: str | Path = "artifacts", data: str | None = None,
                  data_root: str | None = None, tolerance: Tolerance = DEFAULT_TOLERANCE, on_step=None,
                  inputs: int | None = None, timeout: float | None = None) -> VerifyReport:
    """`fcx verify --url`: a served model (at each URL: HTTP or gRPC) gets the inputs fcx verify uses and is compared
    with the folder's model.pt the same way; its configuration (input, output, dims, batch) and the class names Triton
    returns are checked against model.pt's spec. Talking to the servers ends within `timeout` seconds in all
    (default remote.COMMAND_TIMEOUT_SECONDS)."""
    from fcexport import remote
    from fcexport.triton_config import Served, config_problems

    inputs = parity.checked_budget(inputs)
    model_file = Path(artifacts) / names.MODEL
    stored = _Model(model_file).stored
    spec = stored.spec
    candidates, problems = [], []
    sample = np.random.default_rng(2).random((8, *spec.input_shape), dtype=np.float32)
    deadline = remote.Deadline.after(remote.COMMAND_TIMEOUT_SECONDS if timeout is None else timeout)
    for url in urls:
        _step(on_step, f"asking {url} about {model or 'its model'}")
        endpoint = remote.connect(url, model, deadline)
        found = config_problems(Served(endpoint.model, endpoint.config, tuple(spec.class_names), Path(endpoint.model)), spec, None, remote=True)
        carried = remote.served_spec(endpoint) if not found else None
        if carried is not None and carried.provenance.source_sha256 not in (None, stored.sha256):
            found.append(f"it was exported from another model.pt (sha256 {carried.provenance.source_sha256[:12]}, "
                         f"this one is {stored.sha256[:12]})")
        if not found:
            found = remote.label_problems(endpoint, spec, sample)
        candidates.append(remote.remote_predictor(endpoint, spec))
        problems.append(found)
    return VerifyReport((), verification.numbers(stored, model_file, candidates, problems, data, data_root, tolerance, on_step, inputs))


def predict_remote(images: list[str | Path], url: str, model: str | None, top_k: int = 3, invert: str = "auto",
                   timeout: float | None = None, masks: str | Path = "masks") -> Predictions:
    """`fcx predict --url`: images prepared here (the spec comes from the served configuration), classified by the
    server within `timeout` seconds in all (default remote.COMMAND_TIMEOUT_SECONDS). Torch is not imported."""
    from fcexport import remote
    from fcexport.classify import predict_files
    from fcexport.preprocess import collect_image_files

    deadline = remote.Deadline.after(remote.COMMAND_TIMEOUT_SECONDS if timeout is None else timeout)
    endpoint = remote.connect(url, model, deadline)
    predictor = remote.remote_predictor(endpoint, remote.served_spec(endpoint))
    files = list(collect_image_files(str(i) for i in images))
    return Predictions(predict_files(predictor, files, top_k, invert, masks=Path(masks)), predictor, None)
