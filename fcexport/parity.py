"""Parity of candidates against a reference: inputs, one comparison row per backend x device, a report.

Runtimes (fcexport.targets) produce logits and fcexport.compare judges them; this module only picks
the inputs, runs each candidate and collects typed rows into the report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fcexport.compare import Tolerance, compare
from fcexport.errors import FcxError
from fcexport.results import CheckRow, ParityReport, Status
from fcexport.targets import Predictor
from fcexport.spec import ModelSpec

RANDOM_INPUTS = 256
MACS_BUDGET = 4 * 10**10  # multiply-accumulates per run over all inputs: resnet18 (1.8e9 per image) gets 22 inputs
REFERENCE_SECONDS = 8.0  # the float64 reference's share of a run; the float32 candidates together take about as long
MIN_INPUTS, MAX_INPUTS = 8, 4096


@dataclass(frozen=True)
class Inputs:
    """Verification inputs: real images first (with labels when known), then uniform random pixels, then probes."""

    x: np.ndarray
    labels: np.ndarray | None  # labels of the first len(labels) rows
    description: str


@dataclass(frozen=True)
class Skipped:
    """A candidate that cannot run here, with the reason (and the errors.HINTS step that would fix it)."""

    backend: str
    device: str
    reason: str
    hint: str | None = None


SPEC_FIELDS = ("class_names", "input_shape", "normalization", "preprocess")  # what must match the model's spec


def input_budget(macs_per_image: int, reference_seconds_per_image: float) -> int:
    """How many inputs a verification run gets: all that cheap models need, fewer for big ones (by their
    multiply-accumulates, and by how long the float64 reference took per image here: float64 convolutions
    have no fast CPU kernels), so each command stays within a minute on two cores."""
    by_time = REFERENCE_SECONDS / max(reference_seconds_per_image, 1e-9)
    return int(min(MAX_INPUTS, max(MIN_INPUTS, min(MACS_BUDGET // max(macs_per_image, 1), by_time))))


def checked_budget(inputs: int | None) -> int | None:
    """A budget the user fixed (--inputs; None: none fixed), within the bounds input_budget keeps to."""
    if inputs is not None and not MIN_INPUTS <= inputs <= MAX_INPUTS:
        raise FcxError(f"--inputs must be between {MIN_INPUTS} and {MAX_INPUTS}, got {inputs}")
    return inputs


def probe_inputs(program, spec: ModelSpec, limit: int) -> np.ndarray:
    """Up to `limit` inputs, one per unit of the model's first Linear or Conv, lit where that unit's
    weights are positive: real and random images may never drive some units hard, these do."""
    import torch

    channels, height, width = spec.input_shape
    first = next((n for n in program.nodes if n.op in ("aten.convolution.default", "aten.linear.default",
                                                         "aten.addmm.default", "aten.mm.default")), None)
    weight = None
    if first is not None and first.op in ("aten.convolution.default", "aten.linear.default"):
        weight = program.tensors.get(getattr(first.args[1], "name", None))
    elif first is not None:
        transposed = program.node(getattr(first.args[-1], "name", ""))
        if transposed is not None and transposed.op == "aten.permute.default":
            weight = program.tensors.get(getattr(transposed.args[0], "name", None))
    if weight is None or not weight.is_floating_point() or limit <= 0:
        return np.zeros((0, *spec.input_shape), dtype=np.float32)
    if weight.dim() == 2 and weight.shape[1] == channels * height * width:
        lit = weight > 0
    elif weight.dim() == 4 and first.op == "aten.convolution.default" and weight.shape[1] == channels and first.args[8] == 1:
        kh, kw = weight.shape[2:]
        lit = (weight > 0).repeat(1, 1, -(-height // kh), -(-width // kw))[:, :, :height, :width]
    else:
        return np.zeros((0, *spec.input_shape), dtype=np.float32)
    return lit[:limit].to(torch.float32).reshape(-1, *spec.input_shape).numpy()


def spec_differences(reference: ModelSpec, candidate: ModelSpec) -> list[str]:
    """The spec fields an artifact must carry unchanged (a swapped class name relabels every answer)."""
    ref, cand = reference.to_dict(), candidate.to_dict()
    return [f"its {name} differs from model.pt's" for name in SPEC_FIELDS if ref[name] != cand[name]]


def make_inputs(spec: ModelSpec, budget: int, test=None, source: str | None = None, unavailable: str | None = None,
                seed: int = 0, probes: np.ndarray | None = None) -> Inputs:
    """Up to `budget` inputs: real test images (`test`, a data.Split named `source`; `unavailable` says why there
    are none), random pixels, then `probes` (see probe_inputs)."""
    shape = spec.input_shape
    probes = np.zeros((0, *shape), dtype=np.float32) if probes is None else probes
    if test is not None and list(test.images.shape[1:]) != list(shape):
        raise FcxError(f"data {source}: images are {list(test.images.shape[1:])} but the model expects {list(shape)}")
    real = test.images[: max(0, min(len(test), budget - len(probes) - MIN_INPUTS))] if test is not None else None
    taken = len(probes) + (0 if real is None else len(real))
    random_count = min(RANDOM_INPUTS, max(MIN_INPUTS, budget - taken))
    random = np.random.default_rng(seed).random((random_count, *shape), dtype=np.float32)
    extra = np.concatenate([random, probes])
    described = f"{random_count} random inputs" + (f" + {len(probes)} first-layer probes" if len(probes) else "")
    if real is None:
        return Inputs(extra, None, f"{described} ({unavailable})")
    labels = test.labels[: len(real)].numpy()
    return Inputs(np.concatenate([real.numpy(), extra]), labels, f"{len(real)} test images of {source} + {described}")


def compare_predictors(reference: np.ndarray, own_error: float, candidates: list[Predictor | Skipped], inputs: Inputs,
                       tolerance: Tolerance, on_step=None) -> list[CheckRow]:
    """Run each candidate and compare it with the float64 reference; skipped ones keep their reason. `on_step`
    (text) hears what is about to run."""
    rows = []
    for candidate in candidates:
        if isinstance(candidate, Skipped):
            rows.append(CheckRow(candidate.backend, candidate.device, Status.SKIPPED, reason=candidate.reason, hint=candidate.hint))
            continue
        if on_step:
            on_step(f"running {candidate.backend} on {candidate.device} ({len(inputs.x):,} inputs)")
        stats = compare(candidate(inputs.x), reference, own_error, inputs.labels, tolerance, candidate.approximate)
        stats["precision"] = candidate.precision
        status = Status.PASS if stats["passed"] else Status.FAIL
        rows.append(CheckRow(candidate.backend, candidate.device, status, str(candidate.source), stats))
    return rows


def with_problems(row: CheckRow, problems: list[str]) -> CheckRow:
    """Integrity, structure or spec problems fail a row whatever its numbers say."""
    if not problems:
        return row
    return replace(row, status=Status.FAIL, problems=tuple(problems), numbers={**row.numbers, "passed": False}, hint=None)


def report(rows: list[CheckRow], inputs: Inputs, reference_accuracy: float | None, own_error: float, tolerance: Tolerance) -> ParityReport:
    return ParityReport(tuple(rows), tolerance.describe(), own_error, tolerance, inputs.description, len(inputs.x), reference_accuracy)
