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
from fcexport.targets import Predictor, Unsupported
from fcexport.spec import ModelSpec, random_pixels

# The default budget, the same on every machine whatever its load (a slow machine takes longer, never proves less):
# every real test image up to REAL_INPUTS, spec.RANDOM_INPUTS uniform random images (what any model can be given: the
# minimum for a verdict), and up to PROBE_INPUTS first-layer probes. `--inputs N` fixes the total instead; fewer
# random inputs than the minimum are said in the verdict ("weak").
# (A segmentation model's random inputs are fewer where its outputs are large: spec.ModelSpec.random_inputs.)
REAL_INPUTS, PROBE_INPUTS = 2000, 256
MIN_INPUTS, MAX_INPUTS = 8, 4096


@dataclass(frozen=True)
class Inputs:
    """Verification inputs: real images first (with labels when known), then uniform random pixels, then probes."""

    x: np.ndarray
    labels: np.ndarray | None  # labels of the first len(labels) rows
    description: str
    weak: str | None = None  # why these inputs prove less than a verdict needs (a --inputs below the minimum)


@dataclass(frozen=True)
class OtherOutput:
    """An output besides the logits (fcexport.program.Program.extras, torchvision's "aux"): its name, model.pt's
    float64 values on the inputs and its own float32 error there, judged by the same rule as the logits."""

    name: str
    reference: np.ndarray
    own_error: float


@dataclass(frozen=True)
class Skipped:
    """A candidate that cannot run here, with the reason (and the errors.HINTS step that would fix it)."""

    backend: str
    device: str
    reason: str
    hint: str | None = None


SPEC_FIELDS = ("class_names", "input_shape", "normalization", "preprocess", "task", "output_shape", "other_outputs")  # must match model.pt's


def checked_budget(inputs: int | None) -> int | None:
    """A budget the user fixed (--inputs; None: the default budget), within MIN_INPUTS..MAX_INPUTS."""
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
    return [f"its {name} differs from model.pt's" for name in SPEC_FIELDS if ref.get(name) != cand.get(name)]


