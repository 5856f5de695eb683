"""Image file -> model input, with Pillow and NumPy only (no torch: `fcx predict` on ONNX stays fast).

Fashion-MNIST was made by trimming each photo to the object, resizing its longest side to 28,
and negating it: a light object on a dark background. We do the same to any file: grayscale,
invert when its border is light, trim to the object, fit it (aspect kept) into the share of the
frame that objects fill in the training data ("object_fill", 1.0 for Fashion-MNIST, about 0.7
for MNIST's 20x20 box in 28x28), and centre it on background. A file already at the model's
input size is taken to be dataset-style and only inverted if needed.

Other models get a plain resize in the model's channels, as their spec says: "letterbox" (aspect
kept, padded with black: fcexport's default for colour models) or "resize" (to a shorter side or
an exact size, then the centre taken: what timm's eval transform and Hugging Face's image
processors do). Either way the image's EXIF orientation is applied first.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from fcexport.errors import FcxError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
OBJECT_THRESHOLD = 0.1  # a pixel brighter than this (after inversion) belongs to the object
MIN_SIDE = 4
MAX_PIXELS = 40_000_000  # 40 megapixels: larger files are refused before decoding to bound memory
INVERT_CHOICES = ("auto", "yes", "no")
MAX_FOLDERS = 20_000  # folders one glob pattern may read
MAX_MATCHES = 500_000  # files one glob pattern or folder may name: bounds what is listed and sorted (~0.5 GB)


def prepare_image(path: str | os.PathLike, input_shape, preprocess, invert: str = "auto") -> np.ndarray:
    """One image file -> float32 (C, H, W) in [0, 1], prepared as the model's spec says (fcexport.spec)."""
    channels, height, width = image_shape(input_shape)
    if preprocess.mode != "object":
        return resized_image(Path(path), channels, (height, width), preprocess)
    gray = load_image(path, (height, width), invert, preprocess.object_fill)
    return np.repeat(gray[None], channels, axis=0)


def image_shape(input_shape) -> tuple[int, int, int]:
    """(C, H, W) of a model an image file can be given: gray (1 channel) or colour (3). Any other count (RGBA? a
    near-infrared band?) is not something an image file says, so none is guessed."""
    channels, height, width = input_shape
    if channels not in (1, 3):
        raise FcxError(f"the model takes {channels} channels; fcx reads image files as gray (1 channel) or RGB (3): give "
                       "it its input as arrays (fcexport.open_predictor)")
    return channels, height, width


def resized_image(path: Path, channels: int, size: tuple[int, int], preprocess) -> np.ndarray:
    """Colour (or gray) pixels resized as `preprocess` says (letterbox, or resize and centre crop) into `size`: (C, H, W)."""
    with _open_image(path) as img:
        return _fitted(_eight_bit(img), channels, size, preprocess)[0]


@dataclass(frozen=True)
class Placement:
    """Where an image file went in the model's input: the file's (h, w), the part of it the model saw (left, top,
    right, bottom in its pixels), where that part lies in the input (top, left, h, w), and the input's (H, W): what
    undoes a letterbox or a centre crop, so a per-pixel answer maps back onto the file's own pixels."""

    image: tuple[int, int]
    seen: tuple[float, float, float, float]
    region: tuple[int, int, int, int]
    input: tuple[int, int]


