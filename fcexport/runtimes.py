"""Runtimes: one per format (torch module, TorchScript, ONNX Runtime), each with the devices it runs on.

A Predictor maps float32 pixels in [0, 1], shape (N, C, H, W), to float32 logits (N, classes), and
carries the model's spec. The ONNX path needs neither torch nor fcexport's training code, so it never
imports torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fcexport.errors import FcxError
from fcexport.spec import ModelSpec

log = logging.getLogger(__name__)
METADATA_FILE = "metadata.json"  # TorchScript _extra_files entry holding the spec
QUANTIZATION_KEY = "quantization"  # ONNX metadata entry that marks the int8 model
# Devices each runtime can use; "onnxruntime-int8" is the int8 ONNX model, quantized for CPU kernels.
RUNTIME_DEVICES = {
    "torch": ("cpu", "cuda"),
    "torchscript": ("cpu", "cuda"),
    "onnxruntime": ("cpu", "cuda"),
    "onnxruntime-int8": ("cpu",),
}
DEVICES = ("cpu", "cuda")


class DeviceUnavailable(FcxError):
    """This runtime/device pair cannot run here (no CUDA, no ORT CUDA provider, a CPU-only model).

    verify and bench list it as skipped; elsewhere (predict on cuda) it is a user error.
    """


@dataclass
class Predictor:
    """Runs a model: float32 pixels (N, C, H, W) in [0, 1] -> logits. `weights`, where the format
    allows it, lists the tensors the artifact holds, so verification can check its structure."""

    backend: str
    device: str
    source: Path
    run: Callable[[np.ndarray], np.ndarray]
    spec: ModelSpec
    weights: Callable[[], list[np.ndarray]] | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        logits = self.run(np.ascontiguousarray(x, dtype=np.float32))
        expected = (len(x), len(self.spec.class_names))
        if getattr(logits, "shape", None) != expected:
            raise FcxError(f"{self.source}: the model returned shape {getattr(logits, 'shape', type(logits).__name__)} "
                           f"for {len(x)} images, but its spec names {expected[1]} classes: expected {expected}")
        return logits


def open_predictor(path: str | Path, device: str = "cpu") -> Predictor:
    """Open any artifact by its suffix: .onnx, .ts, or an fcexport model .pt."""
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
    if suffix == ".pt2":
        raise FcxError(f"{path}: a torch.export program is not a way in; save model.state_dict() and import it", hint="import")
    raise FcxError(f"{path}: unknown model format '{suffix}'; expected .onnx, .ts or .pt")


@contextlib.contextmanager
def quiet_torchscript_deprecation():
    """torch.jit.* warns on every call that TorchScript is deprecated. We use it on purpose (users ask
    for .ts artifacts), so the warning is logged at debug level instead of shown on every command."""
    log.debug("TorchScript is deprecated upstream in favour of torch.export; model.onnx is the long-term format")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        # scripting an fx GraphModule of nested plain containers triggers a harmless annotation warning
        warnings.filterwarnings("ignore", message=r".*instance-level annotations", category=UserWarning)
        yield


# ---- torch -------------------------------------------------------------------------------


def torch_device(device: str):
    import torch

    if device not in ("cpu", "cuda"):
        raise FcxError(f"device must be cpu or cuda, got {device}")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("no CUDA device here (torch.cuda.is_available() is False)", hint="cpu")
    return torch.device(device)


def module_predictor(model, backend: str, device: str, source: Path, spec: ModelSpec) -> Predictor:
    """Wrap an eval-mode nn.Module or ScriptModule; inference_mode skips autograd bookkeeping."""
    import torch

    dev = torch_device(device)
    model = model.to(dev).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x).to(dev)).float().cpu().numpy()

    return Predictor(backend, device, source, run, spec)


def checkpoint_predictor(path: Path, device: str = "cpu") -> Predictor:
    from fcexport.checkpoint import load_model

    model, spec = load_model(path)
    backend = "fused" if spec.provenance.get("fused") else "eager"
    predictor = module_predictor(model, backend, device, path, spec)
    predictor.weights = lambda: [t.detach().cpu().numpy() for t in model.state_dict().values()]
    return predictor


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
        raise FcxError(f"{path}: not a valid fcexport TorchScript file ({type(exc).__name__})", hint="export") from exc
    predictor = module_predictor(module, "torchscript", device, path, ModelSpec.from_dict(metadata, str(path)))
    predictor.weights = lambda: torchscript_weights(module)
    return predictor


def torchscript_weights(module) -> list[np.ndarray]:
    """A frozen TorchScript module keeps its weights as tensor constants of its graph."""
    tensors = [t.detach().cpu().numpy() for t in module.parameters()] + [b.detach().cpu().numpy() for b in module.buffers()]
    for node in module.graph.nodes():
        if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType":
            tensors.append(node.t("value").detach().cpu().numpy())
    return tensors


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
    """Execution providers for "cpu" or "cuda" (the name is checked by the caller)."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeviceUnavailable("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)", hint="cpu")
    # TF32 would trade exactness for speed; verification compares at float32 tolerances.
    return [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]