def probe_count(budget: int | None, spec: ModelSpec) -> int:
    """How many first-layer probes a budget has room for (the default: PROBE_INPUTS; a quarter of the random inputs for
    a segmentation model, whose outputs are large)."""
    limit = PROBE_INPUTS if not spec.dense else max(1, spec.random_inputs // 4)
    return limit if budget is None else min(limit, budget // 4)


def make_inputs(spec: ModelSpec, budget: int | None, test=None, source: str | None = None, unavailable: str | None = None,
                probes: np.ndarray | None = None) -> Inputs:
    """The inputs: real test images (`test`, a data.Split named `source`; `unavailable` says why there are none),
    seeded random pixels (spec.random_pixels), then `probes` (see probe_inputs). `budget` None: the default budget (up to REAL_INPUTS
    + spec.RANDOM_INPUTS + the probes); a number: at most that many in all."""
    shape = spec.input_shape
    probes = np.zeros((0, *shape), dtype=np.float32) if probes is None else probes
    if test is not None and list(test.images.shape[1:]) != list(shape):
        raise FcxError(f"data {source}: images are {list(test.images.shape[1:])} but the model expects {list(shape)}")
    real_limit = REAL_INPUTS if budget is None else budget - len(probes) - MIN_INPUTS
    real = test.images[: max(0, min(len(test), real_limit))] if test is not None else None
    taken = len(probes) + (0 if real is None else len(real))
    wanted = spec.random_inputs
    random_count = wanted if budget is None else min(wanted, max(MIN_INPUTS, budget - taken))
    random = random_pixels(shape, random_count)
    extra = np.concatenate([random, probes])
    described = f"{random_count} random inputs" + (f" + {len(probes)} first-layer probes" if len(probes) else "")
    weak = (f"weak: {taken + random_count} inputs, {random_count} of them random (a verdict needs {wanted} "
            "random inputs + the probes)") if random_count < wanted else None
    if real is None:
        return Inputs(extra, None, f"{described} ({unavailable})", weak)
    labels = test.labels[: len(real)].numpy()
    return Inputs(np.concatenate([real.numpy(), extra]), labels, f"{len(real)} test images of {source} + {described}", weak)


def compare_predictors(reference: np.ndarray, own_error: float, candidates: list[Predictor | Skipped], inputs: Inputs,
                       tolerance: Tolerance, on_step=None, others: tuple[OtherOutput, ...] = ()) -> list[CheckRow]:
    """Run each candidate and compare it with the float64 reference (its other outputs with `others`, each by the
    same rule: one that fails fails the row); skipped ones keep their reason. `on_step` (text) hears what is about
    to run."""
    rows = []
    for candidate in candidates:
        if isinstance(candidate, Skipped):
            rows.append(CheckRow(candidate.backend, candidate.device, Status.SKIPPED, reason=candidate.reason, hint=candidate.hint))
            continue
        if on_step:
            on_step(f"running {candidate.backend} on {candidate.device} ({len(inputs.x):,} inputs)")
        try:
            found = candidate.outputs(inputs.x)
        except Unsupported as exc:  # the runtime cannot run a file that passed every check: said, not judged
            rows.append(CheckRow(candidate.backend, candidate.device, Status.SKIPPED, reason=str(exc)))
            continue
        logits = found[0]
        rule = replace(tolerance, factor=tolerance.factor * candidate.noise_scale,
                       floor_ulps=tolerance.floor_ulps * candidate.noise_scale)
        stats = compare(logits, reference, own_error, inputs.labels, rule, candidate.approximate, candidate.spec.probabilities)
        stats["precision"] = candidate.precision
        if not stats["passed"] and candidate.layers and "allowed_max_abs" in stats:
            stats["first_divergent_layer"] = where_it_broke(candidate, inputs.x, logits, reference, stats["allowed_max_abs"], rule)
        if others:
            stats["other_outputs"] = judged = other_outputs(candidate, found[1:], others, rule)
            stats["passed"] = stats["passed"] and all(v.get("passed", True) for v in judged.values())
        elif len(found) > 1:  # a reference of the logits alone (reference.npz): what it cannot judge is said
            stats["other_outputs_not_compared"] = (f"{candidate.source} returns {len(found) - 1} output(s) besides the "
                                                   "logits that nothing here judges: the reference holds the logits only")
        if candidate.left_float:
            if on_step:
                on_step(f"remaking {candidate.backend} with one layer left float32 at a time")
            stats["error_by_layer"] = error_by_layer(candidate, inputs.x, reference)
        if "undecided" in stats:
            rows.append(CheckRow(candidate.backend, candidate.device, Status.SKIPPED, str(candidate.source), stats,
                                 reason=stats["undecided"]))
            continue
        status = Status.PASS if stats["passed"] else Status.FAIL
        rows.append(CheckRow(candidate.backend, candidate.device, status, str(candidate.source), stats))
    return rows


def other_outputs(candidate: Predictor, found: tuple[np.ndarray, ...], others: tuple[OtherOutput, ...],
                  rule: Tolerance) -> dict[str, dict]:
    """Each other output's numbers against model.pt's (compare, as the logits are judged), by name; one the candidate
    does not return fails, unless it was only asked for its logits (a served model: said)."""
    if candidate.logits_only:
        return {other.name: {"passed": True, "not_compared": "only the logits were asked for"} for other in others}
    if len(found) != len(others):
        return {other.name: {"passed": False, "missing": f"{candidate.source} returns {len(found) + 1} outputs where "
                             f"model.pt has {len(others) + 1}"} for other in others}
    return {other.name: compare(values, other.reference, other.own_error, None, rule, candidate.approximate)
            for other, values in zip(others, found)}


LOCALISED_INPUTS = 8  # the failing inputs whose intermediate values are compared, layer by layer,
LOCALISED_BYTES = 512 << 20  # as many of them as keep every layer's float64 values within this


def where_it_broke(candidate: Predictor, x: np.ndarray, logits: np.ndarray, reference: np.ndarray, allowed: float,
                   rule: Tolerance) -> dict | None:
    """The first layer whose output leaves its noise band on the inputs that failed (the worst few), comparing the
    candidate's intermediate values with its checked program's, in float64 and float32, on the CPU. None when no
    input failed by the numbers or the runtime cannot show its values."""
    from fcexport.compare import first_out_of_band
    from fcexport.targets.program import reference_layers

    program, layers = candidate.layers
    errors = np.abs(logits.astype(np.float64) - reference).reshape(len(x), -1).max(axis=1)  # per input (all its pixels)
    worst = np.argsort(-np.nan_to_num(errors, nan=np.inf))[:LOCALISED_INPUTS]
    worst = worst[~(errors[worst] <= allowed)]
    if not len(worst):
        return None
    float64, float32 = reference_layers(program, np.ascontiguousarray(x[worst[:1]]))
    per_input = sum(value.nbytes for value in float64.values())
    worst = np.sort(worst[: max(1, min(len(worst), LOCALISED_BYTES // max(per_input, 1)))])
    if len(worst) > 1:
        float64, float32 = reference_layers(program, np.ascontiguousarray(x[worst]))
    try:
        found = layers(np.ascontiguousarray(x[worst]))
    except (FcxError, Unsupported):  # the runtime cannot run the copy that shows its values: the row still fails
        return None
    return first_out_of_band(float64, float32, found, rule.factor, rule.floor_ulps)


BY_LAYER_INPUTS = 256  # inputs, spread over the whole set, on which an approximate file is remade layer by layer


def error_by_layer(candidate: Predictor, x: np.ndarray, reference: np.ndarray) -> list[dict] | None:
    """For an approximate file: each layer's share of its error, measured by remaking the file with that layer left
    exact (mean |logit error| on BY_LAYER_INPUTS inputs, with and without, run in the same calls: an int8 file's
    activation scales follow the batch), largest first: what a user leaves unquantised. None when the runtime
    cannot remake the file."""
    chosen = np.linspace(0, len(x) - 1, min(len(x), BY_LAYER_INPUTS)).round().astype(int)
    x, reference = np.ascontiguousarray(x[chosen]), reference[chosen]
    base = float(np.abs(candidate(x).astype(np.float64) - reference).mean())
    try:
        remade = candidate.left_float()
        errors = {layer: float(np.abs(replace(candidate, run=run)(x).astype(np.float64) - reference).mean())
                  for layer, run in remade.items()}
    except (FcxError, Unsupported):
        return None
    found = [{"layer": layer, "mean_abs_left_float": error, "share": (base - error) / base if base > 0 else 0.0}
             for layer, error in errors.items()]
    return sorted(found, key=lambda row: -row["share"])


def with_problems(row: CheckRow, problems: list[str]) -> CheckRow:
    """Integrity, structure or spec problems fail a row whatever its numbers say."""
    if not problems:
        return row
    return replace(row, status=Status.FAIL, problems=tuple(problems), numbers={**row.numbers, "passed": False}, hint=None)


def inert(reference: np.ndarray) -> str | None:
    """When model.pt gives every input the same answer (timm zero-initialises some heads: an untrained gMLP's logits
    are its bias), no number can tell a changed layer before that: said in the verdict, as too few inputs are."""
    flat = reference.reshape(len(reference), -1)
    if len(flat) > 1 and bool(np.all(flat == flat[0])):
        return ("weak: model.pt gives every input the same output (an untrained head of zeros?): the numbers prove "
                "nothing about the layers before it")
    return None


def report(rows: list[CheckRow], inputs: Inputs, reference: np.ndarray, reference_accuracy: float | None, own_error: float,
           tolerance: Tolerance) -> ParityReport:
    weak = "; ".join(w for w in (inputs.weak, inert(reference)) if w) or None
    return ParityReport(tuple(rows), tolerance.describe(), own_error, tolerance, inputs.description, len(inputs.x), reference_accuracy,
                        weak)
