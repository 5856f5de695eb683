"""Image files in, classes and probabilities out, from any predictor (ONNX path never imports torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from fcexport.errors import FcxError
from fcexport.preprocess import INVERT_CHOICES, batches_of_images, collect_image_files
from fcexport.runtimes import Predictor

BATCH_SIZE = 256  # images decoded and scored at a time: bounds memory for folders of any size


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def predict_files(
    predictor: Predictor, inputs: list[str | Path], top_k: int = 3, invert: str = "auto", batch_size: int = BATCH_SIZE
) -> Iterator[dict]:
    """Yield one result per image, in input order, batch by batch; preparation follows the model's spec."""
    if invert not in INVERT_CHOICES:
        raise FcxError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert}")
    if top_k < 1:
        raise FcxError(f"top-k must be >= 1, got {top_k}")
    spec = predictor.spec
    names = spec.class_names
    files = collect_image_files([str(i) for i in inputs])
    k = min(top_k, len(names))
    for chunk, pixels in batches_of_images(files, spec.input_shape, spec.preprocess, invert, batch_size):
        probabilities = softmax(predictor(pixels).astype(np.float64))
        for file, probs in zip(chunk, probabilities, strict=True):
            order = np.argsort(-probs, kind="stable")[:k]
            yield {
                "file": str(file),
                "label": names[order[0]],
                "index": int(order[0]),
                "probability": float(probs[order[0]]),
                "top": [{"label": names[i], "probability": float(probs[i])} for i in order],
            }
