"""One predictor interface over every artifact: checkpoint (eager), TorchScript, ONNX Runtime; cpu or cuda.

A Predictor maps float32 pixels in [0, 1], shape (N, C, H, W), to float32 logits (N, classes).
ONNX needs neither torch nor fcexport's training code, so that path never imports torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fcexport.errors import FcxError

log = logging.getLogger(__name__)
DEFAULT_ORDER = ("model.onnx", "model.ts", "model.fused.pt", "model.pt")
# What each backend name stands for in an artifacts folder.
BACKEND_FILES = {
    "eager": "model.pt",
    "fused": "model.fused.pt",
    "torchscript": "model.ts",
    "onnxruntime": "model.onnx",
    "onnxruntime-int8": "model.int8.onnx",  # opt-in, approximate: see fcexport.export.export_int8_onnx
}
BACKEND_MADE_BY = {
    "eager": "fcx train",
    "fused": "fcx fuse-bn",
    "torchscript": "fcx export",
    "onnxruntime": "fcx export",
    "onnxruntime-int8": "fcx export --int8",
}
APPROXIMATE_BACKENDS = ("onnxruntime-int8",)  # judged by top-1 agreement and accuracy, not float tolerances
BACKENDS = tuple(BACKEND_FILES)
METADATA_FILE = "metadata.json"  # TorchScript _extra_files entry


class BackendUnavailable(FcxError):
    """This backend/device pair cannot run here (no CUDA, no ORT CUDA provider, no artifact).

    verify and bench list it as skipped; elsewhere (predict --device cuda) it is a user error.
    """


@dataclass
class Predictor:
    backend: str
    device: str
    source: Path
    run: Callable[[np.ndarray], np.ndarray]
    metadata: dict = field(default_factory=dict)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(x, dtype=np.float32))

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def input_shape(self) -> list[int]:
        return list(self.metadata["input_shape"])


def find_default_model(artifacts: Path) -> Path:
    """The best artifact present: ONNX, then TorchScript, then fused checkpoint, then checkpoint."""
    for name in DEFAULT_ORDER:
        if (artifacts / name).is_file():
            return artifacts / name
    raise FcxError(f"{artifacts}: no model found ({', '.join(DEFAULT_ORDER)}); run `fcx train` and `fcx export`, or pass --model")


def open_predictor(path: str | Path, device: str = "cpu") -> Predictor:
    """Open any artifact by its suffix: .onnx, .ts, or an fcexport checkpoint .pt."""
    path = Path(path)
    if not path.is_file():
        raise FcxError(f"{path}: model file not found; pass an existing .onnx, .ts or .pt file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return onnx_predictor(path, device)
    if suffix == ".ts":
        return torchscript_predictor(path, device)
    if suffix == ".pt":
        return checkpoint_predictor(path, device)
    raise FcxError(f"{path}: unknown model format '{suffix}'; expected .onnx, .ts or .pt")


@contextlib.contextmanager
def quiet_torchscript_deprecation():
    """torch.jit.* warns on every call that TorchScript is deprecated. We use it on purpose (users ask
    for .ts artifacts), so the warning is logged at debug level instead of shown on every command."""
    log.debug("TorchScript is deprecated upstream in favour of torch.export; model.onnx is the long-term format")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        yield


def open_backend(backend: str, artifacts: Path, device: str) -> Predictor:
    """Open a backend's artifact from a folder. Without model.fused.pt, `fused` folds model.pt in memory."""
    path = artifacts / BACKEND_FILES[backend]
    if backend == "fused" and not path.is_file() and (artifacts / "model.pt").is_file():
        from fcexport.checkpoint import artifact_metadata, load_checkpoint
        from fcexport.fuse import fuse_checkpoint_model

        checkpoint = load_checkpoint(artifacts / "model.pt")
        fused, _ = fuse_checkpoint_model(checkpoint)
        return module_predictor(fused, "fused", device, Path("(fused in memory from model.pt)"), artifact_metadata(checkpoint))
    if not path.is_file():
        raise BackendUnavailable(f"{path} not found; run `{BACKEND_MADE_BY[backend]}`")
    if backend in APPROXIMATE_BACKENDS and device != "cpu":
        raise BackendUnavailable(f"{path.name} is quantized for CPU inference only")
    return open_predictor(path, device)


