"""Inference side by side in one run: eager unfused, eager fused, TorchScript, ONNX Runtime (fcexport's
settings and ORT's defaults), ONNX Runtime int8 (approximate, when model.int8.onnx exists), and a
plain NumPy matmul chain as the float32 floor.

    python benchmarks/bench_inference.py [--artifacts DIR]   (trains a model on digits-sized data if none)
    python benchmarks/bench_inference.py --quick             # seconds: one epoch on digits in a temporary folder (make test)

Prints p50 latency at batch 1 and throughput at batch 1024, the ratios that matter, and each row's share of this
CPU's float32 limit (the model's multiply-accumulates per image x 2 x images/s, against NumPy's sgemm on a 2048-square
matmul measured in the same run: what this CPU's BLAS reaches, a practical peak). Machines are noisy: compare ratios
from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from fcexport import registry
from fcexport.pipeline import open_backend
from fcexport.targets import DeviceUnavailable, Predictor
from fcexport.spec import ModelSpec
from fcexport.timing import measure


def numpy_chain(onnx_path: Path) -> Predictor:
    """The floor: the fused weights as a chain of NumPy matmuls + ReLU, no framework at all."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    def transposed(node) -> bool:
        return any(a.name == "transB" and a.i for a in node.attribute)

    layers = [((weights[n.input[1]].T if transposed(n) else weights[n.input[1]]).copy(), weights[n.input[2]])
              for n in model.graph.node if n.op_type == "Gemm"]

    def run(x: np.ndarray) -> np.ndarray:
        h = x.reshape(len(x), -1)
        for i, (w, b) in enumerate(layers):
            h = h @ w + b
            if i < len(layers) - 1:
                np.maximum(h, 0, out=h)
        return h

    return Predictor("numpy-chain", "cpu", onnx_path, run, ModelSpec([1, 28, 28], [str(i) for i in range(10)]))


def ort_default(onnx_path: Path) -> Predictor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    spec = ModelSpec([1, 28, 28], [str(i) for i in range(10)])
    return Predictor("onnxruntime-default", "cpu", onnx_path, lambda x: session.run(None, {name: x})[0], spec)


def sgemm_gflops(seconds: float) -> float:
    """NumPy's float32 matmul rate on this machine (GFLOP/s): the practical peak the rows are measured against."""
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    a @ a
    started, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - started < seconds:
        a @ a
        calls += 1
    return 2 * 2048**3 * calls / (time.perf_counter() - started) / 1e9


def ensure_artifacts(folder: Path, arch: str, quick: bool = False) -> None:
    """Train (2 epochs on Fashion-MNIST where it is on disk, else digits; `quick`: 1 on digits, in this process),
    fold and export."""
    if (folder / "model.onnx").is_file():
        return
    if quick:
        import fcexport
        from fcexport.options import TrainOptions

        fcexport.train(TrainOptions(data="digits", arch=arch, epochs=1, artifacts=str(folder), device="cpu"))
        fcexport.fuse(folder / "model.pt", folder / "model.fused.pt")
        fcexport.export(folder / "model.pt", folder, ["torchscript", "onnx", "int8", "pt2", "triton"], check=False)
        return
    fcx = [sys.executable, "-m", "cli.main"]
    fashion = Path("../shared/data/FashionMNIST").is_dir()
    data = ["--data-root", "../shared/data"] if fashion else ["--data", "digits"]
    subprocess.run([*fcx, "train", *data, "--model", arch, "--epochs", "2", "--artifacts", str(folder), "-q"],
                   check=True, cwd=Path(__file__).parents[1])
    subprocess.run([*fcx, "fuse-bn", "--artifacts", str(folder), "--json"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*fcx, "export", "--int8", "--artifacts", str(folder), "--json"], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description="inference benchmark")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="the default MLP or the default CNN")
    parser.add_argument("--artifacts", type=Path, default=None, help="[default: artifacts/bench-MODEL]")
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per backend and batch size")
    parser.add_argument("--quick", action="store_true", help="does it run: a 1-epoch model in a temporary folder, a few calls")
    args = parser.parse_args()
    if args.quick:
        with tempfile.TemporaryDirectory() as folder:
            args.artifacts = Path(folder) / "bench"
            ensure_artifacts(args.artifacts, args.model, quick=True)
            print("(--quick: a few calls each; the figures below are not measurements)")
            return run(args, warmup=2, repeats=(5, 2), seconds=0.05)
    args.artifacts = args.artifacts or Path(f"artifacts/bench-{args.model}")
    ensure_artifacts(args.artifacts, args.model)
    run(args, warmup=50, repeats=(5000, 200), seconds=args.seconds)


