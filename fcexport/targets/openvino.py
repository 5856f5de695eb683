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
from fcexport.onnx_checks import MAX_ONNX_BYTES, check_onnx_model, onnx_fingerprint, read_onnx_spec
from fcexport.targets import Checks, Predictor, Runtime


def _missing() -> str | None:
    return None if importlib.util.find_spec("openvino") else "openvino is not installed (pip install openvino)"


def open_openvino(files: tuple[Path, ...], device: str, checks: Checks, backend: str) -> Predictor:
    """Read the file once; check those bytes (bounds, then `checks`); compile those bytes for the CPU."""
    import openvino

    path = files[0]
    data = checks.read(path, MAX_ONNX_BYTES)
    model = check_onnx_model(data, path)
    spec = read_onnx_spec({p.key: p.value for p in model.metadata_props}, path)
    checks.vet(path, backend, spec, onnx_fingerprint(model))
    declared = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    if declared != list(spec.input_shape):  # known from the checked graph, before OpenVINO sizes anything
        raise FcxError(f"{path}: the model's input is {declared} but its metadata says {list(spec.input_shape)}")
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": min(4, os.cpu_count() or 1)}
    try:
        core = openvino.Core()
        compiled = core.compile_model(core.read_model(data), "CPU", config)
        request = compiled.create_infer_request()
    except Exception as exc:  # OpenVINO raises RuntimeError with its own multi-line text
        raise FcxError(f"{path}: OpenVINO cannot compile this model ({_first_line(exc)})") from exc

    def run(x: np.ndarray) -> np.ndarray:
        try:
            request.infer({0: x})
            return request.get_output_tensor(0).data.copy()
        except Exception as exc:
            raise FcxError(f"{path}: OpenVINO could not run the model on a batch of {len(x)}: {_first_line(exc)}") from exc

    return Predictor(backend, device, path, run, spec)


def _first_line(exc: Exception) -> str:
    """OpenVINO's messages start with a source location ("Exception from src/...:117:"); the cause is on a later line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().startswith("Exception from")]
    return (lines[0] if lines else type(exc).__name__)[:300]


RUNTIME = Runtime(name="openvino", format="onnx", devices=("cpu",), open=open_openvino, runs={"openvino": "onnx"},
                  summary="Intel OpenVINO on model.onnx (CPU)", missing=_missing)