def image_and_placement(path: Path, input_shape, preprocess, invert: str = "auto") -> tuple[np.ndarray, Placement, np.ndarray]:
    """(the model's input (C, H, W) as prepare_image makes it, its Placement, the file's own RGB pixels (h, w, 3)
    uint8) from one read of the file: what a segmentation model's masks are drawn on. "object" preparation (only
    when asked for: a segmentation model's default is "letterbox") cuts the object out, so its masks stay on the
    prepared input (placement: all of it)."""
    channels, height, width = image_shape(input_shape)
    if preprocess.mode == "object":
        pixels = prepare_image(path, input_shape, preprocess, invert)
        shown = (np.clip(pixels[:3].transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
        shown = shown if shown.shape[2] == 3 else np.repeat(shown[..., :1], 3, axis=2)
        return pixels, Placement((height, width), (0, 0, width, height), (0, 0, height, width), (height, width)), shown
    with _open_image(Path(path)) as img:
        img = _eight_bit(img)
        pixels, placement = _fitted(img, channels, (height, width), preprocess)
        return pixels, placement, np.asarray(img.convert("RGB"), dtype=np.uint8)


def _fitted(img, channels: int, size: tuple[int, int], preprocess) -> tuple[np.ndarray, Placement]:
    """A decoded image (made `_eight_bit`) prepared into `size` as `preprocess` says ("letterbox" or "resize"), and its
    Placement."""
    from PIL import Image

    out_h, out_w = size
    resample = getattr(Image.Resampling, preprocess.resample.upper())
    pixels = img.convert("RGB" if channels == 3 else "L")
    width, height = pixels.size
    if preprocess.mode == "resize":
        box = centre_crop_box((height, width), preprocess.resize, size, preprocess.crop_offset)
        pixels, placed = pixels.resize((out_w, out_h), resample, box), (0, 0)
    else:
        scale = min(out_h / height, out_w / width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        box = (0, 0, width, height)
        pixels, placed = pixels.resize((new_w, new_h), resample), ((out_h - new_h) // 2, (out_w - new_w) // 2)
    values = np.asarray(pixels, dtype=np.float32) / 255.0
    values = values.reshape(values.shape[0], values.shape[1], -1).transpose(2, 0, 1)
    canvas = np.zeros((values.shape[0], out_h, out_w), dtype=np.float32)
    canvas[:, placed[0] : placed[0] + values.shape[1], placed[1] : placed[1] + values.shape[2]] = values
    placement = Placement((height, width), tuple(float(v) for v in box), (*placed, values.shape[1], values.shape[2]), size)
    return (np.repeat(canvas, channels, axis=0) if canvas.shape[0] != channels else canvas), placement


def centre_crop_box(image: tuple[int, int], resize, size: tuple[int, int], offset: str = "floor") -> tuple[float, ...]:
    """The region of an (h, w) image that becomes the centre `size` crop once the image is resized to `resize` ((h, w),
    or an int for the shorter side, the longer one truncated as torchvision and transformers do; an odd margin's half
    as `offset` says, spec.CROP_OFFSETS). Resizing only that region gives Pillow's pixels of the whole resize to within
    3/255, with memory bounded by the output whatever the image's aspect."""
    height, width = image
    if isinstance(resize, tuple):
        new_h, new_w = resize
    else:
        new_h, new_w = (int(resize * height / width), resize) if width <= height else (resize, int(resize * width / height))
    top, left = ((new - out) // 2 if offset == "floor" else round((new - out) / 2) for new, out in ((new_h, size[0]), (new_w, size[1])))
    sy, sx = height / new_h, width / new_w
    return left * sx, top * sy, (left + size[1]) * sx, (top + size[0]) * sy


def load_image(path: str | os.PathLike, size: tuple[int, int], invert: str = "auto", object_fill: float = 1.0) -> np.ndarray:
    """Read one image file and return float32 (H, W) pixels in [0, 1], light object on dark."""
    with _open_image(Path(path), draft_side=2 * WORK_SIDE) as img:  # then BOX-shrunk: JPEG scaling alone lost accuracy
        if (img.height, img.width) == tuple(size):  # already dataset-style (e.g. a saved test image): only invert if needed
            gray = _to_rgb_array(img).mean(axis=2)
            light = invert == "yes" or (invert == "auto" and border_is_light(gray))
            return (1.0 - gray if light else gray).astype(np.float32)
        rgb = _work_rgb(img)
    return object_on_black(rgb, size, invert, object_fill)


# ---- photos -> the training domain -------------------------------------------------------

WORK_SIDE = 160  # photos are analysed at this size: enough for a 28x28 result (5.7x), fast for 40 MP inputs
BORDER = 0.05  # share of each side that is taken to be background


def object_on_black(rgb: np.ndarray, size: tuple[int, int], invert: str = "auto", object_fill: float = 1.0) -> np.ndarray:
    """A photo (H, W, 3) in [0, 1] -> (size) float32: the object, bright on black, fitted and centred.

    The way Fashion-MNIST was made, made robust to real backgrounds: the background is estimated from
    the border as a smooth colour surface (a tint, a gradient, a vignette), the object is what differs
    from it by more than an image-derived threshold (Otsu's, never below the border's own noise),
    specks are opened away, and the object is trimmed, mapped to bright-on-black with its contrast
    stretched, and fitted into `object_fill` of the frame.
    """
    rgb = _work_copy(rgb)
    background = fit_background(rgb)
    distance = colour_distance(rgb - background)
    mask = object_mask(distance, _border(distance))
    gray, bg_gray = rgb @ THIRDS, background @ THIRDS
    dark_object = invert == "yes" or (invert == "auto" and median(_border(bg_gray)) > 0.5)
    # bright on black: how much darker (light background) or lighter (dark background) than the background,
    # less the border's own noise level, so the background maps to black
    intensity = np.clip(bg_gray - gray if dark_object else gray - bg_gray, 0.0, None)
    intensity = np.clip(intensity - _noise_ceiling(_border(intensity)), 0.0, None)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = round(min(size) * object_fill)
    if len(rows) == 0:  # nothing stands out from the background
        return fit_and_pad(np.zeros((1, 1), np.float32), size, (box, box))
    crop = intensity[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    peak = float(crop.max())
    return fit_and_pad(np.clip(crop / max(peak, 1e-6), 0.0, 1.0), size, (box, box))


THIRDS = np.full(3, 1 / 3, np.float32)  # (..., 3) @ THIRDS: the channels' mean, ~20x faster than .mean(axis=-1)


def colour_distance(difference: np.ndarray) -> np.ndarray:
    """Euclidean length over the last (RGB) axis; a matrix product, not np.linalg.norm's slow 3-wide reduction."""
    return np.sqrt(np.square(difference) @ np.ones(3, difference.dtype))


def median(values: np.ndarray) -> float:
    """np.median of a flat array by partition alone (a few times faster on the small arrays a photo has)."""
    flat = np.ravel(values)
    half = len(flat) // 2
    if len(flat) % 2:
        return float(np.partition(flat, half)[half])
    low, high = np.partition(flat, (half - 1, half))[half - 1 : half + 1]
    return (float(low) + float(high)) / 2


def robust_spread(values: np.ndarray) -> tuple[float, float]:
    """Median and robust standard deviation (1.4826 x the median absolute deviation) of `values`."""
    middle = median(values)
    return middle, 1.4826 * median(np.abs(values - middle))


def _noise_ceiling(values: np.ndarray) -> float:
    """Where a background's values end: median plus 4 robust standard deviations."""
    middle, spread = robust_spread(values)
    return middle + 4 * spread


def _work_copy(rgb: np.ndarray) -> np.ndarray:
    """Shrink to WORK_SIDE on the longest side (BOX filter: averages, so it also lowers the noise)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = WORK_SIDE / max(h, w)
    if scale >= 1:
        return rgb.astype(np.float32)
    image = Image.fromarray((rgb * 255).round().astype(np.uint8))
    small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _work_rgb(img) -> np.ndarray:
    """A decoded photo at WORK_SIDE, float32 (H, W, 3) in [0, 1]: 8-bit images are shrunk as 8-bit (BOX), before
    any float copy of the full-size image is made; the same pixels as _work_copy(_to_rgb_array(img))."""
    from PIL import Image

    if img.mode in HIGH_DEPTH_MODES:
        return _work_copy(_to_rgb_array(img))
    rgb = _composited(img).convert("RGB")
    scale = WORK_SIDE / max(rgb.size)
    if scale < 1:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BOX)
    return np.asarray(rgb, dtype=np.float32) / 255.0


MAX_FIT_PIXELS = 1024  # border pixels the background surface is fitted to (an even sample of the border)


@functools.lru_cache(maxsize=256)  # work images come in few shapes; each is read-only
def _frame(h: int, w: int) -> np.ndarray:
    """The border that is taken to be background: BORDER of each side, as a boolean mask."""
    m = max(1, round(min(h, w) * BORDER))
    frame = np.zeros((h, w), bool)
    frame[:m], frame[-m:], frame[:, :m], frame[:, -m:] = True, True, True, True
    frame.flags.writeable = False
    return frame


@functools.lru_cache(maxsize=256)
def _border_points(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the border frame (_border's pixels, in its order), evenly thinned to MAX_FIT_PIXELS."""
    rows, cols = np.nonzero(_frame(h, w))
    step = -(-len(rows) // MAX_FIT_PIXELS)
    rows, cols = rows[::step], cols[::step]
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def _border(values: np.ndarray) -> np.ndarray:
    return values[_frame(*values.shape[:2])]


def fit_background(rgb: np.ndarray) -> np.ndarray:
    """Per channel, the quadratic surface in (x, y) that best fits the border pixels (least squares,
    refitted once without the pixels that the object covers): a flat colour, a tint, a gradient or
    a vignette all fit it."""
    h, w = rgb.shape[:2]
    xs, ys = np.arange(w, dtype=np.float32) / max(w - 1, 1) - 0.5, np.arange(h, dtype=np.float32) / max(h - 1, 1) - 0.5
    rows, cols = _border_points(h, w)
    x, y = xs[cols].astype(np.float64), ys[rows].astype(np.float64)
    border_features = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=-1)
    border_rgb = rgb[rows, cols]
    # start from the border's median colour (robust while the object covers under half the border),
    # then fit the surface to the pixels near the current estimate, twice
    estimate = np.array([median(border_rgb[:, channel]) for channel in range(3)], np.float32)
    coef = None
    for _ in range(3):
        residual = colour_distance(border_rgb - estimate)
        middle = median(residual)
        kept = residual[residual <= middle + 1e-6]
        spread = robust_spread(kept)[1] if len(kept) else 0.0
        keep = residual <= max(middle + 4 * spread, 0.04)
        coef = least_squares(border_features[keep], border_rgb[keep])
        estimate = (border_features @ coef).astype(np.float32)
    return np.clip(quadratic_surface(coef.astype(np.float32), xs, ys), 0.0, 1.0)


def least_squares(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """argmin ||features @ coef - targets||, the minimum-norm one: through the 6x6 normal equations in float64
    (the features are bounded, so squaring their condition costs nothing here; 10x faster than an SVD of them)."""
    return np.linalg.lstsq(features.T @ features, features.T @ targets.astype(np.float64), rcond=None)[0]


def quadratic_surface(coef: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """sum_k coef[k] * [1, x, y, x^2, y^2, xy]_k over the grid ys x xs, (h, w, 3), as one matrix product:
    [1, y, y^2] @ [c0 + c1 x + c3 x^2, c2 + c5 x, c4] (NumPy's broadcasting over a 3-wide axis is slow)."""
    x = xs[:, None]
    by_row = np.stack([np.ones_like(ys), ys, ys * ys], axis=1)
    by_column = np.stack([coef[0] + coef[1] * x + coef[3] * x * x, coef[2] + coef[5] * x,
                          np.broadcast_to(coef[4], (len(xs), 3))])
    return (by_row @ by_column.reshape(3, -1)).reshape(len(ys), len(xs), 3)


def object_mask(distance: np.ndarray, border_distance: np.ndarray) -> np.ndarray:
    """Pixels that differ from the background by more than the threshold, specks removed.

    The threshold comes from the image: a quarter of Otsu's split between background and object (so
    faint parts of the object count), but never below the border's noise ceiling, so a noisy or
    JPEG-blocky background is not taken as object."""
    floor = _noise_ceiling(border_distance) + 0.02
    threshold = max(floor, 0.25 * otsu_threshold(distance))
    # opening with a 3x3 square: specks go; outside the image counts as object for the erosion and as background
    # for the dilation, as PIL's edge-replicating min/max filters do for an object touching the edge
    return _square_filter(_square_filter(distance > threshold, np.logical_and, True), np.logical_or, False)


def _square_filter(mask: np.ndarray, combine, outside: bool) -> np.ndarray:
    """3x3 erosion (combine=logical_and) or dilation (logical_or) of a boolean image: a square is a row of three
    then a column of three, so four shifted views; no per-pixel Python and no scipy import (a fifth of a second)."""
    h, w = mask.shape
    padded = np.pad(mask, 1, constant_values=outside)
    across = combine(combine(padded[:, :w], padded[:, 1 : w + 1]), padded[:, 2:])
    return combine(combine(across[:h], across[1 : h + 1]), across[2:])


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The value that best splits `values` into two classes (Otsu 1979: maximal between-class variance)."""
    top = float(values.max())
    if top <= 0:
        return 0.0
    # np.histogram(values, bins, range=(0, top)) for values >= 0, by bincount (several times faster)
    counts = np.bincount(np.minimum((values.ravel() * (bins / top)).astype(np.intp), bins - 1), minlength=bins)
    centers = (np.arange(bins) + 0.5) * (top / bins)
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * centers)
    total, total_mean = weight[-1], mean[-1]
    background, foreground = weight, total - weight
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * background - mean * total) ** 2 / (background * foreground)
    return float(centers[np.nanargmax(np.where(foreground > 0, between, np.nan))])


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
    return median(np.array(fills)) if fills else 1.0


def border_is_light(gray: np.ndarray) -> bool:
    """True when the outer frame (about 5% of each side) is mostly light, i.e. a photo on white."""
    h, w = gray.shape
    m = max(1, min(h, w) // 20)
    border = np.concatenate([gray[:m].ravel(), gray[-m:].ravel(), gray[:, :m].ravel(), gray[:, -m:].ravel()])
    return median(border) > 0.5


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
def _open_image(path: Path, draft_side: int | None = None) -> Iterator:
    """A decoded Pillow image, upright per its EXIF orientation; size-checked before decoding. With `draft_side`,
    a JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8) whose longest side is still at least that
    (Pillow's draft mode: several times faster than decoding every pixel and shrinking afterwards)."""
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
            if draft_side and img.format == "JPEG" and max(w, h) > 2 * draft_side:
                scale = draft_side / max(w, h)
                img.draft(None, (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale)))))
            upright = ImageOps.exif_transpose(img)
            upright.load()
            if upright.mode == "F" and not np.isfinite(np.asarray(upright)).all():
                raise FcxError(f"{path}: holds NaN or infinite pixel values; save it with finite values")
    except Image.DecompressionBombError as exc:
        raise FcxError(f"{path}: image is too large to decode safely; downscale it first") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FcxError(f"{path}: not a readable image ({type(exc).__name__}); pass a PNG, JPEG, BMP, GIF, TIFF or WebP file") from exc
    yield upright


HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def _composited(img):
    """Transparent areas are background: composited on white, so auto-invert sees a light border."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img


def _to_rgb_array(img) -> np.ndarray:
    """Any Pillow mode (L, RGB, RGBA, P, LA, I;16, I, F, CMYK) -> float32 (H, W, 3) in [0, 1]."""
    img = _composited(img)
    if img.mode in HIGH_DEPTH_MODES:
        return np.repeat(_high_depth_gray(img)[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _high_depth_gray(img) -> np.ndarray:
    """A 16-bit, 32-bit or float image's pixels in [0, 1] (65535 is white when any pixel is above 255, else 255)."""
    arr = np.asarray(img, dtype=np.float64)
    peak = 65535.0 if arr.max() > 255 else 255.0
    return np.clip(arr / peak, 0.0, 1.0).astype(np.float32)


def _eight_bit(img):
    """Any Pillow mode as one Pillow resizes and converts without loss of meaning: transparency composited on white
    (as transformers' convert_to_rgb does), 16-bit and float pixels scaled to 8 bits (convert() clips them at 255)."""
    from PIL import Image

    img = _composited(img)
    if img.mode in HIGH_DEPTH_MODES:
        return Image.fromarray((_high_depth_gray(img) * 255).round().astype(np.uint8), mode="L")
    return img


def collect_image_files(inputs: Iterable[str]) -> Iterator[Path]:
    """Expand files, directories (their images, sorted) and glob patterns into image paths, lazily.
    A path that does not exist is passed on, to become that file's error; a folder without images or
    a pattern that matches nothing is a usage error. Folders are not walked into and patterns are not
    recursive, so a symlink loop cannot make the listing endless; each is bounded by MAX_MATCHES."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            with os.scandir(path) as entries:
                images = (Path(e.path) for e in entries if Path(e.name).suffix.lower() in IMAGE_SUFFIXES and e.is_file())
                found = sorted(_first(images, item))
            if not found:
                raise FcxError(f"{path}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            yield from found
        elif not path.exists() and glob.has_magic(item):
            matches = sorted(p for p in _glob(item) if p.is_file())
            if not matches:
                raise FcxError(f"{item}: pattern matches no files")
            yield from matches
        else:
            yield path


def _glob(pattern: str) -> list[Path]:
    """What glob.glob(pattern) matches (not recursive: `**` is `*`; hidden names only when the pattern starts
    with a dot), level by level, reading at most MAX_FOLDERS folders and keeping at most MAX_MATCHES paths: a
    pattern through symlink loops that matches nothing ends too, where glob would read folders for ever."""
    import fnmatch

    parts = Path(pattern).parts
    level = [Path(parts[0])] if Path(pattern).is_absolute() else [Path(".")]
    visited = 0
    for part in parts[1:] if Path(pattern).is_absolute() else parts:
        if not glob.has_magic(part):
            level = [folder / part for folder in level if os.path.lexists(folder / part)]
            continue
        following = []
        for folder in level:
            if not folder.is_dir():
                continue
            visited += 1
            if visited > MAX_FOLDERS:
                raise FcxError(f"{pattern}: reads more than {MAX_FOLDERS:,} folders; narrow the pattern")
            try:
                with os.scandir(folder) as entries:
                    names = [e.name for e in entries if fnmatch.fnmatch(e.name, part)
                             and (part.startswith(".") or not e.name.startswith("."))]
            except OSError:
                continue  # unreadable, as glob skips it
            following += [folder / name for name in names]
            if len(following) > MAX_MATCHES:
                raise _too_many(pattern)
        level = following
    return level


def _first(entries: Iterator, item: str) -> list:
    """At most MAX_MATCHES entries of a folder; more is a usage error naming it."""
    import itertools

    found = list(itertools.islice(entries, MAX_MATCHES + 1))
    if len(found) > MAX_MATCHES:
        raise _too_many(item)
    return found


def _too_many(item: str) -> FcxError:
    return FcxError(f"{item}: names more than {MAX_MATCHES:,} files; split it into smaller folders or patterns")
