"""Accuracy on camera-like photos against accuracy on the same test items' original images.

    python benchmarks/bench_photos.py --artifacts artifacts --count 400
    python benchmarks/bench_photos.py --quick ...           # seconds: 8 items (make test, on stand-in files)

Stages the first --count test images as photos (fcexport.samples.stage_photo: light and dark, tinted,
gradient and vignetted backgrounds; off-centre; rotated up to 8 degrees; noise, blur, JPEG quality
60-95; 320-1400 px), classifies the photos with `fcx predict`'s code path and the original 28x28
images with the same model, and prints both accuracies and their gap.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fcexport.artifacts import find_default_model
from fcexport.classify import predict_files
from fcexport.data import load_dataset
from fcexport.preprocess import prepare_image
from fcexport.registry import open_predictor
from fcexport.samples import write_photos


def main() -> None:
    default_root = os.environ.get("FCX_DATA_ROOT") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--data-root", default=default_root)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="does it run: 8 items")
    args = parser.parse_args()
    if args.quick:
        args.count = 8
    if not (Path(args.data_root) / "FashionMNIST" / "raw").is_dir():
        sys.exit(f"error: no FashionMNIST/raw under {args.data_root}; pass --data-root (or set FCX_DATA_ROOT)")
    predictor = open_predictor(find_default_model(args.artifacts))
    test = load_dataset("fashion-mnist", args.data_root, download=False).test
    labels = test.labels.numpy()[: args.count]
    originals = predictor(test.images.numpy()[: args.count]).argmax(1)
    with tempfile.TemporaryDirectory() as folder:
        photos = write_photos("fashion-mnist", Path(folder), args.count, args.data_root, args.seed)
        decode = _per_photo(photos, _decode)
        prepare = _per_photo(photos, lambda p: prepare_image(p, predictor.spec.input_shape, predictor.spec.preprocess))
        started = time.perf_counter()
        rows = list(predict_files(predictor, photos, top_k=1))
        seconds = time.perf_counter() - started
    predicted = np.array([r["index"] for r in rows])
    photo_acc, original_acc = (predicted == labels).mean(), (originals == labels).mean()
    print(f"# photo accuracy: {predictor.source} ({predictor.backend}), {args.count} test items, seed {args.seed}\n")
    print("| images | accuracy |")
    print("| --- | ---: |")
    print(f"| original 28x28 test images | {original_acc:.2%} |")
    print(f"| the same items staged as photos | {photo_acc:.2%} |")
    print(f"| gap | {100 * (original_acc - photo_acc):.1f} points |")
    print(f"\nper photo: decoding alone (the floor) {decode:.1f} ms, preparing (decode included) {prepare:.1f} ms "
          f"({prepare / decode:.1f}x the floor); preparing and classifying with fcx predict: {1000 * seconds / len(photos):.1f} ms")


def _decode(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        image.load()


def _per_photo(photos: list[Path], work) -> float:
    """Milliseconds per photo for `work`, one pass over every photo (their files are in the page cache by now)."""
    started = time.perf_counter()
    for photo in photos:
        work(photo)
    return 1000 * (time.perf_counter() - started) / len(photos)


if __name__ == "__main__":
    main()