# ---- torch -------------------------------------------------------------------------------


def torch_device(device: str):
    import torch

    if device not in ("cpu", "cuda"):
        raise FcxError(f"--device must be cpu or cuda, got {device}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    return torch.device(device)


def module_predictor(model, backend: str, device: str, source: Path, metadata: dict) -> Predictor:
    """Wrap an eval-mode nn.Module or ScriptModule; inference_mode skips autograd bookkeeping."""
    import torch

    dev = torch_device(device)
    model = model.to(dev).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x).to(dev)).float().cpu().numpy()

    return Predictor(backend, device, source, run, metadata)


def checkpoint_predictor(path: Path, device: str = "cpu") -> Predictor:
    from fcexport.checkpoint import artifact_metadata, load_model

    model, checkpoint = load_model(path)
    backend = "fused" if checkpoint.get("provenance", {}).get("fused") else "eager"
    return module_predictor(model, backend, device, path, artifact_metadata(checkpoint))


def torchscript_predictor(path: Path, device: str = "cpu") -> Predictor:
    """Load a TorchScript file. TorchScript files are code: load only files from trusted sources."""
    import torch

    dev = torch_device(device)
    extra = {METADATA_FILE: ""}
    try:
        with quiet_torchscript_deprecation():
            module = torch.jit.load(str(path), map_location=dev, _extra_files=extra)
        metadata = json.loads(extra[METADATA_FILE])
    except Exception as exc:  # corrupt zip, bad pickle, missing metadata all mean an unusable file
        raise FcxError(f"{path}: not a valid fcexport TorchScript file ({type(exc).__name__}); export it again with `fcx export`") from exc
    return module_predictor(module, "torchscript", device, path, metadata)


# ---- onnx runtime ------------------------------------------------------------------------


def ort_session_options(threads: int | None = None):
    """Settings measured for small MLPs (benchmarks/bench_inference.py): full graph optimisation,
    sequential execution (the graph is a chain), one inter-op thread, and intra-op threads capped
    at 4: on 2 cores, 2 threads made batch 1 ~1.5x and batch 1024 ~2x faster than 1 thread, while
    a 784x784 matmul is too small to gain from many more."""
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or min(4, os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return options


def ort_providers(device: str) -> list:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise FcxError(f"--device must be cpu or cuda, got {device}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailable("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    # TF32 would trade exactness for speed; verification compares at float32 tolerances.
    return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]


def onnx_predictor(path: Path, device: str = "cpu", threads: int | None = None) -> Predictor:
    import onnxruntime as ort

    providers = ort_providers(device)
    try:
        session = ort.InferenceSession(str(path), ort_session_options(threads), providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise FcxError(f"{path}: not a valid ONNX model ({type(exc).__name__}); export it again with `fcx export`") from exc
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise BackendUnavailable("onnxruntime could not start its CUDA provider")
    metadata = read_onnx_metadata(session.get_modelmeta().custom_metadata_map, path)
    backend = "onnxruntime-int8" if "quantization" in metadata else "onnxruntime"
    if backend == "onnxruntime-int8" and device != "cpu":
        raise BackendUnavailable(f"{path.name} is quantized for CPU inference only; use --device cpu")
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    return Predictor(backend, device, path, run, metadata)


def read_onnx_metadata(props: dict, path: Path) -> dict:
    """Decode the JSON values that `fcexport.export` stores in ONNX metadata_props; other tools'
    plain-text entries (the quantizer's `onnx.infer`) are skipped."""
    metadata = {}
    for key, value in props.items():
        with contextlib.suppress(ValueError):
            metadata[key] = json.loads(value)
    if "class_names" not in metadata or "input_shape" not in metadata:
        raise FcxError(f"{path}: ONNX model lacks fcexport metadata (class_names, input_shape); export it with `fcx export`")
    return metadata
