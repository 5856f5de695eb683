"""Calibrating verify's numeric rule on data (issue 29, item 2): how far honest exports are from model.pt, and which
planted changes the numbers alone catch.

    python benchmarks/verify_rule.py                          # the default list, 64 inputs each, 96 px images
    python benchmarks/verify_rule.py --models resnet50 timm:convnext_atto --size 224 --inputs 256
    python benchmarks/verify_rule.py --quick                  # seconds: does it run (make test runs it)

Verify's reference is model.pt run in float64; its yardstick is model.pt's own float32 error on the same inputs; a
candidate passes when its max abs error is within `factor` x that (fcexport.compare, Tolerance(): 4x; a runtime's
noise_scale multiplies it: 2 for OpenVINO, so 8x). This script measures the ratio (max abs error / own error) for:

- honest rows: every exact runtime (fused, torchscript, pt2, onnxruntime, openvino f32 when installed) on the files
  `fcexport.export` wrote, opened as verify opens them (fcexport.pipeline.open_backend);
- planted changes, judged by the numbers alone (the structure check, which names a changed tensor, is set aside):
  model.pt's program with one tensor changed, run by fcexport's own interpreter in float32 (program_predictor) as a
  changed model.pt / model.fused.pt would be. The changes, all on the middle conv/linear layer (the nearest to the
  middle whose output reaches the logits at all: random init leaves some attention layers without effect): its largest weight
  (by magnitude: the strongest version of "one weight") scaled by 1 + 1e-3 and 1 + 1e-2; one bias (the layer's own, else
  the BatchNorm right after it) shifted by one standard deviation of that layer's biases (of its weights where the biases
  are all equal, as transformers' zero init leaves them); output channels 0 and 1
  swapped. Each planted row also gives the change alone: the same changed program in float64 against the reference,
  i.e. the signal without float32 noise; a change whose signal is below the rule's factor cannot be caught by numbers.

Models get random weights and randomised BatchNorm statistics (as benchmarks/zoo.py does: folding is exercised for
real), inputs are verify's own kinds (parity.make_inputs: uniform random pixels, then first-layer probes) with a fixed
budget (`--inputs`, default 64: 16 probes + 48 random; verify's default is 256 random + up to 256 probes, smaller
here so the float64 references of 6 models fit in ~10 minutes on 2 cores). Prints a Markdown table and a summary.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from zoo import randomise_trivial_weights  # benchmarks/: the zoo's models are set up the same way

DEFAULT_MODELS = ("mlp", "cnn", "resnet18", "mobilenet_v3_small", "timm:efficientnet_b0", "timm:resnet18")
RUNTIMES = ("fused", "torchscript", "pt2", "onnxruntime", "openvino")
CLASSES = 10
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
WEIGHTED_OPS = ("aten.convolution.default", "aten.linear.default")


@dataclass(frozen=True)
class Row:
    """One line of the table: an honest runtime or a planted change on one model."""

    model: str
    what: str  # the runtime, or the planted change
    planted: bool
    ratio: float | None = None  # max abs error / model.pt's own float32 error
    allowed: float | None = None  # the rule's bound in the same unit (factor x own, or the noise floor if larger)
    passed: bool | None = None
    signal: float | None = None  # planted: the change alone (float64) / own error
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return self.note
        if self.planted:
            return "missed (passes)" if self.passed else "caught"
        return "pass" if self.passed else "**FAIL (false alarm)**"


def build(name: str, size: int):
    """(an eval-mode module with random weights and randomised BatchNorm, its (C, H, W), mean, std) for `name`:
    `mlp` (the course's Linear-BN-ReLU-Linear on 1x28x28), `cnn` (a small conv net on 3xSxS), a torchvision name,
    `timm:NAME` or `hf:TransformersClass` (as benchmarks/zoo.py builds them; at their own size where they have one)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, CLASSES))
        shape, mean, std = (1, 28, 28), (0.1307,), (0.3081,)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(64, CLASSES))
        shape, mean, std = (3, size, size), IMAGENET_MEAN, IMAGENET_STD
    elif name.startswith(("timm:", "hf:")):
        import zoo

        model = zoo.build(name)  # zoo.py's own settings (transformers widths cut to ViT-Tiny's)
        config = getattr(model, "config", None)  # transformers: its config's image size; timm: a fixed size, or `size`
        fixed = getattr(model, "pretrained_cfg", {}).get("fixed_input_size") and model.pretrained_cfg["input_size"][1]
        side = config.image_size if isinstance(getattr(config, "image_size", None), int) else fixed or size
        shape, mean, std = (3, side, side), IMAGENET_MEAN, IMAGENET_STD
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=CLASSES)
        shape, mean, std = (3, size, size), IMAGENET_MEAN, IMAGENET_STD
    randomise_trivial_weights(model)
    return model.eval(), shape, mean, std


