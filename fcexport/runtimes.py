"""Runtimes: one per format (torch module, TorchScript, ONNX Runtime), each with the devices it runs on.

A Predictor maps float32 pixels in [0, 1], shape (N, C, H, W), to float32 logits (N, classes), and
carries the model's spec. The ONNX path needs neither torch nor fcexport's training code, so it never
imports torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fcexport.errors import FcxError
from fcexport.spec import MAX_MACS, MAX_TENSOR_BYTES, MAX_TOTAL_BYTES, ModelSpec

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


@dataclass(frozen=True)
class Predictor:
    """Runs a model: float32 pixels (N, C, H, W) in [0, 1] -> logits, in batches of at most `batch`. (What an
    artifact computes with is checked before it becomes one: see `Admit`.)"""

    backend: str
    device: str
    source: Path
    run: Callable[[np.ndarray], np.ndarray]
    spec: ModelSpec
    batch: int = 256

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = [self.run(x[i : i + self.batch]) for i in range(0, len(x), self.batch)] if len(x) else [self.run(x)]
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts)
        expected = (len(x), len(self.spec.class_names))
        if getattr(logits, "shape", None) != expected:
            raise FcxError(f"{self.source}: the model returned shape {getattr(logits, 'shape', type(logits).__name__)} "
                           f"for {len(x)} images, but its spec names {expected[1]} classes: expected {expected}")
        return logits


def open_predictor(path: str | Path, device: str = "cpu", admit: Admit | None = None) -> Predictor:
    """Open any artifact by its suffix: .onnx, .ts, or an fcexport model .pt (data: checked as it is read);
    `admit` checks an exported file's spec and fingerprint before it is loaded."""
    path = Path(path)
    if not path.is_file():
        raise FcxError(f"{path}: model file not found; pass an existing .onnx, .ts or .pt file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return onnx_predictor(path, device, admit=admit)
    if suffix == ".ts":
        return torchscript_predictor(path, device, admit)
    if suffix == ".pt":
        return checkpoint_predictor(path, device, admit)
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
        warnings.filterwarnings("ignore", category=torch_tracer_warning())  # the exporter checks its trace itself
        yield


# ---- torch -------------------------------------------------------------------------------


def torch_tracer_warning():
    import torch

    return torch.jit.TracerWarning


def torch_device(device: str):
    import torch

    if device not in ("cpu", "cuda"):
        raise FcxError(f"device must be cpu or cuda, got {device}")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("no CUDA device here (torch.cuda.is_available() is False)", hint="cpu")
    return torch.device(device)


def module_predictor(module, backend: str, device: str, source: Path, spec: ModelSpec, batch: int = 256) -> Predictor:
    """Wrap an eval-mode nn.Module or ScriptModule that this predictor owns; inference_mode skips autograd."""
    import torch

    dev = torch_device(device)
    module = module.to(dev).eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(dev)).float().cpu().numpy()

    return Predictor(backend, device, source, run, spec, batch)


def program_predictor(program, backend: str, device: str, source: Path, spec: ModelSpec, batch: int = 256) -> Predictor:
    """Run a stored program (fcexport.program) through a fresh interpreter of its own on `device`."""
    from fcexport.program import ProgramModule

    return module_predictor(ProgramModule(program), backend, device, source, spec, batch)


