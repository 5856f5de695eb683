"""Write test-split images as PNG files, or staged as product photos (JPEG), to try `fcx predict` on.

    python -m fcexport.samples --data digits --out artifacts/demo/samples --count 4
    python -m fcexport.samples --data-root ../shared/data --out photos --count 40 --photos

A staged photo puts the item on a light or dark, tinted, gradient or vignetted background, off-centre,
rotated a little, at 320-1400 px, with noise, blur and JPEG compression: what a camera gives, with
the true class known (it is in the file name).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fcexport.data import load_dataset
from fcexport.errors import FcxError
from fcexport.files import atomic_path


def write_samples(data: str, out: Path, count: int, data_root: str | None = None) -> list[Path]:
    """Save the first `count` test images at their own size, named <index>_<true label>.png."""
    from PIL import Image

    dataset = load_dataset(data, data_root, download=False)
    written = []
    for i in range(min(count, len(dataset.test))):
        pixels = (dataset.test.images[i, 0].numpy() * 255).round().astype(np.uint8)
        label = dataset.class_names[int(dataset.test.labels[i])].replace("/", "-").replace(" ", "_")
        image = Image.fromarray(pixels)
        path = out / f"{i:03d}_{label}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        written.append(path)
    return written


def stage_photo(item: np.ndarray, rng: np.random.Generator):
    """A (H, W) dataset image in [0, 1] (bright object on black) -> a camera-like RGB PIL image."""
    from PIL import Image, ImageFilter

    side = int(rng.integers(320, 1401))
    height, width = side, int(side * rng.uniform(0.75, 1.33))
    light = rng.random() < 0.7  # most product photos are on a light background
    base = rng.uniform(0.72, 0.97) if light else rng.uniform(0.03, 0.3)
    tint = base + rng.uniform(-0.06, 0.06, 3)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    gradient = rng.uniform(-0.12, 0.12) * (x - 0.5) + rng.uniform(-0.12, 0.12) * (y - 0.5)
    vignette = -rng.uniform(0, 0.15) * ((x - 0.5) ** 2 + (y - 0.5) ** 2) * 2
    background = np.clip(tint[None, None, :] + (gradient + vignette)[..., None], 0, 1)
    # the object: the item's intensity as darkness on a light background, lightness on a dark one
    scale = rng.uniform(0.35, 0.7) * min(height, width) / max(item.shape)
    size = (max(1, round(item.shape[1] * scale)), max(1, round(item.shape[0] * scale)))
    alpha_image = Image.fromarray((item * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    alpha_image = alpha_image.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BICUBIC, expand=True)
    alpha = np.asarray(alpha_image, dtype=np.float32) / 255.0
    colour = rng.uniform(0.0, 0.35, 3) if light else rng.uniform(0.75, 1.0, 3)
    top = int(rng.integers(0, max(1, height - alpha.shape[0])))
    left = int(rng.integers(0, max(1, width - alpha.shape[1])))
    photo = background.copy()
    region = photo[top : top + alpha.shape[0], left : left + alpha.shape[1]]
    a = alpha[: region.shape[0], : region.shape[1], None]
    region[...] = region * (1 - a) + colour[None, None, :] * a
    photo = np.clip(photo + rng.normal(0, rng.uniform(0.005, 0.03), photo.shape), 0, 1)
    image = Image.fromarray((photo * 255).round().astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.5))))


def write_photos(data: str, out: Path, count: int, data_root: str | None = None, seed: int = 0) -> list[Path]:
    """Stage the first `count` test images as JPEG photos (quality 60-95), named <index>_<true label>.jpg."""
    dataset = load_dataset(data, data_root, download=False)
    rng = np.random.default_rng(seed)
    written = []
    for i in range(min(count, len(dataset.test))):
        image = stage_photo(dataset.test.images[i, 0].numpy(), rng)
        label = dataset.class_names[int(dataset.test.labels[i])].replace("/", "-").replace(" ", "_")
        path = out / f"{i:04d}_{label}.jpg"
        with atomic_path(path) as tmp:
            image.save(tmp, format="JPEG", quality=int(rng.integers(60, 96)))
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", type=Path, default=Path("artifacts/samples"))
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--photos", action="store_true", help="stage the images as camera-like JPEG photos")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        if args.photos:
            written = write_photos(args.data, args.out, args.count, args.data_root, args.seed)
        else:
            written = write_samples(args.data, args.out, args.count, args.data_root)
    except FcxError as exc:  # bad input: one line, as fcx says it
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
