"""Runtime: ONNX Runtime on model.onnx and model.int8.onnx (CPU, and CUDA with onnxruntime-gpu). Torch-free."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fcexport.errors import FcxError
from fcexport.onnx_checks import MAX_ONNX_BYTES, QUANTIZATION_KEY, check_onnx_model, checked_before, onnx_fingerprint, read_onnx_spec
from fcexport.targets import Checks, DeviceUnavailable, Predictor, Runtime


def session_options(threads: int | None = None):
    """Settings measured for small MLPs (benchmarks/bench_inference.py): full graph optimisation,
    sequential execution (the graph is a chain), one inter-op thread, and intra-op threads capped
    at 4: on 2 cores, 2 threads made batch 1 ~1.5x and batch 1024 ~2x faster than 1 thread, while
    a 784x784 matmul is too small to gain from many more."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: its errors come back as exceptions, said in one line by fcx
    return options


def providers(device: str) -> list:
    """Execution providers for "cpu" or "cuda"."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeviceUnavailable("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)", hint="cpu")
    # TF32 would trade exactness for speed; verification compares at float32 tolerances.
    return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]


def open_onnx(files: tuple[Path, ...], device: str, checks: Checks, backend: str) -> Predictor:
    """Read the file once; check those bytes (bounds, then `checks`), run those bytes. Bytes that passed the bounds
    check before, opened with nothing else to check (predict, serve), go straight to onnxruntime: no onnx import."""
    path = files[0]
    data = checks.read(path, MAX_ONNX_BYTES)
    peak = checked_before(data) if checks.admit is None and checks.source is None else None
    if peak is not None:
        session = _session(data, path, device)
        spec = read_onnx_spec(dict(session.get_modelmeta().custom_metadata_map), path, peak)
        model = None
    else:
        model, peak = check_onnx_model(data, path)
        spec = read_onnx_spec({p.key: p.value for p in model.metadata_props}, path, peak)
        checks.vet(path, backend, spec, onnx_fingerprint(model))
        session = _session(data, path, device)
    declared = [d if isinstance(d, int) else None for d in session.get_inputs()[0].shape[1:]]
    if declared != list(spec.input_shape):
        raise FcxError(f"{path}: the model's input is {declared} but its metadata says {list(spec.input_shape)}")
    layers = left_float = None
    if checks.source is not None:  # verify: a failing row names the layer where it broke, an int8 one what carries its error
        from fcexport.targets import int8
        from fcexport.targets.onnx import exported_layers

        def compiled(onnx_bytes: bytes):
            return _runner(_session(onnx_bytes, path, device), path)

        quantized = {p.key: p.value for p in model.metadata_props}.get(QUANTIZATION_KEY)
        if quantized is not None:  # dynamic int8 can be remade here layer by layer; static needs its calibration images
            left_float = int8.left_float(checks.source(spec), spec, compiled) if "dynamic" in quantized else None
        else:
            layers = exported_layers(checks.source(spec), spec, compiled)
    return Predictor(backend, device, path, _runner(session, path), spec, layers=layers, left_float=left_float)


def _session(data: bytes, path: Path, device: str):
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(data, session_options(), providers=providers(device))
    except DeviceUnavailable:
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise FcxError(f"{path}: not a valid ONNX model ({type(exc).__name__})", hint="export") from exc
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise DeviceUnavailable("onnxruntime could not start its CUDA provider", hint="cpu")
    return session


def _runner(session, path: Path):
    """x -> the session's output, or a tuple of its outputs (the logits first) where it has several."""
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray):
        try:
            found = session.run(None, {input_name: x})
            return found[0] if len(found) == 1 else tuple(found)
        except Exception as exc:  # ORT's Fail / RuntimeException: the model cannot run on this input
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise FcxError(f"{path}: onnxruntime could not run the model on a batch of {len(x)}: {first}") from exc

    return run


RUNTIME = Runtime(
    name="onnxruntime", format="onnx", devices=("cpu", "cuda"), open=open_onnx,
    runs={"onnxruntime": "onnx", "onnxruntime-int8": "int8", "onnxruntime-int8-static": "int8-static"},
    summary="ONNX Runtime (CPU; CUDA with onnxruntime-gpu)",
)
