"""A traced model as plain data: torch.fx nodes as JSON, rebuilt by fcexport without the user's code.

`to_data` turns an fx.GraphModule into {"nodes": [...], "modules": {...}}: every node's op, target
and arguments as JSON values, every called module as its torch.nn type and the constructor values
read back from it. `from_data` rebuilds the GraphModule from that data and a state dict. Both sides
accept only what is on the allow-lists below (torch.nn layers, a few functions and tensor methods),
so a model file can describe a network but never run code of its own. Shapes are checked against
the weights on the meta device first, so a lying file cannot make us allocate what it declares.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.nn.functional as F
from torch import fx, nn

from fcexport.errors import FcxError
from fcexport.models import Normalize

_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias", "padding_mode")
_BN = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_POOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVGPOOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_INPLACE = ("inplace",)

# torch.nn layer type -> the constructor arguments that describe it (read back as attributes).
MODULES: dict[type, tuple[str, ...]] = {
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.Conv1d: _CONV, nn.Conv2d: _CONV, nn.Conv3d: _CONV,
    nn.BatchNorm1d: _BN, nn.BatchNorm2d: _BN, nn.BatchNorm3d: _BN,
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine", "bias"),
    nn.GroupNorm: ("num_groups", "num_channels", "eps", "affine"),
    nn.ReLU: _INPLACE, nn.ReLU6: _INPLACE, nn.SiLU: _INPLACE, nn.Hardswish: _INPLACE, nn.Hardsigmoid: _INPLACE,
    nn.LeakyReLU: ("negative_slope", "inplace"), nn.ELU: ("alpha", "inplace"), nn.GELU: ("approximate",),
    nn.Sigmoid: (), nn.Tanh: (), nn.Identity: (), nn.Softmax: ("dim",), nn.LogSoftmax: ("dim",),
    nn.Flatten: ("start_dim", "end_dim"), nn.Unflatten: ("dim", "unflattened_size"),
    nn.Dropout: ("p", "inplace"), nn.Dropout1d: ("p", "inplace"), nn.Dropout2d: ("p", "inplace"),
    nn.MaxPool1d: _POOL, nn.MaxPool2d: _POOL,
    nn.AvgPool1d: _AVGPOOL, nn.AvgPool2d: (*_AVGPOOL, "divisor_override"),
    nn.AdaptiveAvgPool1d: ("output_size",), nn.AdaptiveAvgPool2d: ("output_size",),
    nn.AdaptiveMaxPool2d: ("output_size", "return_indices"),
    Normalize: ("mean", "std"),
}
MODULE_TYPES = {cls.__name__: cls for cls in MODULES}


def _stochastic_depth():
    from torchvision.ops import stochastic_depth  # wrapped as one node by torchvision (EfficientNet)

    return stochastic_depth


FUNCTIONS = {
    "operator.add": operator.add, "operator.sub": operator.sub, "operator.mul": operator.mul,
    "operator.truediv": operator.truediv, "operator.getitem": operator.getitem, "operator.neg": operator.neg,
    "torch.flatten": torch.flatten, "torch.cat": torch.cat, "torch.add": torch.add, "torch.mul": torch.mul,
    "torch.mean": torch.mean, "torch.sigmoid": torch.sigmoid, "torch.tanh": torch.tanh, "torch.relu": torch.relu,
    "torch.reshape": torch.reshape,
    "F.relu": F.relu, "F.relu6": F.relu6, "F.gelu": F.gelu, "F.silu": F.silu, "F.hardswish": F.hardswish,
    "F.hardsigmoid": F.hardsigmoid, "F.leaky_relu": F.leaky_relu, "F.softmax": F.softmax, "F.log_softmax": F.log_softmax,
    "F.dropout": F.dropout, "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d, "F.avg_pool2d": F.avg_pool2d,
    "F.max_pool2d": F.max_pool2d, "F.linear": F.linear,
}
LAZY_FUNCTIONS = {"torchvision.ops.stochastic_depth": _stochastic_depth}
METHODS = frozenset({
    "view", "reshape", "flatten", "size", "mean", "relu", "sigmoid", "tanh", "contiguous", "permute", "transpose",
    "add", "mul", "squeeze", "unsqueeze", "chunk", "softmax", "dim",
})
OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")
_QUALNAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
MAX_NODES = 20_000
NOT_ALLOWED = "is not on fcexport's allow-list (see fcexport.graph: MODULES, FUNCTIONS, METHODS)"


class Tracer(fx.Tracer):
    """Keeps fcexport's Normalize as one node, so it is stored, folded and exported as a unit."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


