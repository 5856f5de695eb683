"""Write a few test-split images as PNG files, to try `fcx predict` on real pictures.

    python -m fcexport.samples --data digits --out artifacts/demo/samples --count 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fcexport.data import load_dataset
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", type=Path, default=Path("artifacts/samples"))
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args()
    for path in write_samples(args.data, args.out, args.count, args.data_root):
        print(path)


if __name__ == "__main__":
    main()