# What fcexport's exporters emit for the layers the graph allow-list admits (fcexport.graph), plus
# BatchNormalization (--no-fuse) and the int8 quantizer's ops. Anything else (Loop, Scan, If,
# ConstantOfShape, Expand, Tile, Resize, ...) could loop or allocate without bound: refused.
ONNX_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Relu", "LeakyRelu", "Elu", "Gelu", "Erf", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Clip", "Softmax", "LogSoftmax", "Gemm", "MatMul", "Conv", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "BatchNormalization", "LayerNormalization",
    "GroupNormalization", "InstanceNormalization", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
    "Concat", "Split", "Slice", "Gather", "Shape", "Identity", "Constant", "Cast", "Dropout", "Pow", "Sqrt",
    "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger",
})
MAX_ONNX_BYTES = 1 << 30
MAX_ATTRIBUTE = 4096  # kernel sizes, pads, strides, dilations


def check_onnx_model(path: Path) -> dict[str, str]:
    """Refuse an ONNX file that could hang or exhaust memory, before onnxruntime parses or folds it:
    ops outside ONNX_OPS, subgraphs, external data, unbounded input shapes, outsized attributes.
    Returns the file's metadata_props, read from the same parse."""
    import onnx

    if path.stat().st_size > MAX_ONNX_BYTES:
        raise FcxError(f"{path}: {path.stat().st_size:,} bytes is larger than fcexport accepts ({MAX_ONNX_BYTES:,})")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise FcxError(f"{path}: not a valid ONNX model ({type(exc).__name__})", hint="export") from exc
    graph = model.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise FcxError(f"{path}: refers to external weight files, which fcexport does not load")
    for node in graph.node:
        where = f"{path}: node '{node.name or node.op_type}'"
        if node.domain not in ("", "ai.onnx") or node.op_type not in ONNX_OPS:
            raise FcxError(f"{where}: op {node.domain + '.' if node.domain else ''}{node.op_type} is not on fcexport's allow-list")
        for attribute in node.attribute:
            if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise FcxError(f"{where}: subgraphs are not allowed")
            if attribute.ints and max(abs(v) for v in attribute.ints) > MAX_ATTRIBUTE:
                raise FcxError(f"{where}: attribute {attribute.name} {list(attribute.ints)[:4]} is out of range")
    if len(graph.input) != 1:
        raise FcxError(f"{path}: the model must take one input (pixels), it takes {len(graph.input)}")
    dims = graph.input[0].type.tensor_type.shape.dim
    fixed = [d.dim_value for d in dims[1:]]
    if len(dims) != 4 or not all(0 < v <= MAX_ATTRIBUTE for v in fixed):
        raise FcxError(f"{path}: the input must be (N, C, H, W) with fixed C, H, W of at most {MAX_ATTRIBUTE}")
    return {p.key: p.value for p in model.metadata_props}


def onnx_predictor(path: Path, device: str = "cpu", threads: int | None = None) -> Predictor:
    import onnxruntime as ort

    if device not in DEVICES:
        raise FcxError(f"device must be cpu or cuda, got {device}")
    props = check_onnx_model(path)
    spec = read_onnx_spec(props, path)
    backend = "onnxruntime-int8" if QUANTIZATION_KEY in props else "onnxruntime"
    if device not in RUNTIME_DEVICES[backend]:  # known before any session (or CUDA provider) is started
        raise DeviceUnavailable(f"{path.name} is quantized for CPU inference only", hint="cpu")
    providers = ort_providers(device)
    try:
        session = ort.InferenceSession(str(path), ort_session_options(threads), providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise FcxError(f"{path}: not a valid ONNX model ({type(exc).__name__})", hint="export") from exc
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise DeviceUnavailable("onnxruntime could not start its CUDA provider", hint="cpu")
    declared = [d if isinstance(d, int) else None for d in session.get_inputs()[0].shape[1:]]
    if declared != spec.input_shape:
        raise FcxError(f"{path}: the model's input is {declared} but its metadata says {spec.input_shape}")
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    return Predictor(backend, device, path, run, spec, weights=lambda: onnx_weights(path))


def onnx_weights(path: Path) -> list[np.ndarray]:
    """The initializers and Constant tensors of an ONNX file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    tensors = [numpy_helper.to_array(t) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"]
    return tensors


def read_onnx_spec(props: dict, path: Path) -> ModelSpec:
    """The spec from ONNX metadata_props, where each field is one JSON-valued entry; other tools'
    plain-text entries (the quantizer's `onnx.infer`) are skipped."""
    fields = {}
    for key, value in props.items():
        with contextlib.suppress(ValueError):
            fields[key] = json.loads(value)
    if "class_names" not in fields or "input_shape" not in fields:
        raise FcxError(f"{path}: ONNX model lacks fcexport metadata (class_names, input_shape)", hint="export")
    return ModelSpec.from_dict(fields, str(path))