def trace(module: nn.Module) -> fx.GraphModule:
    """Trace an eval-mode copy-free view of `module` with torch.fx; untraceable code is one FcxError line."""
    try:
        return fx.GraphModule(module, Tracer().trace(module))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise FcxError(
            f"torch.fx cannot trace the model ({type(exc).__name__}: {first}); data-dependent Python control flow "
            "must be removed from forward()"
        ) from exc


# ---- graph -> data -----------------------------------------------------------------------


def _function_name(fn) -> str | None:
    for name, allowed in FUNCTIONS.items():
        if fn is allowed:
            return name
    if getattr(fn, "__name__", None) == "stochastic_depth" and getattr(fn, "__module__", "").startswith("torchvision.ops"):
        return "torchvision.ops.stochastic_depth"
    return None


def _encode(value, where: str):
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, slice):
        return {"slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, where) for k, v in value.items()}}
    raise FcxError(f"{where}: argument of type {type(value).__name__} cannot be stored (only numbers, strings, tuples)")


def module_arguments(module: nn.Module) -> dict:
    """The constructor arguments that rebuild `module` (an allow-listed type), read from its attributes."""
    if isinstance(module, Normalize):
        return {"mean": module.mean.flatten().tolist(), "std": module.std.flatten().tolist()}
    values = {}
    for name in MODULES[type(module)]:
        value = getattr(module, name)
        values[name] = (value is not None) if name == "bias" else value
    return values


def to_data(gm: fx.GraphModule) -> dict:
    """The graph as plain JSON-able data; raises FcxError naming the first node that is not allow-listed."""
    nodes, modules = [], {}
    for node in gm.graph.nodes:
        where = f"node '{node.name}' ({node.op} {_target_text(node.target)})"
        target = node.target
        if node.op == "call_module":
            module = gm.get_submodule(target)
            if type(module) not in MODULES:
                raise FcxError(f"{where}: layer type {type(module).__module__}.{type(module).__name__} {NOT_ALLOWED}")
            args = {name: _encode(value, where) for name, value in module_arguments(module).items()}
            modules[target] = {"type": type(module).__name__, "args": args}
        elif node.op == "call_function":
            target = _function_name(node.target)
            if target is None:
                raise FcxError(f"{where}: function {NOT_ALLOWED}")
        elif node.op == "call_method" and target not in METHODS:
            raise FcxError(f"{where}: tensor method {NOT_ALLOWED}")
        nodes.append({"name": node.name, "op": node.op, "target": target,
                      "args": _encode(node.args, where), "kwargs": _encode(dict(node.kwargs), where)})
    return {"nodes": nodes, "modules": modules}


def _target_text(target) -> str:
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None) or repr(target)
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module else name


# ---- data -> graph -----------------------------------------------------------------------


