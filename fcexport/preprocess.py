"""Image file -> model input, with Pillow and NumPy only (no torch: `fcx predict` on ONNX stays fast).

Fashion-MNIST was made by trimming each photo to the object, resizing its longest side to 28,
and negating it: a light object on a dark background. We do the same to any file: grayscale,
invert when its border is light, trim to the object, fit it (aspect kept) into the share of the
frame that objects fill in the training data ("object_fill", 1.0 for Fashion-MNIST, about 0.7
for MNIST's 20x20 box in 28x28), and centre it on background. A file already at the model's
input size is taken to be dataset-style and only inverted if needed.

Models whose spec asks for "letterbox" (colour models, imported ones) get the plain preparation
instead: the model's channels, resized with aspect kept, padded with black. Either way the
image's EXIF orientation is applied first.
"""

from __future__ import annotations

import contextlib
import glob
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from fcexport.errors import FcxError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
OBJECT_THRESHOLD = 0.1  # a pixel brighter than this (after inversion) belongs to the object
MIN_SIDE = 4
MAX_PIXELS = 40_000_000  # 40 megapixels: larger files are refused before decoding to bound memory
INVERT_CHOICES = ("auto", "yes", "no")


def prepare_image(path: str | os.PathLike, input_shape: list[int], preprocess: dict, invert: str = "auto") -> np.ndarray:
    """One image file -> float32 (C, H, W) in [0, 1], prepared as the model's spec says (fcexport.spec)."""
    channels, height, width = input_shape
    if preprocess.get("mode") == "letterbox":
        return letterbox_image(Path(path), channels, (height, width))
    gray = load_image(path, (height, width), invert, preprocess.get("object_fill", 1.0))
    return np.repeat(gray[None], channels, axis=0)


def letterbox_image(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """Colour (or gray) pixels resized with aspect kept into `size`, centred on black: (C, H, W)."""
    from PIL import Image

    with _open_image(path) as img:
        rgb = img.convert("RGB" if channels == 3 else "L")
        out_h, out_w = size
        scale = min(out_h / rgb.height, out_w / rgb.width)
        new_w, new_h = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
        resized = np.asarray(rgb.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    resized = resized.reshape(new_h, new_w, -1).transpose(2, 0, 1)
    canvas = np.zeros((resized.shape[0], out_h, out_w), dtype=np.float32)
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = resized
    return np.repeat(canvas, channels, axis=0) if canvas.shape[0] != channels else canvas


def load_image(path: str | os.PathLike, size: tuple[int, int], invert: str = "auto", object_fill: float = 1.0) -> np.ndarray:
    """Read one image file and return float32 (H, W) pixels in [0, 1], light object on dark."""
    with _open_image(Path(path)) as img:
        gray = _to_gray_array(img)
    if invert == "yes" or (invert == "auto" and border_is_light(gray)):
        gray = 1.0 - gray
    if gray.shape == tuple(size):
        return gray.astype(np.float32)
    box = round(min(size) * object_fill)
    return fit_and_pad(trim_to_object(gray), size, (box, box))


def object_extent(gray: np.ndarray) -> tuple[slice, slice] | None:
    """Rows and columns of the bounding box of object pixels, or None for a blank image."""
    rows = np.flatnonzero((gray > OBJECT_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((gray > OBJECT_THRESHOLD).any(axis=0))
    if len(rows) == 0:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def object_fill(images: np.ndarray) -> float:
    """Median share of the frame that the object's longest side fills, over (N, H, W) images."""
    fills = []
    for image in images:
        extent = object_extent(image)
        if extent is not None:
            fills.append(max(extent[0].stop - extent[0].start, extent[1].stop - extent[1].start) / max(image.shape))
    return float(np.median(fills)) if fills else 1.0


def trim_to_object(gray: np.ndarray) -> np.ndarray:
    extent = object_extent(gray)
    return gray if extent is None else gray[extent]


def border_is_light(gray: np.ndarray) -> bool:
    """True when the outer frame (about 5% of each side) is mostly light, i.e. a photo on white."""
    h, w = gray.shape
    m = max(1, min(h, w) // 20)
    border = np.concatenate([gray[:m].ravel(), gray[-m:].ravel(), gray[:, :m].ravel(), gray[:, -m:].ravel()])
    return float(np.median(border)) > 0.5


def fit_and_pad(gray: np.ndarray, size: tuple[int, int], box: tuple[int, int] | None = None) -> np.ndarray:
    """Resize so the image fits inside `box` (default: all of `size`), aspect kept, centred on zeros."""
    from PIL import Image

    out_h, out_w = size
    box_h, box_w = box or size
    h, w = gray.shape
    scale = min(box_h / h, box_w / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    # BOX averages every source pixel when shrinking (no aliasing); BILINEAR is smooth when enlarging.
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    resized = np.asarray(Image.fromarray(gray.astype(np.float32)).resize((new_w, new_h), resample))
    canvas = np.zeros((out_h, out_w), dtype=np.float32)
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = np.clip(resized, 0.0, 1.0)
    return canvas


@contextlib.contextmanager
def _open_image(path: Path) -> Iterator:
    """A decoded Pillow image, upright per its EXIF orientation; size-checked before decoding."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise FcxError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            # Pillow warns about huge images on open; we refuse them below with a clear message instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise FcxError(f"{path}: {w}x{h} pixels is too large (limit {MAX_PIXELS // 1_000_000} MP); downscale it first")
            if min(w, h) < MIN_SIDE:
                raise FcxError(f"{path}: {w}x{h} pixels is too small to classify (need at least {MIN_SIDE}x{MIN_SIDE})")
            upright = ImageOps.exif_transpose(img)
            upright.load()
    except Image.DecompressionBombError as exc:
        raise FcxError(f"{path}: image is too large to decode safely; downscale it first") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FcxError(f"{path}: not a readable image ({type(exc).__name__}); pass a PNG, JPEG or BMP file") from exc
    yield upright


def _to_gray_array(img) -> np.ndarray:
    """Any Pillow mode (L, RGB, RGBA, P, LA, I;16, I, F) -> float (H, W) in [0, 1]."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent areas are background: composite on white, so auto-invert sees a light border.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        return np.clip(arr / peak, 0.0, 1.0).astype(np.float32)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def collect_image_files(inputs: Iterable[str]) -> list[Path]:
    """Expand files, directories (their images, sorted) and glob patterns into a list of image paths."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FcxError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item) if Path(p).is_file())
            if not matches:
                raise FcxError(f"{item}: pattern matches no files")
            files.extend(matches)
        else:
            raise FcxError(f"{path}: file not found; pass image files, folders or glob patterns")
    return files


def batches_of_images(
    files: list[Path], input_shape: list[int], preprocess: dict, invert: str, batch_size: int
) -> Iterator[tuple[list[Path], np.ndarray]]:
    """Yield (files, float32 (B, C, H, W)) chunks, so memory stays bounded for any number of files."""
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        yield chunk, np.stack([prepare_image(f, input_shape, preprocess, invert) for f in chunk])