def float64_logits(program, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """The reference: the program run in float64 on the CPU (every float32 tensor and op widened)."""
    import torch

    from fcexport.program import ProgramModule

    module = ProgramModule(program).double().eval()
    with torch.inference_mode():
        parts = [module(torch.from_numpy(x[i : i + batch]).double()).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(parts) if parts else np.zeros((0,), dtype=np.float64)


def checkpoint_predictor(path: Path, device: str = "cpu", admit: Admit | None = None) -> Predictor:
    """An fcexport model .pt (data, checked as it is read); `admit` sees its spec and fingerprint first."""
    from fcexport.checkpoint import read_model
    from fcexport.program import fingerprint

    stored = read_model(path)
    backend = "fused" if stored.spec.provenance.get("fused") else "eager"
    problems = admit(backend, stored.spec, fingerprint(stored.program)) if admit else []
    if problems:
        raise Refused(path, problems)
    return program_predictor(stored.program, backend, device, path, stored.spec)


class Refused(FcxError):
    """An artifact that `admit` turned away before it was loaded, with the reasons (fcx verify's structure check)."""

    def __init__(self, path: Path, problems: list[str]):
        super().__init__(f"{path}: not loaded: {'; '.join(problems)}")
        self.problems = problems


# admit(backend, spec, fingerprint) -> problems: a check that runs on an artifact's bytes before it is loaded
Admit = Callable[[str, ModelSpec, dict], list]


def torchscript_predictor(path: Path, device: str = "cpu", admit: Admit | None = None) -> Predictor:
    """Load a TorchScript file, read once. TorchScript files are code: `admit` sees the archive's spec and
    fingerprint first (fcx verify: the file must equal a fresh export), so nothing else is ever loaded."""
    import io

    import torch

    dev = torch_device(device)
    data = _read(path)
    spec, fingerprint = torchscript_archive(data, path)
    problems = admit("torchscript", spec, fingerprint) if admit else []
    if problems:
        raise Refused(path, problems)
    try:
        with quiet_torchscript_deprecation():
            module = torch.jit.load(io.BytesIO(data), map_location=dev)
    except Exception as exc:  # corrupt zip, bad pickle: an unusable file
        raise FcxError(f"{path}: not a valid fcexport TorchScript file ({type(exc).__name__})", hint="export") from exc
    return module_predictor(module, "torchscript", device, path, spec)


MAX_ARCHIVE_RECORDS = 100_000
TORCH_MANGLE = re.compile(rb"___torch_mangle_\d+")


def torchscript_archive(data: bytes, path: Path | str = "model.ts") -> tuple[ModelSpec, dict[str, str]]:
    """(spec, fingerprint) of a TorchScript archive from its bytes, without loading it: every record (code,
    pickles, tensors) by its sha256, with torch's per-process class-name counters (`___torch_mangle_N`) and the
    debug source ranges (`.debug_pkl`, offsets into the code, only read for error messages) left out, so two
    exports of one program match and any other change does not."""
    import hashlib
    import io
    import zipfile

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        records = archive.infolist()
        unpacked = sum(r.file_size for r in records)  # zipfile reads no more than each record declares
        if len(records) > MAX_ARCHIVE_RECORDS or unpacked > 2 * len(data) + (16 << 20):
            raise ValueError(f"{len(records):,} records unpacking to {unpacked:,} bytes")
        items, spec = {}, None
        for record in records:
            name = TORCH_MANGLE.sub(b"___torch_mangle_N", record.filename.split("/", 1)[-1].encode()).decode()
            if name.endswith(".debug_pkl") or name == ".data/serialization_id":
                continue
            body = archive.read(record)
            if name == f"extra/{METADATA_FILE}":
                spec = ModelSpec.from_dict(json.loads(body.decode("utf-8")), str(path))
                continue  # the spec is compared on its own
            items[f"record '{name}'"] = hashlib.sha256(TORCH_MANGLE.sub(b"___torch_mangle_N", body)).hexdigest()
    except FcxError:
        raise
    except Exception as exc:  # BadZipFile, JSON, UTF-8, the checks above
        raise FcxError(f"{path}: not a valid fcexport TorchScript file ({type(exc).__name__}: {str(exc)[:100]})", hint="export") from exc
    if spec is None:
        raise FcxError(f"{path}: not a valid fcexport TorchScript file (no fcexport metadata)", hint="export")
    return spec, items


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FcxError(f"{path}: cannot read ({exc.strerror or exc})") from exc


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
    options.log_severity_level = 4  # fatal only: its errors come back as exceptions, said in one line by fcx
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


# What torch's exporter emits for fcexport's opset (fcexport/opset.py) and the int8 quantizer's ops. Left out:
# control flow and subgraphs (Loop, If, Scan), random numbers, sequences, strings, other domains. Ops whose
# output size comes from their inputs' values (Expand, ConstantOfShape, Tile, Range, Resize, Pad, ...) are
# allowed only where shape inference at batch 1 bounds that size (check_onnx_model).
ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BitwiseAnd BitwiseNot
BitwiseOr BitwiseXor Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvInteger ConvTranspose Cos
Cosh CumSum DepthToSpace DequantizeLinear Div Dropout DynamicQuantizeLinear Einsum Elu Equal Erf Exp Expand Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization HardSigmoid HardSwish Hardmax Identity InstanceNormalization IsInf IsNaN LayerNormalization
LeakyRelu Less LessOrEqual Log LogSoftmax LpNormalization MatMul MatMulInteger Max MaxPool Mean Min Mish Mod Mul Neg
Not Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScatterElements ScatterND Selu Shape Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh Tile TopK Transpose Trilu
Unsqueeze Where Xor
""".split())
MAX_ONNX_BYTES = 1 << 30
MAX_ATTRIBUTE = 4096  # kernel sizes, pads, strides, dilations
MAX_ONNX_ELEMENTS = MAX_TENSOR_BYTES // 4  # values of any one tensor at batch 1 (float32: a stored model's bound)
MAX_ONNX_TOTAL = MAX_TOTAL_BYTES // 4  # values of one image together


def check_onnx_model(data: bytes, path: Path):
    """Refuse an ONNX file that could hang or exhaust memory, before onnxruntime parses or folds it: ops
    outside ONNX_OPS, subgraphs, external data, sparse tensors, outsized attributes, an input that is not
    (N, C, H, W), and any tensor that shape inference at batch 1 cannot bound or finds too large.
    Returns the parsed onnx.ModelProto, so nothing parses the bytes again."""
    import onnx

    if len(data) > MAX_ONNX_BYTES:
        raise FcxError(f"{path}: {len(data):,} bytes is larger than fcexport accepts ({MAX_ONNX_BYTES:,})")
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise FcxError(f"{path}: not a valid ONNX model ({type(exc).__name__})", hint="export") from exc
    graph = model.graph
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        raise FcxError(f"{path}: refers to external weight files, which fcexport does not load")
    if len(graph.sparse_initializer) or model.functions:
        raise FcxError(f"{path}: holds sparse initializers or functions, which fcexport never writes: refused")
    for node in graph.node:
        where = f"{path}: node '{node.name or node.op_type}'"
        if node.domain not in ("", "ai.onnx") or node.op_type not in ONNX_OPS:
            raise FcxError(f"{where}: op {node.domain + '.' if node.domain else ''}{node.op_type} is not on fcexport's allow-list")
        for attribute in node.attribute:
            if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS, onnx.AttributeProto.SPARSE_TENSOR):
                raise FcxError(f"{where}: subgraphs and sparse tensors are not allowed")
            if attribute.ints and max(abs(v) for v in attribute.ints) > MAX_ATTRIBUTE:
                raise FcxError(f"{where}: attribute {attribute.name} {list(attribute.ints)[:4]} is out of range")
    if len(graph.input) != 1:
        raise FcxError(f"{path}: the model must take one input (pixels), it takes {len(graph.input)}")
    dims = graph.input[0].type.tensor_type.shape.dim
    fixed = [d.dim_value for d in dims[1:]]
    if len(dims) != 4 or not all(0 < v <= MAX_ATTRIBUTE for v in fixed):
        raise FcxError(f"{path}: the input must be (N, C, H, W) with fixed C, H, W of at most {MAX_ATTRIBUTE}")
    _check_inferred_sizes(model, path)
    return model


def _check_inferred_sizes(model, path: Path) -> None:
    """Shape inference at batch 1 (with constant propagation), then a bound for every value: its inferred
    size, or (unknown) one derived from its inputs by what the op can do (SIZE_OF_INPUT_OPS never grow their
    largest input; broadcasting ops at most the product of their inputs; Gather and friends data x indices).
    Each value must stay within MAX_ONNX_ELEMENTS, all of them together within MAX_ONNX_TOTAL, and the
    multiply-accumulates of Conv / MatMul / Gemm within MAX_MACS (the budget of a stored model too)."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    probe.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    del probe.graph.value_info[:]  # recorded shapes could lie: infer them afresh
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise FcxError(f"{path}: shapes are inconsistent ({type(exc).__name__}: {str(exc).strip()[:160]})") from exc
    shapes = {t.name: list(t.dims) for t in inferred.graph.initializer}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shape = value.type.tensor_type.shape
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in shape.dim):
            shapes[value.name] = [d.dim_value for d in shape.dim]
    bounds = {name: float(np.prod(shape, dtype=np.float64)) for name, shape in shapes.items()}
    total = macs = 0.0
    for node in inferred.graph.node:
        where = f"{path}: node '{node.name or node.op_type}' ({node.op_type})"
        given = [bounds.get(name) for name in node.input if name]
        for output in (o for o in node.output if o):
            bound = bounds.get(output)
            if bound is None:
                bound = _unknown_size_bound(node.op_type, given)
                if bound is None:
                    raise FcxError(f"{where}: the size of its output cannot be bounded before running it; refused")
                bounds[output] = bound
            if bound > MAX_ONNX_ELEMENTS:
                raise FcxError(f"{where} makes {bound:,.0f} values for one image (at most {MAX_ONNX_ELEMENTS:,})")
            total += bound
            macs += _macs(node, shapes, bound)
        if total > MAX_ONNX_TOTAL:
            raise FcxError(f"{where}: the values of one image reach {total:,.0f} in all (at most {MAX_ONNX_TOTAL:,}); refused")
        if macs > MAX_MACS:
            raise FcxError(f"{where}: one image takes more than {MAX_MACS:.0e} multiply-accumulates; refused")


BROADCASTING_OPS = frozenset("Add And BitwiseAnd BitwiseOr BitwiseXor Div Equal Greater GreaterOrEqual Less LessOrEqual Max "
                             "Mean Min Mod Mul Or Pow PRelu Sub Sum Where Xor".split())
GATHERING_OPS = frozenset("Gather GatherElements GatherND".split())


def _unknown_size_bound(op: str, inputs: list) -> float | None:
    """The most elements an output of `op` can have, from its inputs' bounds; None when it cannot be bounded."""
    if not inputs or any(b is None for b in inputs):
        return None
    if op in BROADCASTING_OPS:
        return float(np.prod(inputs, dtype=np.float64))
    if op in GATHERING_OPS:
        return inputs[0] * inputs[1]
    if op in SIZE_OF_INPUT_OPS:
        return max(inputs)
    return None


def _macs(node, shapes: dict, size: float) -> float:
    """Multiply-accumulates behind `size` output values of a Conv / MatMul / Gemm (0 for other ops); an operand
    of unknown shape counts MAX_ONNX_ELEMENTS per output value, so it cannot hide."""
    if node.op_type in ("Conv", "ConvTranspose", "ConvInteger"):
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        return size * (float(np.prod(weight[1:], dtype=np.float64)) if weight else MAX_ONNX_ELEMENTS)
    if node.op_type in ("MatMul", "MatMulInteger", "Gemm"):
        first = shapes.get(node.input[0])
        transposed = node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
        return size * ((first[-2] if transposed else first[-1]) if first else MAX_ONNX_ELEMENTS)
    return 0.0


# Ops whose output is never larger than their largest input (unary elementwise, reductions, views): an unknown
# shape there follows from a bounded one before it. BROADCASTING_OPS and GATHERING_OPS get looser bounds;
# everything else must be sized by shape inference.
SIZE_OF_INPUT_OPS = frozenset("""
Abs Acos Acosh ArgMax ArgMin Asin Asinh Atan Atanh BitwiseNot Cast CastLike Ceil Celu Clip Cos Cosh CumSum
DequantizeLinear Dropout DynamicQuantizeLinear Elu Erf Exp Flatten Floor Gelu HardSigmoid HardSwish Hardmax
Identity IsInf IsNaN LeakyRelu Log LogSoftmax Mish Neg Not QuantizeLinear Reciprocal ReduceL1 ReduceL2
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Round Selu Shape
Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign Split Sqrt Squeeze Tan Tanh TopK Transpose Trilu
Unsqueeze
""".split())


def onnx_predictor(path: Path, device: str = "cpu", threads: int | None = None, admit: Admit | None = None) -> Predictor:
    """Read the file once; check those bytes (bounds, then `admit`), run those bytes, fingerprint those bytes."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise FcxError(f"device must be cpu or cuda, got {device}")
    data = _read(path)
    model = check_onnx_model(data, path)
    props = {p.key: p.value for p in model.metadata_props}
    spec = read_onnx_spec(props, path)
    backend = "onnxruntime-int8" if QUANTIZATION_KEY in props else "onnxruntime"
    problems = admit(backend, spec, onnx_fingerprint(model)) if admit else []
    if problems:
        raise Refused(path, problems)
    if device not in RUNTIME_DEVICES[backend]:  # known before any session (or CUDA provider) is started
        raise DeviceUnavailable(f"{path.name} is quantized for CPU inference only", hint="cpu")
    providers = ort_providers(device)
    try:
        session = ort.InferenceSession(data, ort_session_options(threads), providers=providers)
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
        try:
            return session.run([output_name], {input_name: x})[0]
        except Exception as exc:  # ORT's Fail / RuntimeException: the model cannot run on this input
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise FcxError(f"{path}: onnxruntime could not run the model on a batch of {len(x)}: {first}") from exc

    return Predictor(backend, device, path, run, spec)


def onnx_fingerprint(model) -> dict[str, str]:
    """What an ONNX model (an onnx.ModelProto, or its bytes) computes with: every initializer (sparse ones
    included) by its bytes, every node with its inputs, outputs and attributes (tensor attributes by their
    bytes), the graph's inputs and outputs and opsets. Metadata is left out: the spec is compared on its own."""
    import hashlib

    import onnx

    def digest(message) -> str:
        return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()

    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    graph = model.graph
    items = {"opsets": "|".join(sorted(f"{o.domain}:{o.version}" for o in model.opset_import)),
             "inputs and outputs": "|".join(digest(v) for v in (*graph.input, *graph.output)),
             "functions": "|".join(digest(f) for f in model.functions)}
    for tensor in graph.initializer:
        items[f"initializer '{tensor.name}' ({onnx.TensorProto.DataType.Name(tensor.data_type).lower()} {list(tensor.dims)})"] = digest(tensor)
    for i, tensor in enumerate(graph.sparse_initializer):
        items[f"sparse initializer {i}"] = digest(tensor)
    for i, node in enumerate(graph.node):
        items[f"node {i} ({node.op_type} '{node.name}')"] = digest(node)
    return items


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
