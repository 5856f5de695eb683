"""ONNX files from anywhere, checked before any runtime parses them: an op allow-list, no subgraphs or external
data, and a bound for every value, multiply-accumulate and byte (onnxruntime and OpenVINO both read model.onnx);
what a model computes with (its fingerprint) and its spec from metadata_props.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from fcexport.errors import FcxError
from fcexport.spec import MAX_ELEMENTS, MAX_MACS, MAX_TENSOR_BYTES, MAX_TOTAL_BYTES, ModelSpec

QUANTIZATION_KEY = "quantization"  # ONNX metadata entry that marks the int8 model
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
ONNX_FILE = "model.onnx"  # written by the onnx exporter, read by the int8 one

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
MAX_ONNX_BYTES = (1 << 31) - 1  # protobuf's own limit on one message: an ONNX file without external data
MAX_ATTRIBUTE = 4096  # kernel sizes, pads, strides, dilations
MAX_FIXED_BATCH = 1024  # a runtime sizes its buffers for a fixed batch when it compiles: bounded like the rest
MAX_ONNX_ELEMENTS = MAX_TENSOR_BYTES // 4  # values of any one tensor at batch 1 (float32: a stored model's bound)
MAX_ONNX_TOTAL = MAX_TOTAL_BYTES // 4  # values of one image together


def check_onnx_model(data: bytes, path: Path):
    """Refuse an ONNX file that could hang or exhaust memory, before onnxruntime parses or folds it: ops
    outside ONNX_OPS, subgraphs, external data, sparse tensors, outsized attributes, an input that is not
    (N, C, H, W), and any tensor that shape inference at batch 1 cannot bound or finds too large.
    Returns (the parsed onnx.ModelProto, so nothing parses the bytes again; the bytes one image keeps alive at
    once, for read_onnx_spec). Bytes that passed before on this machine (fcexport.machine_cache) skip shape
    inference, the check's costly part."""
    import hashlib

    import onnx

    from fcexport import machine_cache

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
    if dims[0].HasField("dim_value") and not 0 < dims[0].dim_value <= MAX_FIXED_BATCH:
        raise FcxError(f"{path}: the input's batch is fixed at {dims[0].dim_value:,} (fcexport writes a dynamic batch; "
                       f"a fixed one may be at most {MAX_FIXED_BATCH:,}): refused")
    digest = hashlib.sha256(data).hexdigest()
    peak = machine_cache.passed_onnx_check(digest)
    if peak is None:
        peak = _check_inferred_sizes(model, path)
        machine_cache.record_onnx_check(digest, peak)
    return model, peak


def checked_before(data: bytes) -> int | None:
    """The bytes one image keeps alive where these exact bytes passed check_onnx_model on this machine (a runtime
    may then parse them itself), else None."""
    import hashlib

    from fcexport import machine_cache

    return machine_cache.passed_onnx_check(hashlib.sha256(data).hexdigest()) if len(data) <= MAX_ONNX_BYTES else None


