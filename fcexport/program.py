"""A model as data: a program over fcexport.opset's operations, its tensors, and an interpreter that runs it.

`capture` exports a live nn.Module with `torch.export` (dynamic batch), lowers it to the core ATen opset and
keeps each node as (op name, typed arguments, the layer the user wrote). `to_data` / `from_data` turn a
Program into JSON-able values and back; `from_data` checks every op against the allow-list and every
argument against the op's schema, and `check_shapes` runs the program on the meta device at batch 1 and on fake
tensors with a symbolic batch to bound every intermediate tensor and all the work, at any batch size, before
anything real is allocated. `ProgramModule` runs a Program by calling the
`torch.ops.aten` overloads one after another: no code is ever generated from the file's contents.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

import numpy as np
import torch
from torch import nn

from fcexport.errors import FcxError
from fcexport.opset import ATEN_OPS, COST_MODELS, GETITEM, SIZE_OP_NAMES, SIZE_OPS, aten_op, scratch_bytes
from fcexport.spec import (MAX_ELEMENTS, MAX_MACS, MAX_OTHER_OUTPUTS, MAX_TENSOR_BYTES, MAX_TOTAL_BYTES, OUTPUT_NAME,
                           RESERVED_OUTPUT_NAMES)

INPUT = "x"
MAX_NODES = 10_000  # torchvision's largest classifiers have under 2,000 (maxvit_t 1,745); the check costs ~2 ms a node
MAX_LIST = 4096
MAX_LISTED = 16_384  # node values inside lists (cat's operands), over the whole program
MAX_INT = 1 << 40
MAX_WORK = MAX_MACS  # multiply-accumulates plus values read, written or visited, per image (resnet18: 1.9e9)
# CPU seconds an image may take in the interpreter whatever its counts say: they bound what each op reads and writes,
# not what a value costs (exp to a denormal: 38 ns, a float64 fmod: 40; counted about 1 ns). A backstop well above
# the counted worst case (2e10 values at 8 ns) and any honest model (densenet121 in float64: 0.73 s of CPU an image
# on a 2-core AVX2 EPYC; MAX_MACS at its rate: 50 s)
CPU_SECONDS_PER_IMAGE = 160
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
TENSOR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}
MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                  "preserve_format": torch.preserve_format}
_ALLOWED = frozenset(ATEN_OPS)
GUARDS = frozenset({"aten._assert_tensor_metadata.default", "aten._assert_scalar.default"})
SHAPE_READERS = frozenset({"aten.sym_size.int", "aten.sym_numel.default"})  # read a tensor's shape, never its values


@dataclass(frozen=True)
class Ref:
    """An argument that is the value of an earlier node, the input, or a stored tensor."""

    name: str


@dataclass(frozen=True)
class Node:
    """One call: `op` (an opset name) on typed arguments; `layer` is the module path the user wrote."""

    name: str
    op: str
    args: tuple
    kwargs: tuple = ()  # ((name, value), ...)
    layer: str = ""
    layer_type: str = ""

    @property
    def label(self) -> str:
        where = f"{self.layer} ({self.layer_type})" if self.layer else "top level"
        return f"node '{self.name}' ({self.op}, layer {where})"


@dataclass(frozen=True)
class Program:
    """Nodes in execution order, the name of the returned node, the tensors the nodes read by name, and the model's
    other outputs ((name, node) pairs: torchvision's "aux"), exported and verified beside the one predict reads."""

    nodes: tuple[Node, ...]
    output: str
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)  # treated as read-only: passes make new ones
    extras: tuple[tuple[str, str], ...] = ()

    @property
    def output_nodes(self) -> tuple[str, ...]:
        """The node of every output, the predicted one first."""
        return (self.output, *(node for _, node in self.extras))

    def node(self, name: str) -> Node | None:
        return self._index().get(name)

    def _index(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def users(self) -> dict[str, list[Node]]:
        """Name (node, tensor or input) -> the nodes that read it."""
        users: dict[str, list[Node]] = {}
        for node in self.nodes:
            for ref in refs_in((node.args, node.kwargs)):
                users.setdefault(ref.name, []).append(node)
        return users

    def parameter_count(self) -> int:
        """The values a model learns, as torch's model.parameters() counts them: every tensor but BatchNorm's
        running statistics and the input normalisation's constants (so fcx train, fuse-bn and inspect agree)."""
        fixed = {getattr(a, "name", None) for n in self.nodes if n.layer_type == "Normalize" for a in n.args}
        fixed |= {getattr(n.args[i], "name", None) for n in self.nodes
                  if n.op == "aten._native_batch_norm_legit_no_training.default" for i in (3, 4)}
        return sum(t.numel() for name, t in self.tensors.items() if name not in fixed)

    def without_unused(self) -> "Program":
        """Drop nodes whose values nobody reads and tensors no node reads."""
        needed = set(self.output_nodes)
        kept = []
        for node in reversed(self.nodes):
            if node.name in needed:
                kept.append(node)
                needed |= {r.name for r in refs_in((node.args, node.kwargs))}
        tensors = {k: v for k, v in self.tensors.items() if k in needed}
        return replace(self, nodes=tuple(reversed(kept)), tensors=tensors)


def refs_in(value):
    """Every Ref inside a (nested) argument value."""
    if isinstance(value, Ref):
        yield value
    elif isinstance(value, tuple):
        for item in value:
            yield from refs_in(item)


def kwarg(node: Node, name: str, default=None):
    return dict(node.kwargs).get(name, default)


# ---- capture: nn.Module -> Program ------------------------------------------------------------


def capture(module: nn.Module, input_shape, output: str | None = None) -> Program:
    """Export an eval-mode module with a dynamic batch, lower it to core ATen, keep it as a Program (of several
    outputs, the one `output` names: from_exported)."""
    return capture_outputs(module, input_shape, output)[0]


def capture_outputs(module: nn.Module, input_shape, output: str | None = None) -> tuple[Program, dict]:
    """`capture`, and when the model returns several values, which one was kept and each one's name and shape for
    one image ({"output": name, "outputs": {name: [sizes]}}: what was left out is said, not lost without a word);
    {} for a model with one output."""
    example = torch.rand(2, *input_shape)
    try:
        with _quiet_torch():
            exported = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
            exported = exported.run_decompositions(_decompositions())
    except FcxError as exc:  # a decomposition's own refusal (adaptive max pooling to too many windows), without
        raise FcxError(str(exc).splitlines()[0]) from exc  # the lines torch adds about the node it was running
    except Exception as exc:
        if misfit := input_misfit(module, input_shape) or eager_failure(module, input_shape):
            raise FcxError(misfit) from exc
        if "Constraints violated" in str(exc):  # the batch dimension was specialised to one value
            raise FcxError("the model's code fixes the batch size (torch.export found the batch tied to one value): "
                           "fcexport exports models that take any batch; look for a size taken with int(x.shape[0]), a "
                           "reshape or view with a literal batch, or a module exported for one batch "
                           "(ExportedProgram.module())") from exc
        if "data-dependent" in str(exc) or "DataDependent" in type(exc).__name__:
            raise FcxError(f"torch.export cannot export the model ({type(exc).__name__}: {_first_line(exc)}): what it does depends "
                           "on the image's values (`if x.sum() > 0`, a detection model's box count); fcexport takes models whose "
                           "ops and output shapes are fixed (classifiers, segmentation)") from exc
        raise FcxError(f"torch.export cannot export the model ({type(exc).__name__}: {_first_line(exc)}); "
                       "fcexport takes every model torch.export.export(model, (x,)) accepts") from exc
    program = from_exported(exported, output)
    named = output_names(exported)
    if len(named) < 2:
        return program, {}
    values = exported.graph.output_node().args[0]
    shapes = {name: [int(v) for v in values[at].meta["val"].shape[1:]] for name, at in named.items()
              if hasattr(values[at], "meta") and isinstance(values[at].meta.get("val"), torch.Tensor)}
    return program, {"output": default_output(named) if output is None else output, "outputs": shapes}


def input_misfit(module: nn.Module, input_shape) -> str | None:
    """When the input shape is what failed: the first Conv or Linear whose input does not fit, in words with the fix
    (one eager call on one image, stopped at that layer)."""
    names = {m: name for name, m in module.named_modules()}
    shape = list(input_shape)
    given = ",".join(map(str, shape))
    found: list[str] = []

    class Stop(Exception):
        pass

    def check(layer, args):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None:
            return
        if isinstance(layer, nn.modules.conv._ConvNd) and x.dim() >= 2 and x.shape[1] != layer.in_channels:
            wanted = layer.in_channels
            fix = (f"{given} reads as height, width, channels; fcexport takes channels first: --input-shape "
                   f"{wanted},{shape[0]},{shape[1]}") if shape[-1] == wanted and x.shape[1] == shape[0] else \
                f"give --input-shape {wanted},H,W"
            found.append(f"the model's first {type(layer).__name__} (layer {names[layer] or 'the model itself'}) takes {wanted} channels, "
                         f"the input shape {given} has {x.shape[1]}: {fix}")
        elif isinstance(layer, nn.Linear) and x.shape[-1] != layer.in_features and x.dim() > 2 and x.shape[1:] == tuple(shape):
            found.append(f"the model's first Linear (layer {names[layer] or 'the model itself'}) reads the image's last axis "
                         f"({x.shape[-1]} values; it takes {layer.in_features}): the model takes patches or a sequence, not an "
                         f"image of shape C,H,W; fcexport takes models whose input is an image (N, C, H, W)")
        elif isinstance(layer, nn.Linear) and x.shape[-1] != layer.in_features:
            found.append(f"the model's first Linear (layer {names[layer] or 'the model itself'}) takes {layer.in_features} values, but "
                         f"an input of shape {given} gives it {x.shape[-1]}: give an --input-shape C,H,W "
                         f"with C*H*W = {layer.in_features} (e.g. {_square_shape(layer.in_features)})")
        raise Stop  # only the first Conv or Linear says whether the input shape fits

    hooks = [m.register_forward_pre_hook(check) for m in module.modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad(), _quiet_torch():
            module(torch.rand(1, *shape))
    except Exception:  # Stop, or whatever the model does with an input it cannot take
        pass
    finally:
        for hook in hooks:
            hook.remove()
    return found[0] if found else None


def eager_failure(module: nn.Module, input_shape) -> str | None:
    """When the model itself fails on this input shape (say, an `assert H % block == 0` in its code), that failure
    and where in the model's code, rather than torch.export's account of it (one eager call on two images; when it
    fails, one on one image: a model that takes only that has its batch fixed in its code)."""
    import traceback

    def fails(batch: int) -> str | None:
        """The failure in words with the model's line (the last frame outside torch and fcexport), or None."""
        try:
            with torch.no_grad(), _quiet_torch():
                module(torch.rand(batch, *input_shape))
        except Exception as exc:
            ours = (os.path.dirname(torch.__file__), os.path.dirname(__file__))
            frames = traceback.extract_tb(exc.__traceback__)
            frame = next((f for f in reversed(frames) if not f.filename.startswith(ours)), frames[-1])
            said = f"{type(exc).__name__}: {_first_line(exc)}" if _first_line(exc) else type(exc).__name__
            return f"{said}, at {_printable(os.path.basename(frame.filename), 80)}:{frame.lineno}"
        return None

    failed = fails(2)
    if failed is None:
        return None
    if fails(1) is None:
        return (f"the model runs on one image but fails on a batch of two ({failed}): its code fixes the batch size "
                "(a reshape(1, -1) or view(1, ...)?); fcexport exports models that take any batch: write x.flatten(1) "
                "or x.reshape(x.shape[0], -1)")
    size = (getattr(module, "pretrained_cfg", None) or {}).get("input_size")
    hint = f" (its pretrained_cfg says {','.join(map(str, size))})" if size else ""
    return (f"the model itself fails on an input of shape {','.join(map(str, input_shape))} ({failed}): give an "
            f"--input-shape it takes{hint}")


def _square_shape(values: int) -> str:
    for channels in (1, 3):
        side = round((values / channels) ** 0.5)
        if channels * side * side == values:
            return f"{channels},{side},{side}"
    return f"1,1,{values}"


@contextlib.contextmanager
def _quiet_torch():
    """torch.export logs failed meta kernels, prints graphs and warns about model attributes on its own;
    fcexport reports one line instead. Scoped: logging, warning filters and stderr are restored afterwards."""
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


KEPT_WHOLE = (torch.ops.aten.linear.default, torch.ops.aten.adaptive_avg_pool2d.default,
              torch.ops.aten.hardswish.default, torch.ops.aten.hardsigmoid.default, torch.ops.aten.silu.default,
              torch.ops.aten.mish.default)


def _decompositions():
    """The core ATen decompositions, but `linear`, `adaptive_avg_pool2d` and the activations runtimes compute in one
    kernel kept whole: exported files then hold Gemm on the layer's own `fc1.weight` instead of a transposed copy
    (and folding sees the layer as the user wrote it), a global average pool instead of `as_strided` views that ONNX
    can only size at run time, and one HardSwish instead of add, clamp, mul and div (mobilenet_v3_small's model.onnx
    ran at 0.5-0.7x of a plain export's with them taken apart). Attention without a mask becomes the three ops
    runtimes fuse (_plain_attention); adaptive max pooling an amax, a max pool or window slices (_adaptive_max_pool)."""
    from torch._decomp import decomposition_table

    table = torch.export.default_decompositions()
    for op in KEPT_WHOLE:
        table.pop(op, None)
    table[torch.ops.aten.empty.memory_format] = _empty_without_values
    max_pool = torch.ops.aten.adaptive_max_pool2d.default
    table[max_pool] = functools.partial(_adaptive_max_pool, decomposition_table[max_pool])
    attention = torch.ops.aten.scaled_dot_product_attention.default
    table[attention] = functools.partial(_plain_attention, table[attention])
    return table


def _plain_attention(torchs, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """softmax(q k^T * scale) v where nothing is masked: the same function as torch's decomposition, which guards the
    softmax against rows masked entirely (ReduceMax, Equal, Where per block in model.onnx) and scales q and k apart:
    timm vit_tiny's model.onnx ran at 0.80-0.86x of a plain export's with it. A mask, causality, dropout or grouped
    heads keep torch's own decomposition; inputs without a heads dimension keep it as it is."""
    if query.dim() != 4:
        return torchs(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        out = torchs(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    else:
        factor = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        out = torch.matmul(torch.softmax(torch.matmul(query, key.transpose(-2, -1)) * factor, dim=-1), value)
    # laid out (N, L, H, E) in memory, as torch's CPU kernel returns it: the model was traced against that layout
    # (transformers' `.permute(0, 2, 1, 3).contiguous().view(...)` after it recorded no copy, and torch's own
    # decomposition of a masked attention fails it)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


# adaptive max pooling to more output cells than this is refused: each cell is a window's slice, max and argmax
# (about 12 nodes with its index), and a program holds at most MAX_NODES
MAX_ADAPTIVE_WINDOWS = 256


def _adaptive_max_pool(torchs, x, output_size):
    """adaptive_max_pool2d as torch computes it: to 1x1 an amax, to sizes that divide the input a max pool (torch's own
    decomposition: fastai's AdaptiveConcatPool2d head); to other sizes each output cell the max of its window
    [floor(i H / h), ceil((i + 1) H / h)) (windows overlap), rows first, then columns. The indices (for max_unpool) are
    each window's argmax, made only where the model uses them."""
    found = torchs(x, output_size)
    if found is not NotImplemented:
        return found
    (h_in, w_in), (h_out, w_out) = x.shape[-2:], output_size
    if not all(type(s) is int for s in (h_in, w_in, h_out, w_out)):
        return NotImplemented
    if h_out * w_out > MAX_ADAPTIVE_WINDOWS:
        raise FcxError(f"adaptive max pooling of {h_in}x{w_in} to {h_out}x{w_out} ({h_out * w_out:,} windows that do not "
                       f"tile the input): fcexport spells at most {MAX_ADAPTIVE_WINDOWS} such windows (each a slice and a "
                       "max); pool to a size that divides the input, or to fewer cells")

    def windows(size_in, size_out):
        return [((i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)) for i in range(size_out)]

    rows, cols = windows(h_in, h_out), windows(w_in, w_out)
    by_row = torch.cat([x[..., a:b, :].amax(-2, keepdim=True) for a, b in rows], -2)
    values = torch.cat([by_row[..., a:b].amax(-1, keepdim=True) for a, b in cols], -1)
    indices = torch.stack([torch.stack([_window_argmax(x[..., r0:r1, c0:c1], r0, c0, w_in) for c0, c1 in cols], -1)
                           for r0, r1 in rows], -2)
    return values, indices


def _window_argmax(window, top: int, left: int, width: int):
    """The flat index (row * width + column, in the whole plane) of a window's largest value, as torch's kernel says it."""
    at = window.flatten(-2).argmax(-1)
    return (at // window.shape[-1] + top) * width + at % window.shape[-1] + left


def _empty_without_values(size, *, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    """An `empty` tensor with no values (a 0 in its size: segmentation_models_pytorch's Mix Vision Transformer encoders
    make a 0-channel placeholder) is `full` of nothing, a pure function; any other stays `empty`, which the opset
    refuses (uninitialised memory)."""
    if not any(type(s) is int and s == 0 for s in size):
        return NotImplemented
    return torch.full(size, 0, dtype=dtype, layout=layout, device=device)


def from_exported(exported, choice: str | None = None) -> Program:
    """A Program from a torch.export ExportedProgram already decomposed to core ATen; of several outputs (a dict,
    a tuple, a transformers ModelOutput) the one named `choice` (see _picked) is predicted, the others are kept as
    the program's extras (those with the batch as their first size, up to MAX_OTHER_OUTPUTS)."""
    from torch.export.graph_signature import InputKind

    signature = exported.graph_signature
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        changed = ", ".join(list(signature.buffers_to_mutate.values())[:3])
        raise FcxError(f"the model changes its own tensors in forward() ({changed}); put it in eval mode or remove that")
    names: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    inputs = []
    for spec in signature.input_specs:
        placeholder = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            inputs.append(placeholder)
            names[placeholder] = INPUT
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            value = exported.state_dict.get(spec.target, exported.constants.get(spec.target))
            if not isinstance(value, torch.Tensor):
                raise FcxError(f"the model holds a {type(value).__name__} as '{spec.target}', not a tensor")
            name = _unique(_tensor_name(spec.target), tensors)
            tensors[name] = value.detach().to("cpu").contiguous().clone()
            names[placeholder] = name
        else:
            raise FcxError(f"the model takes a {spec.kind.name.lower()} input ('{spec.target}'), which fcexport cannot store")
    if len(inputs) != 1:
        raise FcxError(f"the model's forward() must take exactly one input tensor (N, C, H, W), it takes {len(inputs)}")
    nodes = []
    output, extras = None, ()
    for fx_node in exported.graph.nodes:
        if fx_node.op == "placeholder":
            continue
        if fx_node.op == "output":
            outputs = fx_node.args[0]
            at = _picked(exported, choice) if choice is not None or len(outputs) > 1 else 0
            if getattr(outputs[at], "op", None) is None:
                raise FcxError("the model must return a tensor of logits, it returns a constant")
            output = names[outputs[at].name]
            extras = _extras(exported, outputs, at, names)
            continue
        if str(fx_node.target) in GUARDS and not fx_node.users:
            continue  # a check torch.export proved at export time (a dtype after .to()); it computes nothing
        layer, layer_type = _layer_of(fx_node)
        op = _op_name(fx_node.target)
        if op is None:
            where = f"layer '{layer}' ({layer_type})" if layer else "the model's own forward()"
            raise FcxError(f"{where}: {fx_node.target} is not in fcexport's opset of pure tensor functions "
                           "(fcexport/opset.py: no random numbers, no data-dependent shapes, no Python scalars read from tensors)")
        names[fx_node.name] = fx_node.name
        nodes.append(Node(fx_node.name, op, _encode(fx_node.args, names), tuple((k, _encode(v, names)) for k, v in fx_node.kwargs.items()),
                          layer, layer_type))
    if output is None or output == INPUT:
        raise FcxError("the model returns its input unchanged")
    program = Program(tuple(nodes), output, tensors, extras).without_unused()
    check_program(program, "the model")
    return program


def _extras(exported, outputs, picked: int, names: dict) -> tuple[tuple[str, str], ...]:
    """(name, node) of each output besides the predicted one that fcexport can carry through every file and judge:
    float32, computed by a node, of shape (N, ...) with the input's batch N first and fixed sizes after it (up to
    MAX_OTHER_OUTPUTS), under a name every exported file can carry (OUTPUT_NAME, not a reserved one). The others (a per-image
    scalar of shape (N,), an argmax, a flattened batch) are left out, as before: the spec's details still list them."""
    batch = next(str(n.meta["val"].shape[0]) for n in exported.graph.nodes if n.op == "placeholder" and names.get(n.name) == INPUT)
    kept: list[tuple[str, str]] = []
    taken = set(RESERVED_OUTPUT_NAMES)
    for name, at in output_names(exported).items():
        value = outputs[at]
        node = names.get(getattr(value, "name", None))
        meta = getattr(value, "meta", {}).get("val")
        shape = getattr(meta, "shape", ())
        if at == picked or node in (None, INPUT, names.get(outputs[picked].name)) or len(kept) == MAX_OTHER_OUTPUTS \
                or getattr(meta, "dtype", None) != torch.float32 or len(shape) < 2 or str(shape[0]) != batch \
                or not all(isinstance(size, int) for size in shape[1:]):
            continue
        safe = re.sub(r"[^A-Za-z0-9_]", "_", name)[:48]
        safe = _unique(safe if re.match(r"[A-Za-z_]", safe) and safe not in RESERVED_OUTPUT_NAMES else f"output_{safe}", taken)
        taken.add(safe)
        kept.append((safe, node))
    return tuple(kept)


def output_names(exported) -> dict[str, int]:
    """The model's outputs by name (a dict's keys, a ModelOutput's fields, a tuple's positions; a nested one's joined
    with dots: "aux.out") -> flat position."""
    from torch.utils import _pytree as pytree

    spec = exported.call_spec.out_spec
    found = {}

    def walk(node, name: str) -> None:
        if isinstance(node, int):
            found[name or "0"] = node
            return
        items = node.items() if isinstance(node, Mapping) else enumerate(node) if isinstance(node, (tuple, list)) else ()
        for key, value in items:
            walk(value, f"{name}.{key}" if name else str(key))

    walk(pytree.tree_unflatten(list(range(spec.num_leaves)), spec), "")
    return found


def default_output(names) -> str | None:
    """The output kept when none is named: "out" (torchvision's segmentation models), "logits" (transformers), else
    the first."""
    return next((k for k in ("out", "logits") if k in names), next(iter(names), None))


def _picked(exported, choice: str | None) -> int:
    """The flat position of the output `choice` names (default_output when None)."""
    named = output_names(exported)
    shown = ", ".join(named) or "none"
    if choice is None:
        choice = default_output(named)
    if choice not in named:
        raise FcxError(f"the model returns several values ({shown}); --output {str(choice)[:40]!r} is not one of them"
                       if choice is not None else f"the model returns no single tensor of logits ({shown}); pass --output NAME")
    return named[choice]


def _op_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)
        return name if name in _ALLOWED else None
    if target is _getitem:
        return GETITEM
    return SIZE_OP_NAMES.get(target)


def _getitem_fn():
    import operator

    return operator.getitem


_getitem = _getitem_fn()


def _layer_of(fx_node) -> tuple[str, str]:
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else getattr(kind, "__qualname__", str(kind))
    return _printable(str(path)), _printable(kind.rsplit(".", 1)[-1])


def _printable(text: str, limit: int = 300) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _tensor_name(target: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", target)[:200] or "tensor"
    return name if TENSOR_NAME.match(name) else f"t_{name}"[:200]


def _unique(name: str, taken) -> str:
    candidate, i = name, 1
    while candidate in taken or candidate == INPUT:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def _encode(value, names: dict):
    import torch.fx as fx

    if isinstance(value, fx.Node):
        return Ref(names[value.name])
    if isinstance(value, (list, tuple)):
        return tuple(_encode(v, names) for v in value)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.layout, torch.memory_format, torch.device)):
        return value
    raise FcxError(f"an argument of type {type(value).__name__} cannot be stored")


def with_input_normalization(program: Program, mean: list[float], std: list[float], layer: str = "input_normalize") -> Program:
    """(x - mean) / std in front of the program, as two nodes on stored (C, 1, 1) or scalar tensors."""
    shape = () if len(mean) == 1 else (-1, 1, 1)
    mean_name = _unique(f"{layer}.mean", program.tensors)
    std_name = _unique(f"{layer}.std", program.tensors)
    taken = {n.name for n in program.nodes}
    sub, div = _unique(f"{layer}_sub", taken), _unique(f"{layer}_div", taken)

    def rewire(value):
        if isinstance(value, Ref) and value.name == INPUT:
            return Ref(div)
        return tuple(rewire(v) for v in value) if isinstance(value, tuple) else value

    nodes = [n if n.op in SHAPE_READERS else replace(n, args=rewire(n.args), kwargs=rewire(n.kwargs)) for n in program.nodes]
    head = (Node(sub, "aten.sub.Tensor", (Ref(INPUT), Ref(mean_name)), (), layer, "Normalize"),
            Node(div, "aten.div.Tensor", (Ref(sub), Ref(std_name)), (), layer, "Normalize"))
    tensors = {**program.tensors, mean_name: torch.tensor(mean, dtype=torch.float32).reshape(shape),
               std_name: torch.tensor(std, dtype=torch.float32).reshape(shape)}
    return replace(program, nodes=(*head, *nodes), tensors=tensors)


# ---- data <-> Program -------------------------------------------------------------------------


def to_data(program: Program) -> dict:
    """Plain JSON values: nodes with encoded arguments, the output, each tensor's dtype and shape."""
    return {
        "input": INPUT,
        "nodes": [{"name": n.name, "op": n.op, "args": _to_json(n.args), "kwargs": {k: _to_json(v) for k, v in n.kwargs},
                   "layer": n.layer, "layer_type": n.layer_type} for n in program.nodes],
        "output": program.output,
        **({"extras": [list(pair) for pair in program.extras]} if program.extras else {}),
        "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in program.tensors.items()},
    }


def _to_json(value):
    if isinstance(value, Ref):
        return {"ref": value.name}
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": value.type}
    return value


def from_data(data, tensors, where: str) -> Program:
    """A checked Program from JSON values and a dict of tensors; anything unexpected is one FcxError line."""
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not isinstance(data.get("tensors"), dict):
        raise FcxError(f"{where}: the program must be {{'nodes': [...], 'tensors': {{...}}, 'output': name}}")
    if data.get("input", INPUT) != INPUT:
        raise FcxError(f"{where}: the program's input must be named {INPUT!r}")
    _check_node_count(len(data["nodes"]), where)  # before any node is decoded
    if not isinstance(tensors, dict) or set(tensors) != set(data["tensors"]):
        extra = sorted(set(tensors) ^ set(data["tensors"])) if isinstance(tensors, dict) else ["(not a dict)"]
        raise FcxError(f"{where}: the tensors do not match the program's list ({', '.join(map(str, extra[:3]))})")
    for name, declared in data["tensors"].items():
        check_tensor(name, tensors[name], declared, where)
    nodes = []
    for raw in data["nodes"]:
        if not isinstance(raw, dict) or not isinstance(raw.get("op"), str) or not isinstance(raw.get("name"), str):
            raise FcxError(f"{where}: malformed program node {_printable(str(raw), 80)!r}")
        label = f"{where}: node {_printable(raw['name'], 100)!r}"
        args, kwargs = raw.get("args", []), raw.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise FcxError(f"{label}: arguments must be a list and keyword arguments an object")
        layer, layer_type = raw.get("layer", ""), raw.get("layer_type", "")
        if not isinstance(layer, str) or not isinstance(layer_type, str):
            raise FcxError(f"{label}: layer names must be strings")
        nodes.append(Node(raw["name"], raw["op"], _from_json(args, label, 0), tuple((str(k), _from_json(v, label, 0)) for k, v in kwargs.items()),
                          _printable(layer), _printable(layer_type, 100)))
    program = Program(tuple(nodes), data.get("output"), tensors, _extras_from_json(data.get("extras", []), where))
    check_program(program, where)
    return replace(program, nodes=tuple(_by_position(node) for node in program.nodes))


def _by_position(node: Node) -> Node:
    """A checked node with every argument of a positional parameter given by position (defaults filling the gaps), as
    torch.export writes them: the code that reads a BatchNorm's or a Linear's arguments reads them by position."""
    if not node.kwargs or node.op == GETITEM or node.op in SIZE_OPS:
        return node
    positional = [a for a in aten_op(node.op)._schema.arguments if not a.kwarg_only]
    kwargs, args = dict(node.kwargs), list(node.args)
    while any(a.name in kwargs for a in positional[len(args):]):
        parameter = positional[len(args)]
        if parameter.name in kwargs:
            args.append(kwargs.pop(parameter.name))
        else:  # check_program found every parameter without a default given
            default = parameter.default_value
            args.append(tuple(default) if isinstance(default, list) else default)
    return replace(node, args=tuple(args), kwargs=tuple(kwargs.items()))


def _extras_from_json(value, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or len(value) > MAX_OTHER_OUTPUTS or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) for v in pair) for pair in value):
        raise FcxError(f"{where}: the program's other outputs must be a list of at most {MAX_OTHER_OUTPUTS} [name, node] pairs")
    return tuple((name, node) for name, node in value)


def _from_json(value, label: str, depth: int):
    if depth > 4:
        raise FcxError(f"{label}: arguments are nested too deeply")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise FcxError(f"{label}: a list of {len(value)} values is longer than {MAX_LIST}")
        return tuple(_from_json(v, label, depth + 1) for v in value)
    if isinstance(value, dict) and len(value) == 1:
        (kind, inner), = value.items()
        if kind == "ref" and isinstance(inner, str):
            return Ref(inner)
        if kind == "float" and inner in ("inf", "-inf", "nan"):
            return float(inner)
        if kind == "dtype" and inner in DTYPES:
            return DTYPES[inner]
        if kind == "memory_format" and inner in MEMORY_FORMATS:
            return MEMORY_FORMATS[inner]
        if kind == "layout" and inner == "strided":
            return torch.strided
        if kind == "device" and inner in ("cpu", "cuda", "meta"):
            return torch.device("cpu")  # the interpreter runs every op on the input's device
    raise FcxError(f"{label}: unsupported argument value {_printable(str(value), 80)!r}")


def check_tensor(name, tensor, declared, where: str) -> None:
    """A stored tensor must be a plain dense CPU tensor that owns exactly its bytes (no stride tricks)."""
    if not isinstance(name, str) or not TENSOR_NAME.match(name):
        raise FcxError(f"{where}: invalid tensor name {_printable(str(name), 80)!r}")
    label = f"{where}: tensor '{name}'"
    if type(tensor) is not torch.Tensor and not isinstance(tensor, nn.Parameter):
        raise FcxError(f"{label} is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested or tensor.device.type != "cpu":
        raise FcxError(f"{label}: only dense CPU tensors are stored (got {tensor.layout}, {tensor.device.type})")
    if tensor.dtype not in DTYPES.values():
        raise FcxError(f"{label}: dtype {tensor.dtype} is not supported")
    storage_bytes = tensor.untyped_storage().nbytes()
    if not tensor.is_contiguous() or tensor.storage_offset() != 0 or storage_bytes != tensor.numel() * tensor.element_size():
        raise FcxError(f"{label}: its shape {tuple(tensor.shape)} does not match its {storage_bytes:,} stored bytes "
                       "(strides or offsets that repeat or skip data)")
    expected = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    if declared != expected:
        raise FcxError(f"{label} is {expected['dtype']} {expected['shape']} but the program declares {_printable(str(declared), 80)}")
    if tensor.is_floating_point() and not all_finite(tensor):
        raise FcxError(f"{label} holds NaN or Inf values; the model is unusable")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or Inf, checked by numpy in one pass: torch's isfinite().all() starts
    its threads for each tensor and took 0.5 s over resnet18's weights on a busy 2-core machine (numpy: 6 ms)."""
    values = tensor.detach().cpu()
    if values.dtype not in (torch.float16, torch.float32, torch.float64):
        values = values.float()  # bfloat16 and the float8 kinds: numpy has no such dtype
    return bool(np.isfinite(values.numpy()).all())


# ---- static checks: names, ops, argument types ------------------------------------------------


def _check_node_count(count: int, where: str) -> None:
    """One bound for model.pt's reader and for import, so import never writes a file that fcx then refuses."""
    if not 0 < count <= MAX_NODES:
        raise FcxError(f"{where}: the program has {count:,} nodes, fcexport takes 1 to {MAX_NODES:,} (a loop or an LSTM "
                       "unrolled over a long sequence makes thousands: timm's sequencer2d_s has 26,480)")


def check_program(program: Program, where: str) -> None:
    """Every node: a fresh valid name, an allow-listed op, arguments of its schema's types, refs to earlier values."""
    _check_node_count(len(program.nodes), where)
    listed = sum(sum(1 for _ in refs_in(value)) for node in program.nodes for value in (*node.args, *(v for _, v in node.kwargs))
                 if isinstance(value, tuple))
    if listed > MAX_LISTED:
        raise FcxError(f"{where}: the program's lists hold {listed:,} values of other nodes in all, fcexport takes at most "
                       f"{MAX_LISTED:,} (checking each costs about half a millisecond; densenet121's lists hold 598)")
    kinds: dict[str, object] = {INPUT: "tensor", **{name: "tensor" for name in program.tensors}}
    for node in program.nodes:
        label = f"{where}: {node.label}"
        if not NAME.match(node.name) or node.name in kinds:
            raise FcxError(f"{where}: invalid or repeated node name {_printable(node.name, 80)!r}")
        for ref in refs_in((node.args, node.kwargs)):
            if ref.name not in kinds:
                raise FcxError(f"{label}: uses {_printable(ref.name, 80)!r} before it is defined")
        kinds[node.name] = _check_node(node, kinds, label)
    computed = {n.name for n in program.nodes}
    if not isinstance(program.output, str) or kinds.get(program.output) != "tensor" or program.output not in computed:
        raise FcxError(f"{where}: the program's output must be a tensor computed by one of its nodes")
    names = [name for name, _ in program.extras]
    if len(program.extras) > MAX_OTHER_OUTPUTS or len(set(names)) != len(names) or not all(
            isinstance(name, str) and OUTPUT_NAME.fullmatch(name) and name not in RESERVED_OUTPUT_NAMES
            and kinds.get(node) == "tensor" and node in computed for name, node in program.extras):
        raise FcxError(f"{where}: the program's other outputs must be at most {MAX_OTHER_OUTPUTS} tensors computed by its nodes, "
                       f"each with its own name of letters, digits and '_' (not {', '.join(RESERVED_OUTPUT_NAMES)})")


def _check_node(node: Node, kinds: dict, label: str):
    if node.op == GETITEM:
        if len(node.args) != 2 or node.kwargs or not isinstance(node.args[0], Ref) or type(node.args[1]) is not int:
            raise FcxError(f"{label}: getitem takes a node and an index")
        source = kinds[node.args[0].name]
        if source == "tensors":
            return "tensor"
        if isinstance(source, tuple) and 0 <= node.args[1] < len(source):
            return source[node.args[1]]
        raise FcxError(f"{label}: index {node.args[1]} is out of range for its source")
    if node.op in SIZE_OPS:
        if len(node.args) != 2 or node.kwargs or not all(_is_int(a, kinds) for a in node.args):
            raise FcxError(f"{label}: size arithmetic takes two integers")
        return "int"
    if node.op not in _ALLOWED:
        raise FcxError(f"{label}: op is not in fcexport's opset (fcexport/opset.py)")
    schema = aten_op(node.op)._schema
    arguments = schema.arguments
    positional = [a for a in arguments if not a.kwarg_only]
    if len(node.args) > len(positional):
        raise FcxError(f"{label}: {len(node.args)} arguments for {len(positional)} parameters")
    by_name = {a.name: a for a in arguments}
    given = {a.name: v for a, v in zip(positional, node.args)}
    for key, value in node.kwargs:
        if key not in by_name or key in given:
            raise FcxError(f"{label}: unknown or repeated argument {_printable(key, 40)!r}")
        given[key] = value
    for argument in arguments:
        if argument.name == "pin_memory" and given.get("pin_memory"):  # pinning starts CUDA wherever there is a GPU
            raise FcxError(f"{label}: argument 'pin_memory' must be false or absent")
        if argument.name == "eps" and argument.name in given:  # batch/layer/group norm: a negative eps is NaN
            eps = given["eps"]
            if type(eps) not in (int, float) or not (math.isfinite(eps) and eps >= 0):
                raise FcxError(f"{label}: argument 'eps' must be a finite number >= 0, got {_printable(repr(eps), 40)}")
        if argument.name in given:
            if not _matches(str(argument.real_type), given[argument.name], kinds):
                raise FcxError(f"{label}: argument '{argument.name}' must be {argument.real_type}, got "
                               f"{_printable(repr(given[argument.name]), 60)}")
        elif not argument.has_default_value():
            raise FcxError(f"{label}: argument '{argument.name}' is missing")
    returns = [str(r.real_type) for r in schema.returns]
    if returns == ["Tensor"]:
        return "tensor"
    if returns == ["List[Tensor]"]:
        return "tensors"
    if returns in (["int"], ["SymInt"]):
        return "int"
    if all(r == "Tensor" for r in returns):
        return tuple("tensor" for _ in returns)
    raise FcxError(f"{label}: returns {returns}, which fcexport does not run")


def _is_int(value, kinds) -> bool:
    if isinstance(value, Ref):
        return kinds.get(value.name) == "int"
    return type(value) is int and -(1 << 63) <= value < (1 << 63)  # int64, as the schema (slice's end is INT64_MAX)


def _matches(kind: str, value, kinds: dict) -> bool:
    if kind.startswith("Optional[") and kind.endswith("]"):
        return value is None or _matches(kind[len("Optional["):-1], value, kinds)
    if kind.startswith("List[") and kind.endswith("]"):
        return isinstance(value, tuple) and len(value) <= MAX_LIST and all(_matches(kind[5:-1], v, kinds) for v in value)
    if kind == "Tensor":  # torch.export passes Python numbers where a schema says Tensor (add.Tensor(x, 3))
        return (isinstance(value, Ref) and kinds.get(value.name) == "tensor") or type(value) in (int, float, bool)
    if kind in ("int", "SymInt"):
        return _is_int(value, kinds)
    if kind == "float":
        return type(value) in (int, float)
    if kind == "bool":
        return type(value) is bool
    if kind == "number":  # a computed integer too (transformers' masks take torch.arange(batch size))
        return (isinstance(value, Ref) and _is_int(value, kinds)) or \
            (type(value) in (int, float, bool) and (type(value) is not int or abs(value) < (1 << 63)))
    if kind == "ScalarType":
        return isinstance(value, torch.dtype) and value in DTYPES.values()
    if kind == "MemoryFormat":
        return isinstance(value, torch.memory_format)
    if kind == "Layout":
        return value == torch.strided
    if kind == "Device":
        return isinstance(value, torch.device)
    if kind == "str":
        return isinstance(value, str) and bool(re.fullmatch(r"[a-z_]{1,16}", value))
    return False


# ---- running ----------------------------------------------------------------------------------


class ProgramModule(nn.Module):
    """Runs a Program op by op (an interpreter: no code is generated). Its tensors are buffers, so
    `.to(device)` / `.double()` move them; a float64 input runs every float32 op in float64 too."""

    def __init__(self, program: Program, every_output: bool = False):
        super().__init__()
        self.program = program
        self.every_output = every_output and bool(program.extras)  # forward returns (predicted, *extras)
        self._slots = {}  # program tensor name -> the buffer's dotted path in this module
        for name, tensor in program.tensors.items():
            self._slots[name] = self._register(name, tensor)
        last_use = {}
        for i, node in enumerate(program.nodes):
            for ref in refs_in((node.args, node.kwargs)):
                last_use[ref.name] = i
        freed_at: dict[int, list[str]] = {}  # step -> the values no later step reads (dropped there to save memory)
        for name, at in last_use.items():
            if name not in self._slots and name not in program.output_nodes:
                freed_at.setdefault(at, []).append(name)
        self._steps = [(node, _callable(node.op), tuple(freed_at.get(i, ()))) for i, node in enumerate(program.nodes)]

    def _register(self, name: str, tensor: torch.Tensor) -> str:
        """Keep the tensor's own dotted name where it fits (exported files then read `features.0.weight`);
        a name that would clash with an attribute (`training`, `forward`) gets a plain slot instead."""
        *parents, leaf = name.split(".")
        owner = self
        try:
            for part in parents:
                child = owner._modules.get(part)
                if child is None:
                    if hasattr(owner, part):
                        raise KeyError(part)
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
            if hasattr(owner, leaf) or leaf in owner._modules:
                raise KeyError(leaf)
            owner.register_buffer(leaf, tensor)
            return name
        except (KeyError, TypeError, ValueError):
            slot = _unique("tensor_" + re.sub(r"\W", "_", name), {n.split(".")[0] for n in self._slots.values()} | set(dir(self)))
            self.register_buffer(slot, tensor)
            return slot

    def named_program_tensors(self) -> dict[str, torch.Tensor]:
        """The program's tensors by their stored names, as they are now (device, dtype)."""
        return {name: self.get_buffer(path) for name, path in self._slots.items()}

    def forward(self, x: torch.Tensor):
        return run_steps(self, x, every_output=self.every_output)


def _global_average_pool(x: torch.Tensor, output_size) -> torch.Tensor:
    """adaptive_avg_pool2d to 1x1 is the mean over H and W; said so, exporters write a plain ReduceMean
    instead of the strided views they lower the general op to (which ONNX can only size at run time)."""
    if tuple(output_size) == (1, 1):
        return torch.ops.aten.mean.dim(x, [-2, -1], True)
    return torch.ops.aten.adaptive_avg_pool2d.default(x, output_size)


def _functional_copy(target: torch.Tensor, source: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """`copy(target, source)` as torch.export writes it for `mask[a:b] = value`: `source` broadcast to `target`'s
    shape and dtype. Said with expand, exporters keep the shapes (ONNX's constant folder loses a 0-d source)."""
    return source.to(dtype=target.dtype, device=target.device).expand_as(target)


def _repeat(x: torch.Tensor, repeats) -> torch.Tensor:
    """`x.repeat(repeats)` as a view, an expand and a reshape (the same values): ONNX can size an Expand from a
    batch-sized shape before running it, but not a Tile."""
    repeats = list(repeats)
    shape = [1] * (len(repeats) - x.dim()) + list(x.shape)
    spread = [v for size in shape for v in (1, size)]
    copies = [v for count, size in zip(repeats, shape) for v in (count, size)]
    return x.reshape(spread).expand(copies).reshape([count * size for count, size in zip(repeats, shape)])


FACTORIES = frozenset(op for op in ATEN_OPS  # ops that read no tensor: they make one from sizes and numbers
                      if not any("Tensor" in str(a.real_type) for a in aten_op(op)._schema.arguments))
SPELLED_OUT = {"aten.adaptive_avg_pool2d.default": _global_average_pool, "aten.copy.default": _functional_copy,
               "aten.repeat.default": _repeat}


def _callable(op: str):
    if op in SPELLED_OUT:
        return SPELLED_OUT[op]
    if op == GETITEM:
        return _getitem
    if op in SIZE_OPS:
        return SIZE_OPS[op]
    return aten_op(op)


def _traceable_full(size, value, dtype=None, device=None, **_):
    """torch.full for torch.jit.trace: TorchScript's full takes no bool fill value (transformers' masks make
    full((), True)), so a bool is given as 0 / 1 with the bool dtype it stands for."""
    if type(value) is bool:
        value, dtype = int(value), dtype or torch.bool
    return torch.full(size, value, dtype=dtype, device=device)


# torch.jit.trace records sizes as values only through Tensor methods (x.size(0), x.view(n, -1)); while
# tracing, the ops that take sizes are called that way, so model.ts keeps a dynamic batch.
_TRACEABLE = {
    "aten.sym_size.int": lambda x, dim: x.size(dim),
    "aten.view.default": lambda x, size: x.view(size),
    "aten.expand.default": lambda x, size, implicit=False: x.expand(size),
    "aten.full.default": _traceable_full,
    "aten.arange.start_step": lambda start, end, step=1, dtype=None, device=None, **_: torch.arange(
        start, end, step, dtype=dtype, device=device),
    # group norm's schema takes the batch size; the functional form reads it from x (same kernel underneath)
    "aten.native_group_norm.default": lambda x, weight, bias, n, c, hw, groups, eps: (
        torch.nn.functional.group_norm(x, groups, weight, bias, eps), None, None),
}


def _short_mean(x: torch.Tensor, axes) -> torch.Tensor:
    """The mean over `axes` (kept), one axis at a time: runtimes sum an axis in float32 one value after the next,
    and a mean over 100,000 values at once loses digits that one over each axis keeps."""
    for axis in sorted(axes, reverse=True):
        x = x.mean(axis, keepdim=True)
    return x


def _group_norm_for_onnx(x, weight, bias, n, c, hw, groups, eps):
    """Group norm spelled out for ONNX files: exported whole it becomes InstanceNormalization over each group's
    channels x H x W at once, which onnxruntime computed with 112x torch's own float32 error (timm
    test_efficientnet_gn at 224 px: 100,000 values a group); means over one axis at a time, centred before squaring."""
    grouped = x.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:])
    axes = range(2, grouped.dim())
    centred = grouped - _short_mean(grouped, axes)
    y = (centred / torch.sqrt(_short_mean(centred * centred, axes) + eps)).reshape(x.shape)
    affine = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(affine)
    if bias is not None:
        y = y + bias.reshape(affine)
    return y, None, None


def _var_for_onnx(x, dim=None, correction=None, keepdim=False):
    """torch.var the same way, for ONNX files (timm's EvoNorm: onnxruntime 24x torch's own error over 224-px
    groups); over the batch axis, or all axes, the op as it is."""
    axes = sorted({d % x.dim() for d in dim}) if dim else []
    if not axes or 0 in axes:
        return torch.ops.aten.var.correction(x, dim, correction=correction, keepdim=keepdim)
    centred = x - _short_mean(x, axes)
    var = _short_mean(centred * centred, axes)
    count = math.prod(x.shape[a] for a in axes)
    correction = 1 if correction is None else correction
    if correction:
        var = var * (count / (count - correction) if count > correction else math.nan)  # (as torch: NaN)
    return var if keepdim else var.squeeze(axes)


# while torch.onnx exports a program, these ops are spelled in ops that ONNX runtimes compute as exactly as torch
_ONNX_SPELLED = {"aten.native_group_norm.default": _group_norm_for_onnx, "aten.var.correction": _var_for_onnx}


def _depthwise_float64(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """A float64 depthwise convolution of 7x7 or more as one multiply-add per kernel tap over the whole batch (the
    same sums in another order): torch's float64 kernel runs one convolution per channel, which made ConvNeXt's
    float64 answers 1.7-2x slower on a quiet machine and 3.5x beside other work. Smaller kernels (a MobileNet's 3x3,
    where the taps were 0.75-0.9x), any other convolution, or a padding whose padded copy would be over four times
    the input stay torch's own."""
    flat = (list(stride), list(padding), list(dilation))
    if (transposed or x.dim() != 4 or groups == 1 or weight.shape[1] != 1 or x.shape[1] != groups
            or weight.shape[2] * weight.shape[3] < 49 or any(len(v) != 2 for v in flat) or weight.dtype != x.dtype
            or (x.shape[2] + 2 * flat[1][0]) * (x.shape[3] + 2 * flat[1][1]) > 4 * x.shape[2] * x.shape[3]):
        return torch.ops.aten.convolution.default(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    (sh, sw), (ph, pw), (dh, dw) = flat
    n, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    out_h, out_w = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    per = weight.shape[0] // c  # outputs per input channel (a depth multiplier)
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    spread = padded.unsqueeze(2).expand(n, c, per, *padded.shape[2:])
    taps = weight.reshape(1, c, per, kh, kw)
    out = torch.zeros(n, c, per, out_h, out_w, dtype=x.dtype, device=x.device)
    for i in range(kh):
        for j in range(kw):
            window = spread[..., i * dh: i * dh + sh * (out_h - 1) + 1: sh, j * dw: j * dw + sw * (out_w - 1) + 1: sw]
            out.addcmul_(window, taps[..., i, j, None, None])
    out = out.reshape(n, c * per, out_h, out_w)
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)


# while model.pt's float64 answers are computed (the reference), these ops take a faster float64 path
_FLOAT64_SPELLED = {"aten.convolution.default": _depthwise_float64}


def run_steps(module: ProgramModule, x: torch.Tensor, check=None, every_output: bool = False):
    """Run every node; `check(node, args, kwargs, value)` (the shape check) sees each result before the next op.
    Factory ops (full, arange, scalar_tensor) make their tensors on the input's device, as every other op does.
    The predicted output, or with `every_output` a tuple of every output (the predicted one first)."""
    env = {INPUT: x}
    stored = module.named_program_tensors()
    tracing = torch.jit.is_tracing()
    onnx = torch.onnx.is_in_onnx_export()
    widen = x.dtype == torch.float64  # a float64 reference: float32 constants in op arguments follow it
    device = x.device

    def value(arg):
        if isinstance(arg, Ref):
            return stored[arg.name] if arg.name in stored else env[arg.name]
        if isinstance(arg, tuple):
            return [value(a) for a in arg]
        if isinstance(arg, torch.device):
            return device
        if widen and arg is torch.float32:
            return torch.float64
        return arg

    node = None
    timed = not (tracing or onnx or torch.compiler.is_compiling()) and type(x) is torch.Tensor  # no SymInt in a graph
    deadline = time.process_time() + CPU_SECONDS_PER_IMAGE * max(1, x.shape[0]) if timed else math.inf
    try:
        for node, fn, frees in module._steps:
            if tracing and node.op in _TRACEABLE:
                fn = _TRACEABLE[node.op]
            elif onnx and node.op in _ONNX_SPELLED:
                fn = _ONNX_SPELLED[node.op]
            elif widen and not (tracing or onnx) and node.op in _FLOAT64_SPELLED:
                fn = _FLOAT64_SPELLED[node.op]
            args, kwargs = [value(a) for a in node.args], {k: value(v) for k, v in node.kwargs}
            if node.op in FACTORIES:
                kwargs.setdefault("device", device)
            result = fn(*args, **kwargs)
            if check is not None:
                check(node, args, kwargs, result)
            env[node.name] = result
            for name in frees:
                del env[name]
            if time.process_time() > deadline:
                raise FcxError(f"{node.label}: {len(x)} input(s) took more than {CPU_SECONDS_PER_IMAGE} s of CPU time "
                               "each in fcexport's interpreter (values its counts do not see as slow: denormals, "
                               "float64 remainders); not a model fcexport runs")
    except FcxError:
        raise
    except Exception as exc:
        if node is None or isinstance(exc, (MemoryError, KeyboardInterrupt)):
            raise
        raise FcxError(f"{node.label} failed on input of shape {tuple(x.shape)} ({type(exc).__name__}: "
                       f"{_first_line(exc)})") from exc
    if every_output:
        return tuple(env[name] for name in module.program.output_nodes)
    return env[module.program.output]


def layer_values(module: ProgramModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of each layer the user wrote (its last floating-point node, in program order) for input `x`:
    what verify compares, layer by layer, to name where a runtime leaves its noise band."""
    values: dict[str, tuple] = {}
    with torch.inference_mode():
        run_steps(module, x, check=_layer_recorder(values, x.shape[0]))
    return values


def _layer_recorder(values: dict, batch: int):
    def record(node, args, kwargs, result):
        if node.layer and isinstance(result, torch.Tensor) and result.is_floating_point() and result.dim() >= 1 \
                and result.shape[0] == batch:
            values.pop(node.layer, None)  # re-inserted: the order is where each layer ends
            values[node.layer] = (node.layer_type, result.detach())
    return record


class LayerTap(ProgramModule):
    """The program answering every layer's output besides its logits, flattened side by side in one (N, values)
    tensor (the logits first, then layer_values' order): one output any runtime returns, so a copy of an exported
    file made from it shows where that runtime's values leave their band. Exported for a fixed batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, tuple] = {}
        logits = run_steps(self, x, check=_layer_recorder(values, x.shape[0]))
        parts = [logits, *(value for _, value in values.values())]
        return torch.cat([part.reshape(x.shape[0], -1).to(logits.dtype) for part in parts], 1)


def fingerprint(program: Program) -> dict[str, str]:
    """Every node (op, arguments, layer) and every tensor (dtype, shape, bytes) of a program, for comparing
    a stored program with a fresh one: a changed weight of any dtype or size, op or wire shows up."""
    import hashlib

    items = {f"node '{n.name}' ({n.op})": repr((n.op, n.args, n.kwargs)) for n in program.nodes}
    items["output"] = program.output
    for name, node in program.extras:
        items[f"output '{name}'"] = node
    for name, tensor in program.tensors.items():
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        items[f"tensor '{name}' ({str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)})"] = hashlib.sha256(data).hexdigest()
    return items


@dataclass(frozen=True)
class Shapes:
    """What the meta-device run at batch 1 found: each tensor node's shape, the multiply-accumulates, and the
    work (multiply-accumulates plus the values every op reads, writes or visits: opset.COST_MODELS)."""

    of: Mapping[str, tuple]
    macs: int
    work: int
    peak: int  # bytes of the values alive at once at the program's worst point (float32): what a batch costs per image


def check_shapes(program: Program, input_shape, where: str) -> Shapes:
    """Bound the program before anything real is allocated: run it on the meta device at batch 1 (every
    intermediate's size and all ops' work within the bounds), then once with the batch as a symbol (every size
    grows at most linearly in the batch, each extra image within the same bounds), so the bounds hold at every
    batch size a command runs. Any failure is one FcxError naming the node."""
    try:
        shapes = _check_batch_one(program, input_shape, where)
        _check_growth(program, input_shape, where)
    except FcxError as exc:
        raise FcxError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from exc
    return shapes


def _check_batch_one(program: Program, input_shape, where: str) -> Shapes:
    """Run on the meta device at batch 1: each result's full (materialised) size, the total, and the work."""
    module = ProgramModule(_on_meta(program))
    shapes: dict[str, tuple] = {}
    totals = {"bytes": 0, "macs": 0, "elements": 0, "work": 0}
    frees = {node.name: freed for node, _, freed in module._steps}
    alive = _Alive(4 * math.prod(input_shape))

    def check(node: Node, args, kwargs, result) -> None:
        _check_ints(node, result, where)
        if isinstance(result, torch.Tensor):
            shapes[node.name] = tuple(result.shape)
        if node.op == GETITEM:
            alive.made(node, 0, 0)  # picks a value already counted, and keeps it alive
        elif node.op not in SIZE_OPS:  # (a size op computes an int)
            count(node, args, kwargs, result)
        alive.freed(frees[node.name])

    def count(node: Node, args, kwargs, result) -> None:
        sizes = [item.numel() * item.element_size() for item in _tensors(result)]
        for item, size in zip(_tensors(result), sizes):
            if size > MAX_TENSOR_BYTES:
                raise FcxError(f"{where}: {node.label} makes a tensor of shape {tuple(item.shape)} for one image "
                               f"({item.numel():,} values; at most {MAX_TENSOR_BYTES:,} bytes)")
        totals["bytes"] += sum(sizes)
        named = _named(node, args, kwargs)
        alive.made(node, sum(sizes), scratch_bytes(node.op, named, result))
        if alive.peak > MAX_TOTAL_BYTES:
            raise FcxError(f"{where}: {node.label} needs {alive.peak:,} bytes alive at once for one image, its kernel's "
                           f"scratch included (at most {MAX_TOTAL_BYTES:,})")
        macs, elements = _cost(node, named, result)
        totals["macs"] += macs
        totals["elements"] += elements
        totals["work"] += macs + elements
        _check_totals(totals, node, where, "")

    out = run_steps(module, torch.empty((1, *input_shape), device="meta"), check)
    if not isinstance(out, torch.Tensor):
        raise FcxError(f"{where}: the program must return a tensor")
    return Shapes(MappingProxyType(shapes), totals["macs"], totals["work"], alive.peak)


class _Alive:
    """The bytes one image keeps alive as the program runs: each result counted whole (a view too) from its making
    until the last reader of it and of every view of it is done (a view holds its base's storage: a slice of a
    clone kept to the end keeps the whole clone), as the interpreter frees values; `peak` adds a kernel's scratch."""

    def __init__(self, first: int):
        self.root = {INPUT: INPUT}  # each live value -> the value whose storage it shares (itself, or a view's base)
        self.members = {INPUT: {INPUT}}  # each storage -> the live values on it
        self.held = {INPUT: first}  # each storage -> the bytes counted for it
        self.now = self.peak = first

    def made(self, node: Node, size: int, scratch: int) -> None:
        source = _aliased(node)
        root = node.name if source is None else self.root.get(source, source)
        self.root[node.name] = root
        self.members.setdefault(root, set()).add(node.name)
        self.held[root] = self.held.get(root, 0) + size
        self.now += size
        self.peak = max(self.peak, self.now + scratch)

    def freed(self, names) -> None:
        for name in names:
            root = self.root.pop(name, None)
            if root is None:
                continue  # an int, or a value never counted
            self.members[root].discard(name)
            if not self.members[root]:
                del self.members[root]
                self.now -= self.held.pop(root, 0)


def _aliased(node: Node) -> str | None:
    """The value whose storage an op's result shares, by the op's schema (`view(Tensor(a) self) -> Tensor(a)`), or
    the tuple getitem picks from; None for a result with storage of its own."""
    if node.op == GETITEM:
        return node.args[0].name if isinstance(node.args[0], Ref) else None
    schema = aten_op(node.op)._schema
    if not schema.returns or schema.returns[0].alias_info is None:
        return None
    return next((value.name for argument, value in zip(schema.arguments, node.args)
                 if argument.alias_info is not None and isinstance(value, Ref)), None)


@torch.inference_mode()  # inference tensors keep no view records: 10,000 chained fake views would hold gigabytes
def _check_growth(program: Program, input_shape, where: str) -> None:
    """Run on fake tensors whose batch is a symbol N (torch's ShapeEnv): every size, integer and cost must be
    a + b*N, and the b of each (what one more image adds) within the per-image bounds. A program that only
    works at one batch size, or whose sizes grow like N^2 or N % 7, is refused."""
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env, static_shapes=False)

    def fake(tensor: torch.Tensor, dynamic=()):
        sizes = [DimDynamic.DYNAMIC if i in dynamic else DimDynamic.STATIC for i in range(tensor.dim())]
        return mode.from_tensor(tensor, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    meta = _on_meta(program)
    x = fake(torch.empty((2, *input_shape), device="meta"), dynamic=(0,))
    module = ProgramModule(replace(program, tensors={k: fake(v) for k, v in meta.tensors.items()}))
    batch = x.shape[0].node.expr
    totals = {"bytes": 0, "elements": 0, "work": 0}

    def slope(node: Node, value, what: str) -> int:
        if batch in shape_env.replacements:
            raise FcxError(f"{where}: {node.label} works for one batch size only; models must take any batch")
        return _slope(value, batch, f"{where}: {node.label} {what}")

    def check(node: Node, args, kwargs, result) -> None:
        if isinstance(result, torch.SymInt):
            slope(node, result, "computes a size")
        if node.op == GETITEM or node.op in SIZE_OPS:
            return
        for item in _tensors(result):
            extra = slope(node, item.numel(), f"makes a tensor of shape {tuple(item.shape)}") * item.element_size()
            if extra > MAX_TENSOR_BYTES:
                raise FcxError(f"{where}: {node.label} makes a tensor of shape {tuple(item.shape)}: {extra:,} more bytes "
                               f"for each image of the batch (at most {MAX_TENSOR_BYTES:,})")
            totals["bytes"] += extra
        macs, elements = (slope(node, value, "does work") for value in _cost(node, _named(node, args, kwargs), result))
        totals["elements"] += elements
        totals["work"] += macs + elements
        _check_totals(totals, node, where, " for each image added to a batch")

    with mode, enable_python_dispatcher():
        found = run_steps(module, x, check, every_output=True)
    for (name, _), value in zip(program.extras, found[1:]):  # each (N, fixed sizes) in float32, as capture keeps them
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.dim() >= 2
                and isinstance(value.shape[0], torch.SymInt) and value.shape[0].node.expr == batch
                and all(isinstance(size, int) for size in value.shape[1:])):
            raise FcxError(f"{where}: the output '{name}' is {tuple(getattr(value, 'shape', ()))} of "
                           f"{getattr(value, 'dtype', type(value).__name__)} for a batch of N: each output must be float32 "
                           "of shape (N, ...) with fixed sizes after the batch")


def output_shape(program: Program, shapes: Shapes, where: str) -> tuple[int, ...]:
    """One image's output: (classes,) for a classifier's logits (N, classes), (classes, H, W) for a segmentation
    model's per-pixel logits (N, classes, H, W); anything else is refused."""
    out = tuple(int(v) for v in shapes.of.get(program.output, ()))
    if len(out) not in (2, 4) or out[0] != 1:
        raise FcxError(f"{where}: the model must return logits of shape (N, classes), or (N, classes, H, W) per pixel; "
                       f"it returns {out} for one image")
    return out[1:]


def other_outputs(program: Program, shapes: Shapes, where: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, one image's shape) of each output besides the logits (spec.ModelSpec.other_outputs); each must have the
    batch as its first size."""
    found = []
    for name, node in program.extras:
        shape = tuple(int(v) for v in shapes.of.get(node, ()))
        if not shape or shape[0] != 1 or len(shape) < 2:
            raise FcxError(f"{where}: the output '{name}' has shape {shape} for one image: each output must have the batch first")
        found.append((name, shape[1:]))
    return tuple(found)


def returns_probabilities(program: Program, output: tuple[int, ...]) -> bool:
    """Whether the kept output (one image's `output` shape) is already probabilities: the model's last op a softmax
    over the class axis (an nn.Softmax at the end, a YOLO classifier) or a sigmoid on its one logit."""
    last = program.node(program.output)
    if last is None:
        return False
    if last.op == "aten._softmax.default" and len(last.args) > 1 and type(last.args[1]) is int:
        return last.args[1] % (len(output) + 1) == 1
    return last.op == "aten.sigmoid.default" and output[0] == 1


def task_of(shape: tuple[int, ...]) -> str:
    """spec.TASKS by the output's shape for one image."""
    return "classification" if len(shape) == 1 else "segmentation"


def _on_meta(program: Program) -> Program:
    """The program with empty meta tensors of its tensors' shapes and dtypes: nothing real to read or copy."""
    with torch.device("meta"):
        return replace(program, tensors={k: torch.empty(v.shape, dtype=v.dtype) for k, v in program.tensors.items()})


def _check_totals(totals: dict, node: Node, where: str, per: str) -> None:
    """All intermediates' bytes and all ops' work so far within what one image may take; `per` says which count."""
    over = (f"{totals['bytes']:,} bytes of intermediates{per}, at most {MAX_TOTAL_BYTES:,}" if totals["bytes"] > MAX_TOTAL_BYTES
            else f"{totals['work']:.3g} operations{per}, at most {MAX_WORK:.0e}" if totals["work"] > MAX_WORK
            else f"{totals['elements']:.3g} values read, written or visited{per}, at most {MAX_ELEMENTS:.0e}"
            if totals["elements"] > MAX_ELEMENTS else "")
    if over:
        raise FcxError(f"{where}: the program needs more memory or work per image than fcexport allows (at {node.label}): {over}")


def _tensors(result) -> list:
    """The tensors an op returned (one, or several in a tuple or list)."""
    return [t for t in (result if isinstance(result, (tuple, list)) else [result]) if isinstance(t, torch.Tensor)]


def _check_ints(node: Node, result, where: str) -> None:
    """A size an op computes must stay in range (a size of 2^60 is a lie about the shapes, not a model)."""
    for item in result if isinstance(result, (tuple, list)) else [result]:
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INT:
            raise FcxError(f"{where}: {node.label} computes the size {item:,}, which is out of range")


def _named(node: Node, args: list, kwargs: dict) -> dict:
    """An op's arguments by schema name."""
    schema = aten_op(node.op)._schema
    return {**{a.name: v for a, v in zip([a for a in schema.arguments if not a.kwarg_only], args)}, **kwargs}


def _cost(node: Node, named: dict, result) -> tuple[int, int]:
    """(multiply-accumulates, elements) of one op by its opset cost model, given its arguments by schema name."""
    try:
        return COST_MODELS[node.op](named, result)
    except ValueError as exc:  # arguments its kernel would trust without checking (opset's cost models say which)
        raise FcxError(f"{node.label}: {exc}") from None


def _slope(value, batch, label: str) -> int:
    """b in value = a + b*N for a size that depends on the batch N; FcxError if it is not of that form (N^2,
    N // 3, another symbol) or shrinks as N grows."""
    import sympy

    expr = value.node.expr if isinstance(value, torch.SymInt) else sympy.Integer(value)
    slope = _linear_slope(expr, batch)
    if slope is None:
        shown = str(expr.subs(batch, sympy.Symbol("N")))
        raise FcxError(f"{label} of {_printable(shown, 80)} for a batch of N; fcexport takes models whose sizes grow "
                       "at most linearly with the batch")
    return slope


@functools.lru_cache(maxsize=4096)
def _linear_slope(expr, batch) -> int | None:
    """b >= 0 where expr = a + b*batch with integers a and b, else None (a program repeats few expressions: cached)."""
    if not expr.free_symbols:
        return 0
    polynomial = expr.as_poly(batch) if expr.free_symbols == {batch} and expr.is_polynomial(batch) else None
    if polynomial is None or polynomial.degree() > 1:
        return None
    slope = polynomial.coeff_monomial(batch)
    return int(slope) if slope.is_integer and slope >= 0 else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return _printable(text.splitlines()[0], 200) if text else ""
