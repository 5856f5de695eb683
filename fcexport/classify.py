"""Image files in, classes and probabilities out, from any predictor (ONNX path never imports torch).

Files are read, prepared and scored a batch at a time and each result is yielded as soon as its batch
is done, so memory stays flat and output streams for folders of any size. A file that cannot be
read or scored becomes an error row ({"file", "error"}); the others go on.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fcexport.errors import FcxError
from fcexport.preprocess import INVERT_CHOICES, collect_image_files, prepare_image
from fcexport.targets import Predictor

BATCH_SIZE = 256  # images decoded and scored at a time: bounds memory for folders of any size
PREPARE_THREADS = max(1, min(4, os.cpu_count() or 1))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def predict_files(
    predictor: Predictor,
    inputs: list[str | Path],
    top_k: int = 3,
    invert: str = "auto",
    batch_size: int = BATCH_SIZE,
    save_prepared: Path | None = None,
) -> Iterator[dict]:
    """Yield one row per image, in input order: a prediction, or {"file", "error"} for a bad file.

    With `save_prepared`, the image actually fed to the model is written there as a PNG per file."""
    if invert not in INVERT_CHOICES:
        raise FcxError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert}")
    if top_k < 1:
        raise FcxError(f"--top-k must be >= 1, got {top_k}")
    return _predicted_rows(predictor, collect_image_files(str(i) for i in inputs), top_k, invert, batch_size, save_prepared)


def _predicted_rows(predictor: Predictor, files: Iterator[Path], top_k: int, invert: str, batch_size: int,
                    save_prepared: Path | None) -> Iterator[dict]:
    """predict_files' rows once its options are checked (before the first row is asked for)."""
    spec = predictor.spec
    count = itertools.count()

    def prepare(file: Path) -> np.ndarray | FcxError:
        try:
            return prepare_image(file, spec.input_shape, spec.preprocess, invert)
        except FcxError as exc:
            return exc
        except Exception as exc:  # a decoder or NumPy failing on one odd file is that file's error, not the batch's
            return FcxError(f"{file}: could not be prepared ({type(exc).__name__}: {str(exc)[:200]})")

    # decoding (Pillow) and most array work release the GIL: one preparing thread per core, results in order
    with ThreadPoolExecutor(max_workers=PREPARE_THREADS) as pool:
        while chunk := list(itertools.islice(files, batch_size)):
            prepared = list(pool.map(prepare, chunk)) if len(chunk) > 1 else [prepare(chunk[0])]
            yield from _score(predictor, chunk, prepared, count, top_k, save_prepared)


def _score(predictor: Predictor, chunk: list[Path], prepared: list, count, top_k: int, save_prepared: Path | None) -> Iterator[dict]:
    """The rows of one prepared chunk, in order: the good images scored in one call, the bad ones as errors."""
    good = [p for p in prepared if not isinstance(p, FcxError)]
    logits = iter(predictor(np.stack(good)).astype(np.float64) if good else [])
    for file, pixels in zip(chunk, prepared, strict=True):
        index = next(count)
        if isinstance(pixels, FcxError):
            yield {"file": str(file), "error": str(pixels)}
            continue
        if save_prepared is not None:
            _save_prepared(pixels, Path(save_prepared) / f"{index:06d}_{file.stem}.png")
        yield _row(file, next(logits), predictor.spec.class_names, top_k, predictor.source)


def _row(file: Path, logits: np.ndarray, names: list[str], top_k: int, source: Path | str) -> dict:
    if not np.isfinite(logits).all():
        return {"file": str(file), "error": f"{Path(source).name if isinstance(source, Path) else source} returned non-finite logits (NaN or inf) for this image"}
    probs = softmax(logits[None])[0]
    order = np.argsort(-probs, kind="stable")[: min(top_k, len(names))]
    return {
        "file": str(file),
        "label": names[order[0]],
        "index": int(order[0]),
        "probability": float(probs[order[0]]),
        "top": [{"label": names[i], "probability": float(probs[i])} for i in order],
    }


def _save_prepared(pixels: np.ndarray, path: Path) -> None:
    """(C, H, W) in [0, 1] -> an 8-bit PNG (gray or RGB), as the model saw it."""
    from PIL import Image

    from fcexport.files import atomic_path

    array = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)[..., :3])
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
