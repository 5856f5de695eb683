"""Pure numerics: how far a candidate's logits are from the float64 reference, and whether that passes.

The reference is model.pt run in float64. By default a candidate passes when its largest error is within
`factor` times the largest error of model.pt itself in float32 on the same inputs (its own rounding
noise, the larger of two draws: targets.program.every_answer): deep random-weight nets with logits of 1e3 and more pass when they compute the same function and
fail when they do not, where a fixed atol could not tell. Explicit atol/rtol switch to Polygraphy's
element-wise rule (within atol OR within rtol of the reference). An approximate (int8) candidate is
judged by top-1 agreement and accuracy drop. Swap `compare` for another function freely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fcexport.errors import FcxError

FLOAT32_EPS = float(np.finfo(np.float32).eps)
# Errors below 8 float32 steps of the largest logit always pass: on a small model the own error is a step or two, and
# an honest runtime summing in another order was measured up to 3.9 steps (onnxruntime, a Conv + Linear net with 3
# classes over 165 seeds; 2 of them failed a 2-step floor at 4.1x and 5.7x the own error). A runtime with float32
# kernels of its own has its floor scaled with its factor (OpenVINO: 16 steps; it reached 8.8 on an honest
# Conv + global max and average pool net's first-layer probes, 2026-12-07).
NOISE_FLOOR_ULPS = 8
# An approximate result is judged on decisive inputs only: those whose reference top-1 leads the runner-up by more than
# DECISIVE_MARGIN of the input's largest |logit| (per pixel: of the image's; see decisive_rows). bf16 rounds each value
# by 0.4%, int8 weights by up to 0.4% of their range: a flip there is a real change, where a near-tie flips on rounding
# alone. Fewer than MIN_DECISIVE such inputs is no verdict, not a failure.
DECISIVE_MARGIN = 0.05
MIN_DECISIVE = 64


@dataclass(frozen=True)
class Tolerance:
    """When a candidate passes. `factor`: at most this many times model.pt's own float32 error (the
    default rule); `atol`/`rtol`: given, an element-wise rule instead; an approximate (int8) backend must
    agree on the top-1 class for `min_agreement` of the inputs and lose at most `max_accuracy_drop`
    accuracy (a fraction: 0.01 = one point) on the labelled ones."""

    factor: float = 4.0
    atol: float | None = None
    rtol: float | None = None
    min_agreement: float = 0.99
    max_accuracy_drop: float = 0.01
    floor_ulps: float = NOISE_FLOOR_ULPS  # the default rule never asks for less than this many float32 steps

    def __post_init__(self):
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise FcxError(f"the noise factor must be a finite number >= 1, got {self.factor}")
        if not all(v is None or (math.isfinite(v) and v >= 0) for v in (self.atol, self.rtol)):
            raise FcxError(f"atol and rtol must be finite and >= 0, got {self.atol} and {self.rtol}")
        if not (math.isfinite(self.floor_ulps) and self.floor_ulps >= 0):
            raise FcxError(f"the noise floor must be a finite number of float32 steps >= 0, got {self.floor_ulps}")
        if not (0 <= self.min_agreement <= 1 and 0 <= self.max_accuracy_drop <= 1):
            raise FcxError(f"int8 agreement and max drop must be in [0, 1], got {self.min_agreement} and {self.max_accuracy_drop}")

    @property
    def elementwise(self) -> bool:
        return self.atol is not None or self.rtol is not None

    def describe(self) -> str:
        if self.elementwise:
            return f"|diff| <= atol {self.atol or 0:g} or <= rtol {self.rtol or 0:g} * |reference|"
        return (f"max abs error <= {self.factor:g} x model.pt's own float32 error (the larger of two draws of its "
                f"rounding; both against model.pt in float64; "
                f"never below {self.floor_ulps:g} float32 steps of the largest logit)")


def error_stats(candidate: np.ndarray, reference: np.ndarray) -> dict:
    """Max / mean / p99 absolute error and max relative error against the reference."""
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    rel = diff / np.maximum(np.abs(reference), np.finfo(np.float32).tiny)
    return {
        "max_abs": float(diff.max(initial=0.0)),
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "p99_abs": float(np.percentile(diff, 99)) if diff.size else 0.0,
        "max_rel": float(rel.max(initial=0.0)),
    }


def allowed_error(own_error: float, reference: np.ndarray, factor: float, floor_ulps: float = NOISE_FLOOR_ULPS) -> float:
    """The largest max-abs error the default rule accepts: factor x own error, never below the noise floor (`floor_ulps`
    float32 steps of the largest |reference|)."""
    floor = floor_ulps * FLOAT32_EPS * float(np.abs(reference).max(initial=0.0))
    return max(factor * own_error, floor)


def compare(candidate: np.ndarray, reference: np.ndarray, own_error: float, labels: np.ndarray | None,
            tolerance: Tolerance, approximate: bool = False, probabilities: bool = False) -> dict:
    """error_stats plus top-1 agreement with the reference, accuracy on the labelled rows and `passed` (`probabilities`:
    the outputs are the model's own probabilities, spec.probabilities)."""
    if candidate.shape != reference.shape:
        return {"shape_mismatch": f"{candidate.shape} vs reference {reference.shape}", "passed": False}
    row = error_stats(candidate, reference)
    finite = bool(np.isfinite(candidate).all() and np.isfinite(reference).all())  # nothing passes beside an inf
    ours, theirs = decisions(candidate, probabilities), decisions(reference, probabilities)  # per input or pixel, once
    agree = ours == theirs
    row["top1_agreement"] = float(agree.mean())
    row["accuracy"] = accuracy(candidate, labels)
    row["noise_ratio"] = row["max_abs"] / own_error if own_error > 0 else None
    if approximate:
        reference_accuracy = accuracy(reference, labels)
        drop = None if reference_accuracy is None else reference_accuracy - row["accuracy"]
        slack = 1e-9  # shares are k/n in float64: exactly-at-the-limit must not fail on rounding
        decisive = decisive_rows(reference, probabilities)
        row |= {"criterion": "agreement", "accuracy_drop": drop, "decisive_inputs": int(decisive.sum()),
                "decisive_agreement": float(agree[decisive].mean()) if decisive.any() else None}
        if reference.ndim == 4:  # per-pixel classes: how well the masks overlap, as a segmentation user measures it
            row["mean_iou"] = mean_iou(ours, theirs)
        if decisive.sum() < MIN_DECISIVE:
            row["undecided"] = (f"not enough decisive inputs: {int(decisive.sum())} of {len(reference)} lead by more than "
                                f"{DECISIVE_MARGIN:.0%} of their largest logit ({MIN_DECISIVE} needed)")
        row["passed"] = (finite and "undecided" not in row and row["decisive_agreement"] >= tolerance.min_agreement - slack
                         and (drop is None or drop <= tolerance.max_accuracy_drop + slack))
    elif tolerance.elementwise:
        diff = np.abs(candidate.astype(np.float64) - reference)
        within = (diff <= (tolerance.atol or 0.0)) | (diff <= (tolerance.rtol or 0.0) * np.abs(reference))
        row |= {"criterion": "tolerance", "passed": finite and bool(within.all())}
    else:
        row["allowed_max_abs"] = allowed_error(own_error, reference, tolerance.factor, tolerance.floor_ulps)
        row["noise_factor"], row["noise_floor_steps"] = tolerance.factor, tolerance.floor_ulps
        row |= {"criterion": "noise", "passed": finite and row["max_abs"] <= row["allowed_max_abs"]}
    return row


def first_out_of_band(reference: dict, own: dict, candidate: dict, factor: float,
                      floor_ulps: float = NOISE_FLOOR_ULPS) -> dict | None:
    """The first layer (in program order) whose output in `candidate` is further from the float64 `reference` than
    `factor` times the program's own float32 error there (never below the noise floor): where a runtime broke."""
    for layer, (kind, value) in candidate.items():
        if layer not in reference or reference[layer].shape != value.shape:
            continue
        expected = reference[layer].astype(np.float64)
        band = allowed_error(float(np.abs(own[layer] - expected).max(initial=0.0)), expected, factor, floor_ulps)
        error = float(np.abs(value.astype(np.float64) - expected).max(initial=0.0))
        if not error <= band:  # NaN too
            return {"layer": layer, "layer_type": kind, "max_abs": error, "band": band}
    return None


def decisions(logits: np.ndarray, probabilities: bool = False) -> np.ndarray:
    """The class each input (or each pixel of per-pixel logits) is given: the top-1, or for one logit its sign (for
    one probability, its side of one half)."""
    return logits.argmax(1) if logits.shape[1] > 1 else logits[:, 0] > one_output_cut(probabilities)


def one_output_cut(probabilities: bool) -> float:
    """Where a model with one output decides between its class and the rest: a logit's 0, a probability's 1/2."""
    return 0.5 if probabilities else 0.0


def mean_iou(candidate: np.ndarray, reference: np.ndarray) -> float:
    """The mean over the classes present in either of |both| / |either| of their pixels (a segmentation's usual score)."""
    classes = np.union1d(np.unique(candidate), np.unique(reference))
    scores = [np.logical_and(candidate == k, reference == k).sum() / np.logical_or(candidate == k, reference == k).sum() for k in classes]
    return float(np.mean(scores)) if scores else 1.0


def decisive_rows(reference: np.ndarray, probabilities: bool = False) -> np.ndarray:
    """Rows (pixels, for per-pixel logits) whose top-1 leads the runner-up (one logit: 0) by more than DECISIVE_MARGIN
    of the largest |logit| of its input (of its whole image for per-pixel logits, where a pixel's own logits may all
    be near zero; of every input for one logit, which is its own largest)."""
    classes = reference.shape[1]
    if classes < 2:
        centred = reference - one_output_cut(probabilities)
        lead, scale = np.abs(centred[:, 0]), np.abs(centred).max(initial=0.0)
    else:
        top2 = np.partition(reference, classes - 2, axis=1)  # [:, -1] the largest, [:, -2] the runner-up
        lead, scale = top2[:, -1] - top2[:, -2], np.abs(reference).max(axis=1)
    if reference.ndim == 4 and classes >= 2:
        scale = scale.max(axis=(1, 2), keepdims=True)
    return lead > DECISIVE_MARGIN * scale


def accuracy(logits: np.ndarray, labels: np.ndarray | None) -> float | None:
    """Top-1 accuracy on the first len(labels) rows (the real images), None without labels."""
    if labels is None or not len(labels):
        return None
    return float((logits[: len(labels)].argmax(1) == labels).mean())
