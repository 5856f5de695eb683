"""The whole pipeline against wiring it by hand, step by step, side by side in one run (issue 31 item 1).

    python benchmarks/bench_pipeline.py                                   # resnet18, timm efficientnet_b0, HF ResNet
    python benchmarks/bench_pipeline.py resnet50 --size 224
    python benchmarks/bench_pipeline.py --quick                           # seconds: squeezenet1_1 at 64 px (make test)

For each model (built as benchmarks/zoo.py builds it: random weights, BatchNorm statistics set), in one process:
- fcx, the README's steps through the Python API, with a fresh cache folder (a first run: nothing recorded before):
  `import_model` -> `fuse(verify=True)` -> `export` (default formats) -> `verify` (default backends), then
  `export(["onnx"])` alone into another folder (what `fcx export --format onnx` costs);
- by hand, the tutorial's way: `torch.onnx.export(dynamo=True)` with a dynamic batch, an onnxruntime session, and
  `np.testing.assert_allclose` of its outputs against the module's on 16 random images.
Each fcx step lists where its time went (its own progress steps). Ratios are to the hand-wired total; the load
average is printed: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_MODELS = ("resnet18", "timm:efficientnet_b0", "hf:ResNetForImageClassification")


def by_hand(model, shape: tuple, folder: Path) -> dict[str, float]:
    """Seconds per step of the hand-wired way: export, open a session, compare 16 images with assert_allclose."""
    import contextlib
    import io

    import onnxruntime as ort
    import torch

    seconds = {}
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, (torch.rand(2, *shape),), str(folder / "plain.onnx"), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    seconds["torch.onnx.export"] = time.perf_counter() - started
    started = time.perf_counter()
    session = ort.InferenceSession(str(folder / "plain.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((16, *shape), dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x))
    expected = getattr(expected, "logits", expected).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0], expected, rtol=1e-3, atol=1e-4)
    seconds["onnxruntime + assert_allclose (16 images)"] = time.perf_counter() - started
    return seconds


def fcx_steps(model, shape: tuple, folder: Path, inputs: int | None) -> list[tuple[str, float, list]]:
    """(step, seconds, [(sub-step, seconds), ...]) for the README's steps on one model."""
    from bench_verify import timed

    import fcexport

    steps = []

    def step(name, fn):
        seconds, _, parts = timed(fn)
        steps.append((name, seconds, parts))

    step("import", lambda on_step: fcexport.import_model(model, shape, mean=MEAN, std=STD, artifacts=folder))
    step("fuse-bn --verify", lambda on_step: fcexport.fuse(folder / "model.pt", folder / "model.fused.pt", verify=True,
                                                          inputs=inputs, on_step=on_step))
    step("export", lambda on_step: fcexport.export(folder / "model.pt", folder, on_step=on_step))
    step("verify", lambda on_step: fcexport.verify(folder, devices=("cpu",), inputs=inputs, on_step=on_step))
    step("export --format onnx (alone)", lambda on_step: fcexport.export(folder / "model.pt", folder / "onnx-only",
                                                                           ["onnx"], on_step=on_step))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=list(DEFAULT_MODELS), help="torchvision names, timm:NAME, hf:CLASS")
    parser.add_argument("--size", type=int, default=224, help="image height and width (a transformers model: its own) [224]")
    parser.add_argument("--quick", action="store_true", help="does it run: squeezenet1_1 at 64 px, 16 inputs")
    args = parser.parse_args()
    inputs = None
    if args.quick:
        args.models, args.size, inputs = ["squeezenet1_1"], 64, 16
    import zoo

    print(f"# pipeline vs by hand: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
          f"{' (--quick: not measurements)' if args.quick else ''}")
    for name in args.models:
        model = zoo.build(name)
        size = getattr(getattr(model, "config", None), "image_size", args.size)
        shape = (3, size, size)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            os.environ["FCX_CACHE_DIR"] = str(folder / "cache")  # a first run: nothing recorded on this machine
            hand = by_hand(model, shape, folder)
            steps = fcx_steps(model, shape, folder / "fcx", inputs)
        total_hand = sum(hand.values())
        total_fcx = sum(s for name, s, _ in steps if "alone" not in name)
        print(f"\n## {name} ({'x'.join(map(str, shape))})\n")
        print("| step | s | x by hand (all) | where the time went |")
        print("| --- | ---: | ---: | --- |")
        for label, seconds in hand.items():
            print(f"| by hand: {label} | {seconds:.1f} | {seconds / total_hand:.2f} | |")
        print(f"| **by hand, all** | {total_hand:.1f} | 1.00 | |")
        for label, seconds, parts in steps:
            where = ", ".join(f"{part} {s:.1f}" for part, s in parts[:5] if s >= 0.05)
            print(f"| fcx {label} | {seconds:.1f} | {seconds / total_hand:.2f} | {where} |")
        print(f"| **fcx, import to verify** | {total_fcx:.1f} | {total_fcx / total_hand:.2f} | |", flush=True)


if __name__ == "__main__":
    main()
