"""Inference side by side in one run: eager unfused, eager fused, TorchScript, ONNX Runtime (fcexport's
settings and ORT's defaults), ONNX Runtime int8 (approximate, when model.int8.onnx exists), and a
plain NumPy matmul chain as the float32 floor.

    python benchmarks/bench_inference.py [--artifacts DIR]   (trains a model on digits-sized data if none)

Prints p50 latency at batch 1 and throughput at batch 1024, and the ratios that matter. Machines are
noisy: compare ratios from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
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


def ensure_artifacts(folder: Path, arch: str) -> None:
    if (folder / "model.onnx").is_file():
        return
    fcx = [sys.executable, "-m", "cli.main"]
    data = ["--data-root", "../shared/data"] if Path("../shared/data/FashionMNIST").is_dir() else ["--data", "digits"]
    subprocess.run([*fcx, "train", *data, "--model", arch, "--epochs", "2", "--artifacts", str(folder), "-q"], check=True)
    subprocess.run([*fcx, "fuse-bn", "--artifacts", str(folder), "--json"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*fcx, "export", "--int8", "--artifacts", str(folder), "--json"], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description="inference benchmark")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="the default MLP or the default CNN")
    parser.add_argument("--artifacts", type=Path, default=None, help="[default: artifacts/bench-MODEL]")
    parser.add_argument("--seconds", type=float, default=3.0, help="time budget per backend and batch size")
    args = parser.parse_args()
    args.artifacts = args.artifacts or Path(f"artifacts/bench-{args.model}")
    ensure_artifacts(args.artifacts, args.model)
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
    for batch, repeat in ((1, 5000), (1024, 200)):
        x = rng.random((batch, *shape), dtype=np.float32)
        for p in predictors:
            results[(p.backend, batch)] = measure(p, x, warmup=50, repeat=repeat, max_seconds=args.seconds)
    import onnxruntime
    import openvino
    import torch

    print(f"# inference benchmark, default {args.model}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__.split('-')[0]}, python {platform.python_version()}\n")
    print("| backend | batch-1 p50 (us) | batch-1 speed-up vs eager | batch-1024 samples/s | batch-1024 vs ORT default |")
    print("| --- | ---: | ---: | ---: | ---: |")
    eager1 = results[("eager", 1)]["p50_ms"]
    ort_default_tp = results[("onnxruntime-default", 1024)]["throughput"]
    for p in predictors:
        r1, rb = results[(p.backend, 1)], results[(p.backend, 1024)]
        print(f"| {p.backend} | {r1['p50_ms'] * 1e3:.1f} | {eager1 / r1['p50_ms']:.2f}x | {rb['throughput']:,.0f} | {rb['throughput'] / ort_default_tp:.2f}x |")
    exact = [p.backend for p in predictors if p.backend in registry.backends() and not p.approximate]
    approximate = [p.backend for p in predictors if p.approximate]
    print()
    for label, names in (("exact (float32)", exact), ("approximate (int8, bf16)", approximate)):
        if names:
            best = min(names, key=lambda b: results[(b, 1)]["p50_ms"])
            print(f"best {label} fcexport backend at batch 1: {best}, {eager1 / results[(best, 1)]['p50_ms']:.2f}x faster than eager unfused")


if __name__ == "__main__":
    main()
