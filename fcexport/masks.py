"""A segmentation model's answer for one image file: the class of each pixel, mapped back onto the file's own pixels
(the letterbox or centre crop undone), written as a palette mask PNG and an overlay PNG, with each class's share.

Pure NumPy and Pillow, no torch: `fcx predict` on a segmentation model.onnx stays as light as on a classifier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fcexport import compare
from fcexport.errors import FcxError
from fcexport.preprocess import Placement

UNSEEN = -1  # a mask's class where the model saw nothing of the file (outside a centre crop); drawn in UNSEEN_COLOUR
UNSEEN_COLOUR = (224, 224, 192)  # PASCAL VOC's "void"
# In the PNG, unseen is the largest value: 255 in a palette mask (up to 255 classes), 65535 in a 16-bit one (more);
# no PNG holds more than 65,535 classes besides the unseen value.
UNSEEN_8, UNSEEN_16 = 255, 65535


def palette(count: int) -> np.ndarray:
    """(count, 3) uint8 colours, one per class: PASCAL VOC's colour map (class 0 black, then well-separated hues)."""
    index = np.arange(count)
    colours = np.zeros((count, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((index >> (channel + 3 * (7 - shift))) & 1) << shift
    return colours.astype(np.uint8)


def classes_on_image(logits: np.ndarray, placement: Placement, probabilities: bool = False) -> np.ndarray:
    """(h, w) class per pixel of the file (UNSEEN where the model saw none of it) from one image's logits (K, H', W')
    on the model's input (`probabilities`: the model's own, spec.probabilities): each file pixel takes the input
    pixel it was resampled to (nearest)."""
    decided = compare.decisions(logits[None], probabilities)[0].astype(np.int64)
    top, left, height, width = placement.region
    image_h, image_w = placement.image
    x0, y0, x1, y1 = placement.seen
    rows = (np.arange(image_h) + 0.5 - y0) / (y1 - y0)  # where each file pixel's centre falls in the seen part, 0..1
    cols = (np.arange(image_w) + 0.5 - x0) / (x1 - x0)
    out_h, out_w = decided.shape
    scale_y, scale_x = out_h / placement.input[0], out_w / placement.input[1]  # the output may be smaller than the input
    inside_r, inside_c = (rows >= 0) & (rows < 1), (cols >= 0) & (cols < 1)
    r = np.clip(((top + rows * height) * scale_y).astype(np.int64), 0, out_h - 1)
    c = np.clip(((left + cols * width) * scale_x).astype(np.int64), 0, out_w - 1)
    mask = decided[r[:, None], c[None, :]].astype(np.int32)  # (a 40-megapixel file: 160 MB)
    mask[~(inside_r[:, None] & inside_c[None, :])] = UNSEEN
    return mask


def shares(mask: np.ndarray, names: tuple[str, ...], top_k: int) -> list[dict]:
    """The `top_k` classes covering most of the seen pixels, with their shares (of the seen pixels)."""
    counts = np.bincount(mask[mask != UNSEEN].ravel(), minlength=len(names))[: len(names)]
    seen = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind="stable")[: min(top_k, len(names))]
    return [{"label": names[i], "share": float(counts[i] / seen)} for i in order]


def write_masks(mask: np.ndarray, original: np.ndarray, classes: int, stem: Path) -> tuple[Path, Path]:
    """STEM.mask.png (a palette PNG: pixel value = class index, UNSEEN_8 outside what the model saw; 16-bit gray with
    UNSEEN_16 beyond 255 classes) and STEM.overlay.png (the file with each class's colour blended in), written
    atomically."""
    from PIL import Image

    from fcexport.files import atomic_path

    if classes > UNSEEN_16:
        raise FcxError(f"a mask PNG holds at most {UNSEEN_16:,} classes; the model has {classes:,} (--json has the shares)")
    colours = palette(max(classes, 1))
    mask_path, overlay_path = stem.with_name(stem.name + ".mask.png"), stem.with_name(stem.name + ".overlay.png")
    seen = mask != UNSEEN
    if classes <= UNSEEN_8:
        image = Image.fromarray(np.where(seen, mask, UNSEEN_8).astype(np.uint8), mode="P")
        table = np.zeros((256, 3), dtype=np.uint8)
        table[:classes], table[UNSEEN_8] = colours, UNSEEN_COLOUR
        image.putpalette(table.ravel().tolist())
    else:
        image = Image.fromarray(np.where(seen, mask, UNSEEN_16).astype(np.uint16))
    painted = colours[np.where(seen, mask, 0) % len(colours)]
    blended = ((original.astype(np.uint16) + painted) // 2).astype(np.uint8)  # half the file, half the class's colour
    overlay = Image.fromarray(np.where(seen[..., None], blended, original), mode="RGB")
    stem.parent.mkdir(parents=True, exist_ok=True)
    for picture, path in ((image, mask_path), (overlay, overlay_path)):
        with atomic_path(path) as tmp:
            picture.save(tmp, format="PNG")
    return mask_path, overlay_path
