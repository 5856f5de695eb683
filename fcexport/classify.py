"""Image files in, classes and probabilities out, from any predictor (ONNX path never imports torch); for a
segmentation model, a mask and an overlay PNG per file (fcexport.masks) and each class's share of the pixels.

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
from fcexport.preprocess import INVERT_CHOICES, collect_image_files, image_and_placement, image_shape, prepare_image
from fcexport.targets import Predictor

BATCH_SIZE = 256  # images decoded and scored at a time: bounds memory for folders of any size
DENSE_BATCH_SIZE = 8  # a segmentation model's: each image's file pixels are kept to draw its overlay on
PREPARE_THREADS = max(1, min(4, os.cpu_count() or 1))


def class_probabilities(outputs: np.ndarray, probabilities: bool = False) -> np.ndarray:
    """(N, K) outputs -> each row's class probabilities: a softmax of logits, or the outputs as they are where the model
    already made them (spec.probabilities). One output is its class's probability (a sigmoid of a logit) beside the
    complement, (N, 2): "not X" first, as a one-logit mask is drawn."""
    if outputs.shape[1] == 1:
        p = outputs if probabilities else 1.0 / (1.0 + np.exp(-outputs))
        return np.concatenate([1.0 - p, p], axis=1)
    if probabilities:
        return outputs
    exp = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def predict_files(
    predictor: Predictor,
    inputs: list[str | Path],
    top_k: int = 3,
    invert: str = "auto",
    batch_size: int = BATCH_SIZE,
    save_prepared: Path | None = None,
    masks: Path = Path("masks"),
) -> Iterator[dict]:
    """Yield one row per image, in input order: a prediction, or {"file", "error"} for a bad file. A segmentation
    model's row has the classes covering most pixels ("shares") and the mask and overlay PNGs written into `masks`.

    With `save_prepared`, the image actually fed to the model is written there as a PNG per file."""
    if invert not in INVERT_CHOICES:
        raise FcxError(f"invert must be one of {', '.join(INVERT_CHOICES)}, got {invert}")
    if top_k < 1:
        raise FcxError(f"--top-k must be >= 1, got {top_k}")
    try:  # a model no image file fits is said once, not once per file
        image_shape(predictor.spec.input_shape)
    except FcxError as exc:
        raise FcxError(f"{predictor.source}: {exc}") from exc
    if predictor.spec.dense:
        batch_size = min(batch_size, DENSE_BATCH_SIZE)
        if Path(masks).exists() and not Path(masks).is_dir():
            raise FcxError(f"{masks}: --masks names a file; name a folder for the mask and overlay PNGs")
    return _predicted_rows(predictor, collect_image_files(str(i) for i in inputs), top_k, invert, batch_size, save_prepared,
                           Path(masks))


def _predicted_rows(predictor: Predictor, files: Iterator[Path], top_k: int, invert: str, batch_size: int,
                    save_prepared: Path | None, masks: Path) -> Iterator[dict]:
    """predict_files' rows once its options are checked (before the first row is asked for)."""
    spec = predictor.spec
    count = itertools.count()

    def prepare(file: Path) -> np.ndarray | tuple | FcxError:
        try:
            if spec.dense:
                return image_and_placement(file, spec.input_shape, spec.preprocess, invert)
            return prepare_image(file, spec.input_shape, spec.preprocess, invert)
        except FcxError as exc:
            return exc
        except Exception as exc:  # a decoder or NumPy failing on one odd file is that file's error, not the batch's
            return FcxError(f"{file}: could not be prepared ({type(exc).__name__}: {str(exc)[:200]})")

    # decoding (Pillow) and most array work release the GIL: one preparing thread per core, results in order
    with ThreadPoolExecutor(max_workers=PREPARE_THREADS) as pool:
        while chunk := list(itertools.islice(files, batch_size)):
            prepared = list(pool.map(prepare, chunk)) if len(chunk) > 1 else [prepare(chunk[0])]
            yield from _score(predictor, chunk, prepared, count, top_k, save_prepared, masks)


def _score(predictor: Predictor, chunk: list[Path], prepared: list, count, top_k: int, save_prepared: Path | None,
           masks: Path) -> Iterator[dict]:
    """The rows of one prepared chunk, in order: the good images scored in one call, the bad ones as errors."""
    good = [p for p in prepared if not isinstance(p, FcxError)]
    dense = predictor.spec.dense
    logits = iter(predictor(np.stack([p[0] if dense else p for p in good])) if good else [])
    for file, item in zip(chunk, prepared, strict=True):
        index = next(count)
        if isinstance(item, FcxError):
            yield {"file": str(file), "error": str(item)}
            continue
        pixels = item[0] if dense else item
        if save_prepared is not None:
            _save_prepared(pixels, Path(save_prepared) / f"{index:06d}_{file.stem}.png")
        if dense:
            yield _mask_row(file, next(logits), item[1], item[2], predictor, top_k, masks / f"{index:06d}_{file.stem}")
        else:
            yield _row(file, next(logits).astype(np.float64), predictor.spec, top_k, predictor.source)


def _mask_row(file: Path, logits: np.ndarray, placement, original: np.ndarray, predictor: Predictor, top_k: int,
              stem: Path) -> dict:
    """A segmentation model's row: the classes covering most of the file's pixels, its mask and overlay PNGs."""
    from fcexport.masks import UNSEEN, classes_on_image, shares, write_masks

    if not np.isfinite(logits).all():
        return {"file": str(file), "error": f"{_source_name(predictor.source)} returned non-finite logits (NaN or inf) for this image"}
    names = predictor.spec.class_names
    names = one_logit_names(names)
    mask = classes_on_image(logits, placement, predictor.spec.probabilities)
    if (mask == UNSEEN).all():  # a thin file whose centre crop falls between its pixels' centres
        return {"file": str(file), "error": f"the model saw none of this file's {mask.size:,} pixels (its centre crop "
                                            "is thinner than one of them); crop or pad the file"}
    covered = shares(mask, names, top_k)
    try:
        mask_path, overlay_path = write_masks(mask, original, len(names), stem)
    except FcxError as exc:
        return {"file": str(file), "error": str(exc)}
    except OSError as exc:  # a name too long, a folder that is a file, a full disk: this file's error, not the run's
        return {"file": str(file), "error": f"{stem.parent}: could not write this file's masks ({exc.strerror or exc})"}
    return {"file": str(file), "label": covered[0]["label"], "index": names.index(covered[0]["label"]),
            "share": covered[0]["share"], "shares": covered, "mask": str(mask_path), "overlay": str(overlay_path)}


def _source_name(source: Path | str) -> str:
    return Path(source).name if isinstance(source, Path) else str(source)


def one_logit_names(names) -> tuple[str, ...]:
    """The classes a prediction names: one logit decides between "not X" and X (its sign, or its probability's side
    of one half)."""
    return (f"not {names[0]}", names[0]) if len(names) == 1 else tuple(names)


def _row(file: Path, logits: np.ndarray, spec, top_k: int, source: Path | str) -> dict:
    if not np.isfinite(logits).all():
        return {"file": str(file), "error": f"{_source_name(source)} returned non-finite logits (NaN or inf) for this image"}
    probs = class_probabilities(logits[None], spec.probabilities)[0]
    names = one_logit_names(spec.class_names)
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