def reference(program, spec, x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(model.pt's logits in float64, model.pt's own float32 max abs error against them, by verify's own function:
    the larger of two draws of rounding, the second on inputs moved one float32 step; the first draw's alone)."""
    from fcexport.targets.program import float64_answers, program_predictor

    exact, own = float64_answers(program, spec, Path("model.pt"), x)
    first = program_predictor(program, "eager", "cpu", Path("model.pt"), spec)(x)
    return exact, float(own.max(initial=0.0)), float(np.abs(first.astype(np.float64) - exact).max(initial=0.0))


def judged(model: str, what: str, planted: bool, logits: np.ndarray, exact: np.ndarray, own: float, noise_scale: float,
           signal: float | None = None) -> Row:
    """A row judged by the default rule (Tolerance(), its factor times the runtime's noise_scale)."""
    from fcexport.compare import Tolerance, compare

    tolerance = Tolerance()
    stats = compare(logits, exact, own, None, replace(tolerance, factor=tolerance.factor * noise_scale))
    return Row(model, what, planted, stats["noise_ratio"], stats["allowed_max_abs"] / own, stats["passed"], signal)


def honest_rows(model: str, folder: Path, x: np.ndarray, exact: np.ndarray, own: float) -> list[Row]:
    """Each exact runtime on the exported files, opened as verify opens them; one that cannot open or run says why."""
    from fcexport.errors import FcxError
    from fcexport.pipeline import open_backend

    rows = []
    for backend in RUNTIMES:
        try:
            predictor = open_backend(backend, folder, "cpu")
            logits = predictor(x)
        except FcxError as exc:
            rows.append(Row(model, backend, False, note=f"not run: {str(exc).splitlines()[0][:120]}"))
            continue
        what = backend if predictor.noise_scale == 1 else f"{backend} (factor x{predictor.noise_scale:g})"
        rows.append(judged(model, what, False, logits, exact, own, predictor.noise_scale))
    return rows


def weighted_layers(program) -> list:
    """The conv/linear nodes that read a stored weight, ordered from the middle (by execution order) outwards."""
    weighted = [n for n in program.nodes if n.op in WEIGHTED_OPS and getattr(n.args[1], "name", None) in program.tensors]
    middle = (len(weighted) - 1) // 2
    return sorted(weighted, key=lambda n: abs(weighted.index(n) - middle))


def channels_swapped(program, node):
    """The program with `node`'s output channels 0 and 1 swapped (its weight, and its own bias if it has one)."""
    weight_name = node.args[1].name
    weight = program.tensors[weight_name]
    swapped = {weight_name: weight[[1, 0, *range(2, len(weight))]].contiguous()}
    own_bias = getattr(node.args[2], "name", None) if len(node.args) > 2 else None
    if own_bias in program.tensors:
        swapped[own_bias] = program.tensors[own_bias][[1, 0, *range(2, len(weight))]].contiguous()
    return replace(program, tensors={**program.tensors, **swapped})


def layer_with_effect(program, x: np.ndarray, exact: np.ndarray, own: float, tries: int = 8):
    """The middle layer whose output reaches the logits: the first, from the middle outwards, whose two channels
    swapped move the float64 logits of 4 inputs by more than model.pt's own float32 error. At random init some
    layers do not reach them (levit_128s's middle attention: 1e-9 of own error); a change there proves nothing."""
    from fcexport.targets.program import float64_logits

    layers = weighted_layers(program)
    for node in layers[:tries]:
        if np.abs(float64_logits(channels_swapped(program, node), x[:4]) - exact[:4]).max() > own:
            return node
    return layers[0]


def bias_of(program, node) -> str | None:
    """The layer's own bias tensor, else that of a BatchNorm reading its output (ResNet's convs have no bias)."""
    own = getattr(node.args[2], "name", None) if len(node.args) > 2 else None
    if own in program.tensors:
        return own
    for user in program.nodes:
        if "batch_norm" in user.op and getattr(user.args[0], "name", None) == node.name:
            name = getattr(user.args[2], "name", None)
            return name if name in program.tensors else None
    return None


def planted_changes(program, node) -> list[tuple[str, object]]:
    """(label, changed program) for each planted change on `node`; the stored program is left as it is."""
    weight_name = node.args[1].name
    weight = program.tensors[weight_name]
    where = f"`{node.layer}`"

    def changed(**tensors):
        return replace(program, tensors={**program.tensors, **tensors})

    largest = int(weight.abs().argmax())
    changes = []
    for relative in (1e-3, 1e-2):
        scaled = weight.clone()
        scaled.view(-1)[largest] *= 1 + relative
        changes.append((f"{where} largest weight x(1+{relative:g})", changed(**{weight_name: scaled})))
    bias_name = bias_of(program, node)
    if bias_name is not None:
        bias = program.tensors[bias_name].clone()
        # transformers initialises biases to zero: their spread is 0, and the layer's weights give the scale instead
        spread, of = (bias.std(), "its layer's biases") if bias.std() > 0 else (weight.std(), "its weights (biases all equal)")
        bias[0] += spread
        changes.append((f"`{bias_name}`[0] + 1 sd of {of}", changed(**{bias_name: bias})))
    changes.append((f"{where} output channels 0 and 1 swapped", channels_swapped(program, node)))
    return changes


def planted_rows(model: str, program, spec, x: np.ndarray, exact: np.ndarray, own: float) -> list[Row]:
    """Each planted change run in float32 by fcexport's interpreter, judged by the rule; its float64 signal beside."""
    from fcexport.targets.program import float64_logits, program_predictor

    rows = []
    for label, changed in planted_changes(program, layer_with_effect(program, x, exact, own)):
        logits = program_predictor(changed, "eager", "cpu", Path("model.pt (changed)"), spec)(x)
        signal = float(np.abs(float64_logits(changed, x) - exact).max()) / own
        rows.append(judged(model, label, True, logits, exact, own, 1.0, signal))
    return rows


def measure(name: str, size: int, budget: int, folder: Path) -> tuple[list[Row], str]:
    """Import, export and measure one model: (its rows, a line about its inputs and timing)."""
    import fcexport
    from fcexport import parity
    from fcexport.checkpoint import read_model

    started = time.perf_counter()
    module, shape, mean, std = build(name, size)
    fcexport.import_model(module, shape, mean=mean, std=std, artifacts=folder)
    exported = fcexport.export(folder / "model.pt", folder, ["onnx", "torchscript", "pt2"], check=False)
    stored = read_model(folder / "model.pt")
    probes = parity.probe_inputs(stored.program, stored.spec, parity.probe_count(budget, stored.spec))
    inputs = parity.make_inputs(stored.spec, budget, probes=probes, unavailable="no data")
    exact, own, first = reference(stored.program, stored.spec, inputs.x)
    rows = honest_rows(name, folder, inputs.x, exact, own)
    rows += planted_rows(name, stored.program, stored.spec, inputs.x, exact, own)
    skipped = "".join(f"; {k} not exported: {v}" for k, v in exported.skipped.items())
    line = (f"{name} {'x'.join(map(str, shape))}: {len(inputs.x)} inputs ({inputs.description.split(' (')[0]}), "
            f"own float32 error {own:.3g} ({own / first if first else 1:.3g}x its first draw), "
            f"largest |logit| {np.abs(exact).max():.3g}, "
            f"{time.perf_counter() - started:.0f} s{skipped}")
    return rows, line


def fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def table(rows: list[Row]) -> str:
    lines = ["| model | runtime or planted change | ratio (x own float32 error) | rule allows | change alone (float64) | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.model} | {r.what} | {fmt(r.ratio)} | {fmt(r.allowed)} | {fmt(r.signal)} | {r.verdict} |" for r in rows]
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """The largest honest ratio per runtime, and per model the smallest change caught (by its float64 signal)."""
    lines = ["Largest honest ratio per runtime:"]
    for runtime in RUNTIMES:
        honest = [r for r in rows if not r.planted and r.what.split(" ")[0] == runtime and r.ratio is not None]
        if not honest:
            lines.append(f"- {runtime}: no rows")
            continue
        worst = max(honest, key=lambda r: r.ratio)
        failed = sum(1 for r in honest if not r.passed)
        lines.append(f"- {runtime}: {worst.ratio:.3g} ({worst.model}; rule allows {worst.allowed:.3g}); "
                     f"{len(honest) - failed}/{len(honest)} honest rows pass")
    lines.append("\nPlanted changes per model (numbers alone):")
    for model in dict.fromkeys(r.model for r in rows if r.planted):
        planted = [r for r in rows if r.planted and r.model == model]
        caught = [r for r in planted if r.passed is False]
        smallest = min(caught, key=lambda r: r.signal, default=None)
        missed = ", ".join(f"{r.what} (alone {r.signal:.3g})" for r in planted if r.passed)
        lines.append(f"- {model}: smallest caught: "
                     + (f"{smallest.what} (alone {smallest.signal:.3g}x, run {smallest.ratio:.3g}x)" if smallest else "none")
                     + (f"; missed: {missed}" if missed else "; none missed"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                        help="mlp, cnn, torchvision names, timm:NAME, hf:CLASS [default: %(default)s]")
    parser.add_argument("--size", type=int, default=96, help="image height and width (not the MLP's 28) [96]")
    parser.add_argument("--inputs", type=int, default=64, help="verify's --inputs budget per model [64]")
    parser.add_argument("--quick", action="store_true", help="does it run: the MLP and the CNN at 32 px on 16 inputs")
    args = parser.parse_args()
    if args.quick:
        args.models, args.size, args.inputs = ["mlp", "cnn"], 32, 16
    rows, notes = [], []
    for name in args.models:
        with tempfile.TemporaryDirectory() as folder:
            try:
                found, line = measure(name, args.size, args.inputs, Path(folder))
            except Exception as exc:  # one model that cannot be built or exported is a line, the others are measured
                found, line = [Row(name, "(whole model)", False, note=f"error: {type(exc).__name__}: {str(exc)[:200]}")], name
            rows += found
            notes.append(line)
            print(f"done: {line}\n{table(found).split(chr(10), 2)[2]}", flush=True)  # its rows now: a long run cut short keeps them
    print()
    print(table(rows))
    print()
    print("\n".join(f"- {line}" for line in notes))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
