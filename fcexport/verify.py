"""Numerical parity: every candidate backend x device against the unfused eval-mode reference.

Runners (fcexport.backends) produce logits; this module only compares arrays and builds the
report, in the spirit of Polygraphy's comparator. An element passes when it is within atol OR
within rtol of the reference; a candidate passes when every element does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fcexport.backends import APPROXIMATE_BACKENDS, BACKENDS, BackendUnavailable, Predictor, module_predictor, open_backend
from fcexport.errors import FcxError, check_choices
from fcexport.files import sha256_file

RANDOM_INPUTS = 256
CANDIDATES = BACKENDS
DEVICES = ("cpu", "cuda")


@dataclass
class Inputs:
    """Verification inputs: real images first (with labels when known), then uniform random pixels."""

    x: np.ndarray
    labels: np.ndarray | None  # labels of the first len(labels) rows
    description: str


@dataclass(frozen=True)
class Tolerance:
    """When a candidate passes. atol/rtol apply to exact backends, element by element; an approximate
    (int8) backend must agree on the top-1 class for `min_agreement` of the inputs and lose at most
    `max_accuracy_drop` accuracy (a fraction: 0.01 = one point) on the labelled ones."""

    atol: float = 1e-5
    rtol: float = 1e-4
    min_agreement: float = 0.99
    max_accuracy_drop: float = 0.01

    def __post_init__(self):
        if not (self.atol >= 0 and self.rtol >= 0):
            raise FcxError(f"--atol and --rtol must be >= 0, got {self.atol} and {self.rtol}")
        if not (0 <= self.min_agreement <= 1 and 0 <= self.max_accuracy_drop <= 1):
            raise FcxError(f"--int8-agreement and --int8-max-drop must be in [0, 1], got {self.min_agreement} and {self.max_accuracy_drop}")


def error_stats(candidate: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> dict:
    """Max / mean / p99 absolute error, max relative error, and the smallest tolerances that pass."""
    cand, ref = candidate.astype(np.float64), reference.astype(np.float64)
    if cand.shape != ref.shape:
        return {"shape_mismatch": f"{cand.shape} vs reference {ref.shape}", "passed": False}
    diff = np.abs(cand - ref)
    magnitude = np.abs(ref)
    rel = diff / np.maximum(magnitude, np.finfo(np.float32).tiny)
    finite = bool(np.isfinite(cand).all())
    within_rtol = diff <= rtol * magnitude
    within_atol = diff <= atol
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "p99_abs": float(np.percentile(diff, 99)),
        "max_rel": float(rel.max()),
        # smallest atol that passes with this rtol, and smallest rtol that passes with this atol
        "needed_atol": float(diff[~within_rtol].max(initial=0.0)),
        "needed_rtol": float(rel[~within_atol].max(initial=0.0)),
        "passed": finite and bool((within_atol | within_rtol).all()),
    }


def compare(candidate: np.ndarray, reference: np.ndarray, labels: np.ndarray | None, tolerance: Tolerance,
            approximate: bool = False) -> dict:
    """error_stats plus top-1 agreement with the reference and accuracy on the labelled rows.

    `passed` follows atol/rtol, or for an approximate candidate, agreement and accuracy drop.
    """
    row = error_stats(candidate, reference, tolerance.atol, tolerance.rtol)
    if "shape_mismatch" in row:
        return row
    row["top1_agreement"] = float((candidate.argmax(1) == reference.argmax(1)).mean())
    row["accuracy"] = accuracy(candidate, labels)
    row["criterion"] = "agreement" if approximate else "tolerance"
    if approximate:
        reference_accuracy = accuracy(reference, labels)
        drop = None if reference_accuracy is None else reference_accuracy - row["accuracy"]
        row["accuracy_drop"] = drop
        slack = 1e-9  # shares are k/n in float64: exactly-at-the-limit must not fail on rounding
        row["passed"] = (
            bool(np.isfinite(candidate).all())
            and row["top1_agreement"] >= tolerance.min_agreement - slack
            and (drop is None or drop <= tolerance.max_accuracy_drop + slack)
        )
    return row


def accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    """Top-1 accuracy on the first len(labels) rows (the real images), None without labels."""
    if labels is None or not len(labels):
        return None
    return float((logits[: len(labels)].argmax(1) == labels).mean())


def make_inputs(checkpoint: dict, data: str | None = None, data_root: str | None = None, seed: int = 0) -> Inputs:
    """Real test images (from --data, or the checkpoint's dataset when it is on disk) plus random pixels."""
    from fcexport.data import load_dataset

    shape = checkpoint["input_shape"]
    random = np.random.default_rng(seed).random((RANDOM_INPUTS, *shape), dtype=np.float32)
    source = data or (checkpoint.get("dataset") or {}).get("source")
    if source is None:
        return Inputs(random, None, f"{RANDOM_INPUTS} random inputs (no dataset recorded; pass --data)")
    try:
        root = data_root or (checkpoint.get("dataset") or {}).get("root")
        test = load_dataset(source, root, image_size=shape[-1], download=False).test
    except FcxError as exc:
        if data:  # the user asked for this data explicitly: a problem with it is an error
            raise
        return Inputs(random, None, f"{RANDOM_INPUTS} random inputs (dataset not available here: {exc})")
    if list(test.images.shape[1:]) != list(shape):
        raise FcxError(f"--data {source}: images are {list(test.images.shape[1:])} but the model expects {shape}")
    real = test.images.numpy()
    return Inputs(np.concatenate([real, random]), test.labels.numpy(), f"{len(real)} test images of {source} + {RANDOM_INPUTS} random inputs")


def compare_predictors(reference: np.ndarray, candidates: list, inputs: Inputs, tolerance: Tolerance) -> list[dict]:
    """Run each candidate (a Predictor, or (backend, device, reason) when unavailable) and compare it."""
    rows = []
    for candidate in candidates:
        if not isinstance(candidate, Predictor):
            backend, device, reason = candidate
            rows.append({"backend": backend, "device": device, "status": "skipped", "reason": reason})
            continue
        approximate = candidate.backend in APPROXIMATE_BACKENDS
        stats = compare(candidate(inputs.x), reference, inputs.labels, tolerance, approximate)
        status = "pass" if stats["passed"] else "fail"
        rows.append({"backend": candidate.backend, "device": candidate.device, "status": status, "source": str(candidate.source), **stats})
    return rows


def report(rows: list[dict], inputs: Inputs, reference_accuracy: float | None, tolerance: Tolerance) -> dict:
    ran = [r for r in rows if r["status"] != "skipped"]
    return {
        "passed": bool(ran) and all(r["status"] == "pass" for r in ran),
        "atol": tolerance.atol,
        "rtol": tolerance.rtol,
        "int8_min_agreement": tolerance.min_agreement,
        "int8_max_accuracy_drop": tolerance.max_accuracy_drop,
        "inputs": inputs.description,
        "reference_accuracy": reference_accuracy,
        "rows": rows,
    }


def run(
    artifacts: Path,
    backends=CANDIDATES,
    devices=DEVICES,
    data: str | None = None,
    data_root: str | None = None,
    tolerance: Tolerance = Tolerance(),
) -> dict:
    """`fcx verify`: the unfused model.pt on cpu is the reference; every other backend x device is compared."""
    from fcexport.checkpoint import artifact_metadata, load_model
    check_choices("--backends", backends, CANDIDATES)
    check_choices("--devices", devices, DEVICES)
    reference_path = artifacts / "model.pt"
    model, checkpoint = load_model(reference_path)
    inputs = make_inputs(checkpoint, data, data_root)
    reference = module_predictor(model, "eager", "cpu", reference_path, artifact_metadata(checkpoint))(inputs.x)
    candidates = []
    for device in devices:
        for backend in backends:
            if (backend, device) == ("eager", "cpu"):
                continue  # that is the reference itself
            try:
                candidates.append(open_backend(backend, artifacts, device))
            except BackendUnavailable as exc:
                candidates.append((backend, device, str(exc)))
    rows = compare_predictors(reference, candidates, inputs, tolerance)
    note_other_sources(rows, candidates, sha256_file(reference_path))
    return report(rows, inputs, accuracy(reference, inputs.labels), tolerance)


def note_other_sources(rows: list[dict], candidates: list, reference_sha256: str) -> None:
    """Flag artifacts made from another checkpoint than the reference: the usual cause of a failure is a stale export."""
    for row, candidate in zip(rows, candidates, strict=True):
        source = candidate.metadata.get("provenance", {}).get("source_sha256") if isinstance(candidate, Predictor) else None
        if source and source != reference_sha256:
            row["note"] = f"made from another checkpoint than this model.pt (source sha256 {source[:12]}); re-run fuse-bn/export?"