def from_data(data: dict, state_dict: dict[str, torch.Tensor], where: str = "model") -> fx.GraphModule:
    """Rebuild an eval-mode GraphModule. Everything is validated, and weights checked against the
    declared layer sizes on the meta device, before anything of the declared size is allocated."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not isinstance(data.get("modules"), dict):
        raise FcxError(f"{where}: graph must be {{'nodes': [...], 'modules': {{...}}}}")
    if not 0 < len(data["nodes"]) <= MAX_NODES:
        raise FcxError(f"{where}: graph has {len(data['nodes'])} nodes (1..{MAX_NODES} allowed)")
    with torch.device("meta"):
        root: dict[str, object] = {name: _build_module(name, spec, where) for name, spec in data["modules"].items()}
    graph = _build_graph(data["nodes"], data["modules"], state_dict, root, where)
    try:
        gm = fx.GraphModule(root, graph)
    except Exception as exc:
        raise FcxError(f"{where}: graph does not form a valid model ({type(exc).__name__}: {exc})") from exc
    check_weights(gm, state_dict, where)
    gm = gm.to_empty(device="cpu")
    gm.load_state_dict(state_dict, strict=True)
    return gm.eval()


def _build_module(name: str, spec, where: str) -> nn.Module:
    _check_qualname(name, where)
    if not isinstance(spec, dict) or spec.get("type") not in MODULE_TYPES or not isinstance(spec.get("args"), dict):
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise FcxError(f"{where}: layer '{name}' has unsupported type {kind!r}")
    args = {name: _decode(value, {}, where) for name, value in spec["args"].items()}
    cls = MODULE_TYPES[spec["type"]]
    if set(args) - set(MODULES[cls]):
        raise FcxError(f"{where}: layer '{name}' ({cls.__name__}) has unknown arguments {sorted(set(args) - set(MODULES[cls]))}")
    try:
        return cls(**args)
    except Exception as exc:
        raise FcxError(f"{where}: layer '{name}' ({cls.__name__}) cannot be built from {args} ({exc})") from exc


def _build_graph(nodes: list, modules: dict, state_dict: dict, root: dict, where: str) -> fx.Graph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for raw in nodes:
        if not isinstance(raw, dict) or raw.get("op") not in OPS or not isinstance(raw.get("name"), str):
            raise FcxError(f"{where}: malformed graph node {str(raw)[:80]}")
        op, target, name = raw["op"], raw.get("target"), raw["name"]
        args = _decode(raw.get("args", {"tuple": []}), env, where)
        kwargs = _decode(raw.get("kwargs", {"dict": {}}), env, where)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise FcxError(f"{where}: node '{name}' has malformed arguments")
        label = f"{where}: node '{name}' ({op} {target})"
        if op == "placeholder":
            if any(n.op == "placeholder" for n in graph.nodes):
                raise FcxError(f"{label}: models with more than one input are not supported")
            node = graph.placeholder("x")
        elif op == "output":
            node = graph.output(args[0] if args else None)
        elif op == "call_module":
            if target not in modules:
                raise FcxError(f"{label}: calls a layer the graph does not declare")
            node = graph.call_module(target, args, kwargs)
        elif op == "get_attr":
            _check_qualname(target, where)
            if not isinstance(state_dict.get(target), torch.Tensor):
                raise FcxError(f"{label}: reads a tensor the weights do not contain")
            root[target] = torch.empty_like(state_dict[target], device="meta")
            node = graph.get_attr(target)
        elif op == "call_function":
            if target in LAZY_FUNCTIONS:
                fn = LAZY_FUNCTIONS[target]()
            elif target in FUNCTIONS:
                fn = FUNCTIONS[target]
            else:
                raise FcxError(f"{label}: function is not on fcexport's allow-list")
            node = graph.call_function(fn, args, kwargs)
        else:  # call_method
            if target not in METHODS:
                raise FcxError(f"{label}: tensor method is not on fcexport's allow-list")
            node = graph.call_method(target, args, kwargs)
        env[name] = node
    if not nodes or nodes[-1].get("op") != "output" or not any(n.op == "placeholder" for n in graph.nodes):
        raise FcxError(f"{where}: graph needs one input and must end with its output")
    return graph


def _decode(value, env: dict, where: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, env, where) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (kind, inner), = value.items()
        if kind == "node" and isinstance(inner, str):
            if inner not in env:
                raise FcxError(f"{where}: a node uses '{inner}' before it is defined")
            return env[inner]
        if kind == "tuple" and isinstance(inner, list):
            return tuple(_decode(v, env, where) for v in inner)
        if kind == "slice" and isinstance(inner, list) and len(inner) == 3:
            return slice(*(_decode(v, env, where) for v in inner))
        if kind == "dict" and isinstance(inner, dict):
            return {str(k): _decode(v, env, where) for k, v in inner.items()}
    raise FcxError(f"{where}: unsupported value in graph: {str(value)[:80]}")


def _check_qualname(name, where: str) -> None:
    if not isinstance(name, str) or not _QUALNAME.match(name) or hasattr(fx.GraphModule, name.split(".")[0]):
        raise FcxError(f"{where}: invalid layer name {str(name)[:80]!r}")


def check_weights(model: nn.Module, state_dict: dict, where: str) -> None:
    """Strict comparison of a state dict with a model's own (meta or real) one: missing and unexpected
    keys and shape mismatches are listed, the first few of each with counts, in one FcxError."""
    expected = model.state_dict()
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise FcxError(f"{where}: weights must be a dict of tensors")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
             for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    problems = [f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if items]
    if problems:
        raise FcxError(f"{where}: weights do not match the model: {'; '.join(problems)}")
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FcxError(f"{where}: weight '{key}' holds NaN or Inf values; the model is unusable")
