"""Runtime: OpenVINO on model.onnx (CPU), a second runtime for the same file. Torch-free.

The file is checked by the same bounds as for onnxruntime before OpenVINO parses it. Inference precision is
pinned to f32: on CPUs with bf16 or AMX units OpenVINO would otherwise compute in bf16, which no float32
tolerance accepts. Measured here (benchmarks/RESULTS.md): faster than onnxruntime at large batches, slower at 1.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from fcexport.errors import FcxError
from fcexport.onnx_checks import check_onnx_model, onnx_fingerprint, read_onnx_spec
from fcexport.targets import Checks, Predictor, Runtime, read_bytes


def _missing() -> str | None:
    return None if importlib.util.find_spec("openvino") else "openvino is not installed (pip install openvino)"


def open_openvino(files: tuple[Path, ...], device: str, checks: Checks, backend: str) -> Predictor:
    """Read the file once; check those bytes (bounds, then `checks`); compile those bytes for the CPU."""
    import openvino

    path = files[0]
    data = read_bytes(path)
    model = check_onnx_model(data, path)
    spec = read_onnx_spec({p.key: p.value for p in model.metadata_props}, path)
    checks.vet(path, backend, spec, onnx_fingerprint(model))
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": min(4, os.cpu_count() or 1)}
    try:
        core = openvino.Core()
        compiled = core.compile_model(core.read_model(data), "CPU", config)
    except Exception as exc:  # OpenVINO raises RuntimeError with its own multi-line text
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FcxError(f"{path}: OpenVINO cannot compile this model ({first})") from exc
    declared = compiled.input(0).get_partial_shape()
    if [d.get_length() if d.is_static else None for d in declared][1:] != list(spec.input_shape):
        raise FcxError(f"{path}: the model's input is {declared} but its metadata says {list(spec.input_shape)}")
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        try:
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise FcxError(f"{path}: OpenVINO could not run the model on a batch of {len(x)}: {first}") from exc

    return Predictor(backend, device, path, run, spec)


RUNTIME = Runtime(name="openvino", format="onnx", devices=("cpu",), open=open_openvino, runs={"openvino": "onnx"},
                  summary="Intel OpenVINO on model.onnx (CPU)", missing=_missing)