def run(args, warmup: int, repeats: tuple[int, int], seconds: float) -> None:
    """Open every backend on the folder, time batch 1 and 1024, print the table."""
    predictors = []
    for backend in registry.backends().values():
        try:
            predictors.append(open_backend(backend.name, args.artifacts, "cpu"))
        except DeviceUnavailable as exc:  # not exported here (aoti), another device's, or a runtime not installed
            print(f"(skipping {backend.name}: {exc})")
    predictors.append(ort_default(args.artifacts / "model.onnx"))
    if {n.op_type for n in onnx.load(str(args.artifacts / "model.onnx")).graph.node} <= {"Reshape", "Gemm", "Relu"}:
        predictors.append(numpy_chain(args.artifacts / "model.onnx"))  # the floor exists for a chain of Linear+ReLU only
    shape = predictors[0].spec.input_shape
    rng = np.random.default_rng(0)
    results = {}
    for batch, repeat in zip((1, 1024), repeats):
        x = rng.random((batch, *shape), dtype=np.float32)
        for p in predictors:
            results[(p.backend, batch)] = measure(p, x, warmup=warmup, repeat=repeat, max_seconds=seconds)
    import onnxruntime
    import openvino
    import torch

    from fcexport.checkpoint import read_model

    flops = 2 * read_model(args.artifacts / "model.pt").shapes.macs  # per image
    peak = sgemm_gflops(seconds)

    def share(images_per_second: float) -> str:
        return f"{100 * flops * images_per_second / 1e9 / peak:.1f}%"

    print(f"# inference benchmark, default {args.model}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__.split('-')[0]}, python {platform.python_version()}\n")
    print(f"{flops / 1e6:.2f} MFLOP per image; this CPU's sgemm: {peak:.0f} GFLOP/s float32 (the % columns' 100%)\n")
    print("| backend | batch-1 p50 (us) | batch-1 speed-up vs eager | batch-1 % of sgemm | batch-1024 samples/s | "
          "batch-1024 vs ORT default | batch-1024 % of sgemm |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    eager1 = results[("eager", 1)]["p50_ms"]
    ort_default_tp = results[("onnxruntime-default", 1024)]["throughput"]
    for p in predictors:
        r1, rb = results[(p.backend, 1)], results[(p.backend, 1024)]
        print(f"| {p.backend} | {r1['p50_ms'] * 1e3:.1f} | {eager1 / r1['p50_ms']:.2f}x | {share(1e3 / r1['p50_ms'])} | "
              f"{rb['throughput']:,.0f} | {rb['throughput'] / ort_default_tp:.2f}x | {share(rb['throughput'])} |")
    exact = [p.backend for p in predictors if p.backend in registry.backends() and not p.approximate]
    approximate = [p.backend for p in predictors if p.approximate]
    print()
    for label, names in (("exact (float32)", exact), ("approximate (int8, bf16)", approximate)):
        if names:
            best = min(names, key=lambda b: results[(b, 1)]["p50_ms"])
            print(f"best {label} fcexport backend at batch 1: {best}, {eager1 / results[(best, 1)]['p50_ms']:.2f}x faster than eager unfused")


if __name__ == "__main__":
    main()
