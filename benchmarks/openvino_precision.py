"""OpenVINO's throughput by inference precision against onnxruntime, one process, the same model.onnx.

    python benchmarks/openvino_precision.py artifacts/bench-mlp/model.onnx [--batch 1024] [--seconds 2]
    python benchmarks/openvino_precision.py --quick     # seconds: a small MLP exported here, short runs (make test)

Prints samples/s for OpenVINO's default (which is bf16 on CPUs with AMX / AVX512-BF16 units), f32, f32 with the
THROUGHPUT hint, and onnxruntime's defaults: why fcexport's exact `openvino` backend pins f32 and offers bf16 as
the approximate `openvino-bf16`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import openvino as ov


def throughput(run, x: np.ndarray, seconds: float) -> float:
    for _ in range(5):
        run(x)
    started, calls = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        run(x)
        calls += 1
    return calls * len(x) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a model.onnx")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="does it run: a small MLP's model.onnx, 0.05 s per line")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seconds = 64, 0.05
        data = small_onnx()
    elif args.model is None:
        parser.error("a model.onnx is needed (or --quick)")
    else:
        data = open(args.model, "rb").read()
    compare(data, args.batch, args.seconds)


def small_onnx() -> bytes:
    """A small MLP's model.onnx as fcx exports it."""
    import tempfile
    from pathlib import Path

    import fcexport
    from torch import nn

    with tempfile.TemporaryDirectory() as folder:
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        fcexport.import_model(model.eval(), (1, 28, 28), artifacts=folder)
        fcexport.export(Path(folder) / "model.pt", folder, ["onnx"], check=False)
        return (Path(folder) / "model.onnx").read_bytes()


def compare(data: bytes, batch: int, seconds: float) -> None:
    """samples/s of each OpenVINO precision and of onnxruntime on the same file."""
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else batch for d in session.get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    core = ov.Core()
    for label, config in (("openvino default", {}), ("openvino f32", {"INFERENCE_PRECISION_HINT": "f32"}),
                          ("openvino f32 THROUGHPUT", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT"})):
        compiled = core.compile_model(core.read_model(data), "CPU", config)
        request = compiled.create_infer_request()
        speed = throughput(lambda chunk: request.infer({0: chunk}), x, seconds)
        print(f"{label:24s} {speed:12,.0f} samples/s  (computes in {compiled.get_property('INFERENCE_PRECISION_HINT')})")
    name = session.get_inputs()[0].name
    print(f"{'onnxruntime default':24s} {throughput(lambda chunk: session.run(None, {name: chunk}), x, seconds):12,.0f} samples/s")


if __name__ == "__main__":
    main()
