"""Runtime: OpenVINO on model.onnx (CPU), a second runtime for the same file. Torch-free.

The file is checked by the same bounds as for onnxruntime before OpenVINO parses it. Inference precision is
pinned to f32: on CPUs with bf16 or AMX units OpenVINO would otherwise compute in bf16, which no float32
tolerance accepts. Measured here (benchmarks/RESULTS.md): in f32 about as fast as onnxruntime at batch 1024 and slower at batch 1;
its speed on AMX / AVX512-BF16 CPUs comes from bf16, offered here as the approximate `openvino-bf16` (a second
runtime of this module).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from fcexport.errors import FcxError
from fcexport.onnx_checks import MAX_ONNX_BYTES, check_onnx_model, onnx_fingerprint, read_onnx_spec
from fcexport.targets import Checks, DeviceUnavailable, Predictor, Runtime, Unsupported


def _missing() -> str | None:
    return None if importlib.util.find_spec("openvino") else "openvino is not installed (pip install openvino)"


def open_openvino(files: tuple[Path, ...], device: str, checks: Checks, backend: str, precision: str = "f32") -> Predictor:
    """Read the file once; check those bytes (bounds, then `checks`); compile those bytes for the CPU, computing in
    `precision` (f32: exact; bf16: see openvino_bf16)."""
    path = files[0]
    data = checks.read(path, MAX_ONNX_BYTES)
    model, peak = check_onnx_model(data, path)
    spec = read_onnx_spec({p.key: p.value for p in model.metadata_props}, path, peak)
    checks.vet(path, backend, spec, onnx_fingerprint(model))
    declared = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    if declared != list(spec.input_shape):  # known from the checked graph, before OpenVINO sizes anything
        raise FcxError(f"{path}: the model's input is {declared} but its metadata says {list(spec.input_shape)}")
    request = _compiled(data, path, precision)
    layers = None
    if checks.source is not None and precision == "f32":  # verify: a failing row can name the layer where it broke
        from fcexport.targets.onnx import exported_layers

        layers = exported_layers(checks.source(spec), spec, lambda tap: _runner(_compiled(tap, path, precision), path))
    return Predictor(backend, device, path, _runner(request, path), spec, precision="float32" if precision == "f32" else precision,
                     layers=layers)


def _compiled(data: bytes, path: Path, precision: str):
    """An infer request of the ONNX bytes compiled for the CPU in `precision`."""
    import openvino

    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": min(4, os.cpu_count() or 1)}
    try:
        core = openvino.Core()
        compiled = core.compile_model(core.read_model(data), "CPU", config)
        request = compiled.create_infer_request()
    except Exception as exc:  # OpenVINO raises RuntimeError with its own multi-line text
        raise Unsupported(f"OpenVINO {openvino.__version__.split('-')[0]} cannot compile {path.name}: {_first_line(exc)}") from exc
    chosen = compiled.get_property("INFERENCE_PRECISION_HINT")
    if chosen != getattr(openvino.Type, precision):
        raise DeviceUnavailable(f"this CPU cannot compute in {precision}: OpenVINO chose {chosen.get_type_name()}")
    return request


def _runner(request, path: Path):
    """x -> the file's output, or a tuple of its outputs (the logits first) where it has several."""
    count = len(request.model_outputs)

    def run(x: np.ndarray):
        try:
            request.infer({0: x})
            found = tuple(request.get_output_tensor(i).data.copy() for i in range(count))
            return found[0] if count == 1 else found
        except Exception as exc:
            raise Unsupported(f"OpenVINO could not run {path.name} on a batch of {len(x)}: {_first_line(exc)}") from exc

    return run


def _first_line(exc: Exception) -> str:
    """The cause in OpenVINO's multi-line text: not its source locations ("Exception from src/...:117:", "Check 'false'
    failed at src/...") but e.g. "Conversion is failed for: AveragePool-18"."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    located = ("Exception from", "Check '")
    causes = [line for line in lines if not line.startswith(located) and not line.startswith("src/") and not line.endswith(":")]
    return (causes[0] if causes else lines[0] if lines else type(exc).__name__)[:300]


def open_bf16(files: tuple[Path, ...], device: str, checks: Checks, backend: str) -> Predictor:
    """OpenVINO's own default on CPUs with AMX or AVX512-BF16 units: bfloat16, 8 bits of mantissa instead of 24.
    Measured here 3.3x onnxruntime's float32 throughput for the default MLP at batch 1024 (benchmarks/RESULTS.md);
    approximate, so judged like int8 by top-1 agreement and never picked by `fcx predict` unasked."""
    return open_openvino(files, device, checks, backend, precision="bf16")


RUNTIMES = (
    # OpenVINO computes float32 with kernels of its own (other summation orders, fused ops): on 22 honest exports of
    # classifiers nobody here wrote its error reached 6.1x model.pt's own float32 error (timm fastvit_t8; 4.5-4.9x on
    # three more), where torch's runtimes and onnxruntime stay within 4x: its rows are judged at 2x the rule's factor.
    Runtime(name="openvino", format="onnx", devices=("cpu",), open=open_openvino, runs={"openvino": "onnx", "openvino-int8-static": "int8-static"},
            summary="Intel OpenVINO on model.onnx (CPU, float32)", missing=_missing, noise_scale=2.0),
    Runtime(name="openvino-bf16", format="onnx", devices=("cpu",), open=open_bf16, runs={"openvino-bf16": "onnx"},
            summary="Intel OpenVINO on model.onnx in bfloat16 (CPU with bf16 units, approximate)", missing=_missing,
            approximate=True),
)
