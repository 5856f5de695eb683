"""Pure numerics: how far a candidate's logits are from the reference's, and whether that passes.

In the spirit of Polygraphy's comparator: an element passes when it is within atol OR within rtol
of the reference; a candidate passes when every element does. An approximate (int8) candidate is
judged by top-1 agreement and accuracy drop instead. Swap `compare` for another function freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fcexport.errors import FcxError


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
        if not all(math.isfinite(v) and v >= 0 for v in (self.atol, self.rtol)):
            raise FcxError(f"atol and rtol must be finite and >= 0, got {self.atol} and {self.rtol}")
        if not (0 <= self.min_agreement <= 1 and 0 <= self.max_accuracy_drop <= 1):
            raise FcxError(f"int8 agreement and max drop must be in [0, 1], got {self.min_agreement} and {self.max_accuracy_drop}")


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


def compare_weights(expected: dict[str, np.ndarray], found: list[np.ndarray], min_size: int = 2) -> list[str]:
    """What an artifact's tensors lack or add against the reference's, as readable problems.

    Every expected float tensor of `min_size` elements or more must appear in `found` with the same
    shape (or transposed, for 2-D) and equal values within float32 rounding; any float tensor left
    over that large is an addition (an extra unit, a changed layer). Swapped rows, an extra unit or a
    changed weight all leave an expected tensor unmatched.
    """
    pool = [np.asarray(t) for t in found if np.issubdtype(np.asarray(t).dtype, np.floating)]
    used = [False] * len(pool)
    problems = []
    for name, tensor in sorted(expected.items(), key=lambda kv: -kv[1].size):
        if tensor.size < min_size:
            continue
        match = next((i for i, t in enumerate(pool) if not used[i] and _same_tensor(tensor, t)), None)
        if match is None:
            problems.append(f"{name} {tuple(tensor.shape)} is not in the artifact with its values")
        else:
            used[match] = True
    extras = [t.shape for i, t in enumerate(pool) if not used[i] and t.size >= min_size]
    if extras:
        problems.append(f"the artifact holds {len(extras)} tensor(s) the model does not: {', '.join(str(tuple(s)) for s in extras[:3])}")
    return problems


def _same_tensor(expected: np.ndarray, candidate: np.ndarray) -> bool:
    for view in (candidate, candidate.T if candidate.ndim == 2 else None):
        if view is not None and view.shape == expected.shape:
            scale = float(np.abs(expected).max(initial=0.0))
            if np.allclose(view.astype(np.float64), expected.astype(np.float64), rtol=1e-6, atol=1e-7 * scale + 1e-30):
                return True
    return False
