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


def make_inputs(spec: ModelSpec, data: str | None = None, data_root: str | None = None, seed: int = 0) -> Inputs:
    """Real test images (from `data`, or the model's dataset when it is on disk) plus random pixels."""
    from fcexport.data import load_dataset

    shape = spec.input_shape
    random = np.random.default_rng(seed).random((RANDOM_INPUTS, *shape), dtype=np.float32)
    dataset = spec.dataset or {}
    source = data or dataset.get("source")
    if source is None:
        return Inputs(random, None, f"{RANDOM_INPUTS} random inputs (no dataset recorded; name one to add real images)")
    try:
        test = load_dataset(source, data_root or dataset.get("root"), image_size=shape[-1], download=False).test
    except FcxError as exc:
        if data:  # the user asked for this data explicitly: a problem with it is an error
            raise
        return Inputs(random, None, f"{RANDOM_INPUTS} random inputs (dataset not available here: {exc})")
    if list(test.images.shape[1:]) != list(shape):
        raise FcxError(f"data {source}: images are {list(test.images.shape[1:])} but the model expects {shape}")
    real = test.images.numpy()
    return Inputs(np.concatenate([real, random]), test.labels.numpy(), f"{len(real)} test images of {source} + {RANDOM_INPUTS} random inputs")


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
