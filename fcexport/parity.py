"""Parity of candidates against a reference: inputs, one comparison row per backend x device, a report.

Runners (fcexport.runtimes) produce logits and fcexport.compare judges them; this module only picks
the inputs, runs each candidate and collects typed rows into the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fcexport.artifacts import APPROXIMATE_BACKENDS
from fcexport.compare import Tolerance, compare
from fcexport.errors import FcxError
from fcexport.runtimes import Predictor
from fcexport.spec import ModelSpec

RANDOM_INPUTS = 256


@dataclass
class Inputs:
    """Verification inputs: real images first (with labels when known), then uniform random pixels."""

    x: np.ndarray
    labels: np.ndarray | None  # labels of the first len(labels) rows
    description: str


@dataclass
class Skipped:
    """A candidate that cannot run here, with the reason (and the errors.HINTS step that would fix it)."""

    backend: str
    device: str
    reason: str
    hint: str | None = None


SPEC_FIELDS = ("class_names", "input_shape", "normalization", "preprocess")  # what must match the model's spec


def probe_inputs(model, spec: ModelSpec) -> np.ndarray:
    """One input per unit of the model's first Linear or Conv, lit where that unit's weights are
    positive: real and random images may never drive some units hard, these do."""
    import torch

    first = next((m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))), None)
    channels, height, width = spec.input_shape
    if isinstance(first, torch.nn.Linear) and first.in_features == channels * height * width:
        lit = first.weight.detach() > 0
    elif isinstance(first, torch.nn.Conv2d) and first.in_channels == channels and first.groups == 1:
        kh, kw = first.kernel_size
        tiles = (first.weight.detach() > 0).repeat(1, 1, -(-height // kh), -(-width // kw))
        lit = tiles[:, :, :height, :width]
    else:
        return np.zeros((0, *spec.input_shape), dtype=np.float32)
    return lit.float().reshape(-1, *spec.input_shape).numpy()


def spec_differences(reference: ModelSpec, candidate: ModelSpec) -> list[str]:
    """The spec fields an artifact must carry unchanged (a swapped class name relabels every answer)."""
    ref, cand = reference.to_dict(), candidate.to_dict()
    return [f"its {name} differ from model.pt's" for name in SPEC_FIELDS if ref[name] != cand[name]]


def make_inputs(spec: ModelSpec, data: str | None = None, data_root: str | None = None, seed: int = 0,
                probes: np.ndarray | None = None) -> Inputs:
    """Real test images (from `data`, or the model's dataset when it is on disk), then random pixels and
    `probes` (see probe_inputs)."""
    from fcexport.data import load_dataset

    shape = spec.input_shape
    random = np.random.default_rng(seed).random((RANDOM_INPUTS, *shape), dtype=np.float32)
    if probes is not None and len(probes):
        random = np.concatenate([random, probes])
    dataset = spec.dataset or {}
    source = data or dataset.get("source")
    if source is None:
        return Inputs(random, None, f"{_extra(probes)} (no dataset recorded; name one to add real images)")
    try:
        test_source = None if data else dataset.get("test_source")
        test = load_dataset(source, data_root or dataset.get("root"), image_size=shape[-1], download=False, test_data=test_source).test
    except FcxError as exc:
        if data:  # the user asked for this data explicitly: a problem with it is an error
            raise
        return Inputs(random, None, f"{_extra(probes)} (dataset not available here: {exc})")
    if list(test.images.shape[1:]) != list(shape):
        raise FcxError(f"data {source}: images are {list(test.images.shape[1:])} but the model expects {shape}")
    real = test.images.numpy()
    return Inputs(np.concatenate([real, random]), test.labels.numpy(), f"{len(real)} test images of {source} + {_extra(probes)}")


def _extra(probes: np.ndarray | None) -> str:
    count = 0 if probes is None else len(probes)
    return f"{RANDOM_INPUTS} random inputs" + (f" + {count} first-layer probes" if count else "")


def compare_predictors(reference: np.ndarray, candidates: list[Predictor | Skipped], inputs: Inputs, tolerance: Tolerance) -> list[dict]:
    """Run each candidate and compare it with the reference logits; skipped ones keep their reason."""
    rows = []
    for candidate in candidates:
        if isinstance(candidate, Skipped):
            rows.append({"backend": candidate.backend, "device": candidate.device, "status": "skipped",
                         "reason": candidate.reason, "hint": candidate.hint})
            continue
        approximate = candidate.backend in APPROXIMATE_BACKENDS
        stats = compare(candidate(inputs.x), reference, inputs.labels, tolerance, approximate)
        status = "pass" if stats["passed"] else "fail"
        rows.append({"backend": candidate.backend, "device": candidate.device, "status": status, "source": str(candidate.source), **stats})
    return rows


def add_problems(row: dict, problems: list[str]) -> None:
    """Integrity, structure or spec problems fail a row whatever its numbers say."""
    if problems:
        row["problems"] = problems
        row["status"] = "fail"
        row["passed"] = False


def report(rows: list[dict], inputs: Inputs, reference_accuracy: float | None, tolerance: Tolerance) -> dict:
    """Passed only when something ran and everything that ran passed."""
    ran = [r for r in rows if r["status"] != "skipped"]
    return {
        "passed": bool(ran) and all(r["status"] == "pass" for r in ran),
        "ran": len(ran),
        "atol": tolerance.atol,
        "rtol": tolerance.rtol,
        "int8_min_agreement": tolerance.min_agreement,
        "int8_max_accuracy_drop": tolerance.max_accuracy_drop,
        "inputs": inputs.description,
        "reference_accuracy": reference_accuracy,
        "rows": rows,
    }