def _check_inferred_sizes(model, path: Path) -> int:
    """Shape inference at batch 1 (with constant propagation), then a bound for every value: its inferred
    size, or (unknown) one derived from its inputs by what the op can do (SIZE_OF_INPUT_OPS never grow their
    largest input; broadcasting ops at most the product of their inputs; Gather and friends data x indices).
    Each value must stay within MAX_ONNX_ELEMENTS, all of them together within MAX_ONNX_TOTAL, and the
    multiply-accumulates of Conv / MatMul / Gemm within MAX_MACS (the budget of a stored model too). Returns the
    bytes one image keeps alive at once (4 a value; each freed after its last reader), which sizes a call's batch."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    probe.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    del probe.graph.value_info[:]  # recorded shapes could lie: infer them afresh
    for _ in range(MAX_SHAPE_FOLDS):
        try:
            inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True, data_prop=True)
        except Exception as exc:
            raise FcxError(f"{path}: shapes are inconsistent ({type(exc).__name__}: {str(exc).strip()[:160]})") from exc
        shapes = {t.name: list(t.dims) for t in inferred.graph.initializer}
        for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
            shape = value.type.tensor_type.shape
            if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in shape.dim):
                shapes[value.name] = [d.dim_value for d in shape.dim]
        if not _fold_shape_inputs(probe, inferred, shapes):
            break
    bounds = {name: float(np.prod(shape, dtype=np.float64)) for name, shape in shapes.items()}
    total = macs = visited = 0.0
    last_read = {name: i for i, node in enumerate(inferred.graph.node) for name in node.input}
    last_read |= {value.name: len(inferred.graph.node) for value in inferred.graph.output}
    first = inferred.graph.input[0].name
    held = {first: bounds.get(first, 0.0)}  # the values alive now (weights are not: they are the model's, not an image's)
    live = peak = held[first]
    for i, node in enumerate(inferred.graph.node):
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
            held[output] = held.get(output, 0.0) + bound
            live += bound
            macs += _macs(node, shapes, bound)
            visited += bound
            peak = max(peak, live + _scratch(node, shapes, bound, given))
        visited += sum(b for b in given if b is not None)
        live -= sum(held.pop(name, 0.0) for name in {*node.input, *node.output} if last_read.get(name, i) == i)
        if total > MAX_ONNX_TOTAL:
            raise FcxError(f"{where}: the values of one image reach {total:,.0f} in all (at most {MAX_ONNX_TOTAL:,}); refused")
        if macs > MAX_MACS:
            raise FcxError(f"{where}: one image takes more than {MAX_MACS:.0e} multiply-accumulates; refused")
        if visited > MAX_ELEMENTS:
            raise FcxError(f"{where}: one image reads and writes more than {MAX_ELEMENTS:.0e} values; refused")
        if peak > MAX_ONNX_TOTAL:
            raise FcxError(f"{where}: one image keeps {peak:,.0f} values alive at once, its kernel's scratch included "
                           f"(at most {MAX_ONNX_TOTAL:,}); refused")
    return int(4 * peak)


# Shape inference's own data propagation stops at ops like a Reshape of a shape; these inputs of these ops decide an
# output's size, and where they are small integer tensors computed from constants and known shapes alone, fcexport
# computes them (_shape_value) and shape inference runs again, at most MAX_SHAPE_FOLDS times.
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Tile": (1,), "Range": (0, 1, 2), "Pad": (1,),
                "Slice": (1, 2, 3, 4), "Unsqueeze": (1,), "Squeeze": (1,), "Resize": (2, 3), "Split": (1,), "TopK": (1,)}
FOLDED_OPS = frozenset("Shape Reshape Concat Gather Unsqueeze Squeeze Slice Cast Identity Add Sub Mul Div Max Min Neg Abs "
                       "Equal Where Constant".split())
MAX_SHAPE_FOLDS, MAX_FOLDED_VALUES = 64, 64


def _fold_shape_inputs(probe, inferred, shapes: dict) -> bool:
    """Give every node whose output size shape inference left unknown the values of its SHAPE_INPUTS that can be
    computed, as new initializers of `probe`; True when any was."""
    from onnx import numpy_helper

    producers = {o: n for n in inferred.graph.node for o in n.output}
    constants = {t.name: t for t in inferred.graph.initializer}
    memo: dict = {}
    changed = False
    for at, node in enumerate(inferred.graph.node):
        if node.op_type not in SHAPE_INPUTS or all(o in shapes for o in node.output if o):
            continue
        for i in SHAPE_INPUTS[node.op_type]:
            if i >= len(node.input) or not node.input[i] or node.input[i] in constants:
                continue
            value = _shape_value(node.input[i], producers, constants, shapes, memo, 0)
            if value is not None:
                name = f"fcx_folded_{len(probe.graph.initializer)}"
                probe.graph.initializer.append(numpy_helper.from_array(value, name))
                probe.graph.node[at].input[i] = name
                changed = True
    return changed


def _shape_value(name: str, producers: dict, constants: dict, shapes: dict, memo: dict, depth: int):
    """The value of a small integer tensor made only from constants and the sizes of known shapes, or None."""
    from onnx import helper, numpy_helper

    if name in memo:
        return memo[name]
    memo[name] = None  # (a cycle, or too deep: unknown)
    node = producers.get(name)
    found = None
    if name in constants:
        found = numpy_helper.to_array(constants[name]) if np.prod(constants[name].dims, dtype=np.int64) <= MAX_FOLDED_VALUES else None
    elif node is not None and node.op_type in FOLDED_OPS and depth < 64:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Shape":
            found = np.array(shapes[node.input[0]], dtype=np.int64)[attrs.get("start", 0):attrs.get("end")] \
                if node.input[0] in shapes else None
        elif node.op_type == "Constant":
            found = numpy_helper.to_array(attrs["value"]) if "value" in attrs else None
        else:
            inputs = [_shape_value(i, producers, constants, shapes, memo, depth + 1) if i else None for i in node.input]
            if all(v is not None for v in inputs[:1]) and all(v is not None for i, v in zip(node.input, inputs) if i):
                try:
                    found = _folded(node.op_type, inputs, attrs)
                except (ValueError, IndexError, TypeError, ZeroDivisionError, KeyError):
                    found = None
    if found is not None and (found.dtype.kind not in "iub" or found.size > MAX_FOLDED_VALUES):
        found = None
    memo[name] = found
    return found


def _folded(op: str, inputs: list, attrs: dict):
    """One FOLDED_OPS op in NumPy, on small integer tensors."""
    from onnx import helper

    x = inputs[0]
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "Reshape":
        wanted = [int(d) if d != 0 or attrs.get("allowzero") else x.shape[i] for i, d in enumerate(inputs[1])]
        return x.reshape(wanted)
    if op == "Concat":
        return np.concatenate([v for v in inputs if v is not None], axis=attrs.get("axis", 0))
    if op == "Gather":
        return np.take(x, inputs[1], axis=attrs.get("axis", 0))
    if op == "Unsqueeze":
        for axis in sorted(int(a) % (x.ndim + len(inputs[1])) for a in inputs[1]):
            x = np.expand_dims(x, axis)
        return x
    if op == "Squeeze":
        return np.squeeze(x, axis=tuple(int(a) for a in inputs[1])) if len(inputs) > 1 and inputs[1] is not None else np.squeeze(x)
    if op == "Slice":
        starts, ends = inputs[1], inputs[2]
        axes = inputs[3] if len(inputs) > 3 and inputs[3] is not None else range(len(starts))
        steps = inputs[4] if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            index[int(axis)] = slice(int(start), int(end), int(step))
        return x[tuple(index)]
    if op in ("Neg", "Abs"):
        return -x if op == "Neg" else np.abs(x)
    if op == "Where":
        return np.where(x, inputs[1], inputs[2])
    y = inputs[1]
    if op == "Div":
        return (np.trunc(x / y)).astype(np.result_type(x, y)) if x.dtype.kind in "iu" else x / y
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum, "Min": np.minimum,
            "Equal": np.equal}[op](x, y)


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


def _scratch(node, shapes: dict, size: float, inputs: list) -> float:
    """Values a Conv's CPU kernel lays its input out in while it runs (im2col columns: in_channels/groups x kernel for
    each output position; each input position, transposed), as opset.scratch_bytes counts them; 0 for other ops
    (and for a weight of unknown shape, which _macs already refuses)."""
    weight = shapes.get(node.input[1]) if node.op_type in ("Conv", "ConvTranspose", "ConvInteger") and len(node.input) > 1 else None
    if not weight or not inputs or inputs[0] is None:
        return 0.0
    positions = (inputs[0] if node.op_type == "ConvTranspose" else size) / max(weight[0], 1)
    return positions * float(np.prod(weight[1:], dtype=np.float64))


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


def strip_documentation(message) -> None:
    """Clear, in place, what only documents a graph, node, value or function (doc_string, metadata_props, in
    subgraphs too): torch's exporter writes the exporting source's path and line on every node, which says
    where fcexport is installed and changes when its code moves, never what the model computes."""
    for field in ("doc_string", "metadata_props"):
        if hasattr(message, field):
            message.ClearField(field)
    for field in ("node", "input", "output", "value_info", "initializer", "sparse_initializer", "functions"):
        for item in getattr(message, field, ()):
            if not isinstance(item, str):
                strip_documentation(item)
    for attribute in getattr(message, "attribute", ()):
        if not isinstance(attribute, str):
            strip_documentation(attribute)
            for graph in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                strip_documentation(graph)


def _documentation_free(message):
    if not any(getattr(message, field, None) for field in ("doc_string", "metadata_props", "node", "attribute")):
        return message  # an initializer as exported: its bytes are digested without a copy
    copy = type(message)()
    copy.CopyFrom(message)
    strip_documentation(copy)
    return copy


def onnx_fingerprint(model) -> dict[str, str]:
    """What an ONNX model (an onnx.ModelProto, or its bytes) computes with: every initializer (sparse ones
    included) by its bytes, every node with its inputs, outputs and attributes (tensor attributes by their
    bytes), the graph's inputs and outputs and opsets. Metadata is left out: the spec is compared on its own,
    and what only documents a node or value (strip_documentation) says nothing about what it computes.
    A calibrated activation scale or zero point (the scale and zero point a QuantizeLinear of a computed tensor
    reads: they follow the calibration images, fcexport.targets.int8_static) counts by its type and shape only."""
    import hashlib

    import onnx

    def digest(message) -> str:
        return hashlib.sha256(_documentation_free(message).SerializeToString(deterministic=True)).hexdigest()

    if isinstance(model, bytes):
        model = onnx.load_from_string(model)
    graph = model.graph
    items = {"opsets": "|".join(sorted(f"{o.domain}:{o.version}" for o in model.opset_import)),
             "inputs and outputs": "|".join(digest(v) for v in (*graph.input, *graph.output)),
             "functions": "|".join(digest(f) for f in model.functions)}
    stored = {t.name for t in graph.initializer}
    calibrated = {name for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] not in stored
                  for name in node.input[1:]}
    for tensor in graph.initializer:
        described = f"initializer '{tensor.name}' ({onnx.TensorProto.DataType.Name(tensor.data_type).lower()} {list(tensor.dims)})"
        items[described] = "calibrated" if tensor.name in calibrated else digest(tensor)
    for i, tensor in enumerate(graph.sparse_initializer):
        items[f"sparse initializer {i}"] = digest(tensor)
    for i, node in enumerate(graph.node):
        items[f"node {i} ({node.op_type} '{node.name}')"] = digest(node)
    return items


def describe_onnx(data: bytes, path: Path) -> tuple[ModelSpec, dict]:
    """(spec, details) of an ONNX file, checked and parsed but not run: inputs, outputs, opsets, size of its weights."""
    model, peak = check_onnx_model(data, path)

    def shape(value) -> list:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]

    weights = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
    details = {"inputs": {v.name: shape(v) for v in model.graph.input}, "outputs": {v.name: shape(v) for v in model.graph.output},
               "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import}, "nodes": len(model.graph.node),
               "weights": weights, "producer": f"{model.producer_name} {model.producer_version}".strip()}
    props = {p.key: p.value for p in model.metadata_props}
    if QUANTIZATION_KEY in props:
        details["quantization"] = json.loads(props[QUANTIZATION_KEY])
    return read_onnx_spec(props, path, peak), details


def read_onnx_spec(props: dict, path: Path, peak_bytes: int = 0) -> ModelSpec:
    """The spec from ONNX metadata_props, where each field is one JSON-valued entry; other tools'
    plain-text entries (the quantizer's `onnx.infer`) are skipped. Its peak_bytes is never below `peak_bytes`,
    what check_onnx_model found: a file may not say it keeps less alive than it does."""
    fields = {}
    for key, value in props.items():
        with contextlib.suppress(ValueError):
            fields[key] = json.loads(value)
    if "class_names" not in fields or "input_shape" not in fields:
        raise FcxError(f"{path}: ONNX model lacks fcexport metadata (class_names, input_shape)", hint="export")
    spec = ModelSpec.from_dict(fields, str(path))
    return replace(spec, peak_bytes=max(spec.peak_bytes, min(peak_bytes, MAX_TOTAL_BYTES)))
