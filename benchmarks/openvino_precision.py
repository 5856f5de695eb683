"""OpenVINO's throughput by inference precision against onnxruntime, one process, the same model.onnx.

    python benchmarks/openvino_precision.py artifacts/bench-mlp/model.onnx [--batch 1024] [--seconds 2]

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
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    data = open(args.model, "rb").read()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else args.batch for d in session.get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    core = ov.Core()
    for label, config in (("openvino default", {}), ("openvino f32", {"INFERENCE_PRECISION_HINT": "f32"}),
                          ("openvino f32 THROUGHPUT", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT"})):
        compiled = core.compile_model(core.read_model(data), "CPU", config)
        request = compiled.create_infer_request()
        speed = throughput(lambda batch: request.infer({0: batch}), x, args.seconds)
        print(f"{label:24s} {speed:12,.0f} samples/s  (computes in {compiled.get_property('INFERENCE_PRECISION_HINT')})")
    name = session.get_inputs()[0].name
    print(f"{'onnxruntime default':24s} {throughput(lambda batch: session.run(None, {name: batch}), x, args.seconds):12,.0f} samples/s")


if __name__ == "__main__":
    main()
