"""Fold every BatchNorm (and the input normalisation) into a neighbouring Linear or Conv, exactly.

A graph pass on the stored program (core ATen), in the spirit of ExecuTorch's fuse_batch_norm_with_conv.
At inference BatchNorm (`_native_batch_norm_legit_no_training`, whatever layer or function called it) and
the input normalisation (`div(sub(x, mean), std)`) are per-channel affine maps y = scale * x + shift. After
a Conv (`convolution`) or Linear (`linear`, or `addmm` / `mm` on a transposed stored weight) the map folds into that
layer's output rows; before a Linear it folds into the input columns (through a flattening `view` too),
and before a Conv without padding into its input channels (zero padding would turn into a non-zero
border, so a padded Conv keeps it). The maths runs in float64 and is cast back once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from fcexport.errors import FcxError
from fcexport.program import INPUT, SHAPE_READERS, Node, Program, Ref, check_shapes, refs_in

BATCHNORM = "aten._native_batch_norm_legit_no_training.default"
BATCH_STATISTICS = "aten._native_batch_norm_legit.no_stats"
CONV = "aten.convolution.default"
LINEAR = "aten.linear.default"
LINEARS = ("aten.addmm.default", "aten.mm.default")


# ---- pure maths --------------------------------------------------------------------------


def batchnorm_affine(weight, bias, mean, var, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 with bn(x) == scale * x + shift per channel, in eval mode."""
    mean = mean.detach().double()
    scale = torch.rsqrt(var.detach().double() + eps)
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift


def fold_into_preceding(weight, bias, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """scale * (W x + b) + shift == W' x + b' for Linear (out, in) or Conv (out, in, *k) weights."""
    w = weight.detach().double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = (bias.detach().double() if bias is not None else torch.zeros_like(scale)) * scale + shift
    return w, b


def fold_into_following(weight, bias, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """W (scale * x + shift) + b == W' x + b' for a Linear weight (out, in), or a Conv weight
    (out, in, *k) without padding (every output sums every input channel times its kernel)."""
    w64 = weight.detach().double()
    per_input = (1, -1, *([1] * (w64.dim() - 2)))
    b = (bias.detach().double() if bias is not None else torch.zeros(w64.shape[0], dtype=torch.float64))
    return w64 * scale.view(per_input), b + (w64 * shift.view(per_input)).flatten(1).sum(1)


# ---- report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fold:
    layer: str  # as the user wrote it: features.3.block.1.1
    layer_type: str
    into: str
    direction: str  # "into preceding" | "into following"


@dataclass(frozen=True)
class Left:
    layer: str
    layer_type: str
    reason: str


@dataclass(frozen=True)
class FuseReport:
    """What was folded into what, and what was left in place and why."""

    folded: tuple[Fold, ...] = ()
    left: tuple[Left, ...] = ()
    parameters_before: int = 0
    parameters_after: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return {
            "folded": [f.__dict__ for f in self.folded],
            "left": [x.__dict__ for x in self.left],
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "notes": list(self.notes),
        }


# ---- the pass ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Affine:
    """A per-channel affine map found in the program: the nodes it spans, where it reads and writes."""

    nodes: tuple[str, ...]  # removed when folded
    source: str  # the value it reads
    value: str  # the value it writes (what its users read)
    scale: torch.Tensor  # float64, one per channel (or one for all)
    shift: torch.Tensor
    layer: str
    layer_type: str


def fuse_program(program: Program, input_shape, strict: bool = False) -> tuple[Program, FuseReport]:
    """A new program with every legal BatchNorm and the input normalisation folded; the input is untouched.

    `strict=True` raises FcxError when any BatchNorm cannot be folded instead of leaving it in place."""
    shapes = check_shapes(program, input_shape, "model").of
    work = _Work(program, shapes)
    folded, left = [], []
    for node in program.nodes:
        if node.op == BATCH_STATISTICS:
            left.append(Left(node.layer, node.layer_type, "track_running_stats=False: it normalises with batch "
                                                         "statistics at inference, which is not an affine map"))
            continue
        affine = work.affine_at(node)
        if affine is None:
            continue
        outcome = work.fold_before(affine) or work.fold_after(affine)
        if isinstance(outcome, Fold):
            folded.append(outcome)
        elif node.op == BATCHNORM or affine.source == INPUT:  # other (x - c) / s inside a model are not reported
            left.append(Left(affine.layer, affine.layer_type, outcome))
    fused = work.program()
    report = FuseReport(tuple(folded), tuple(left), program.parameter_count(), fused.parameter_count())
    batchnorms_left = [x for x in left if x.layer_type != "Normalize"]
    if strict and batchnorms_left:
        details = "; ".join(f"{x.layer}: {x.reason}" for x in batchnorms_left)
        raise FcxError(f"strict folding: {len(batchnorms_left)} BatchNorm layer(s) cannot be folded ({details})")
    return fused, report


def fuse_with_report(model, example_input: torch.Tensor, strict: bool = False):
    """For a live nn.Module (or a loaded model.pt): (module running the folded program, FuseReport).
    The module is exported with torch.export from an eval-mode copy; the caller's module is untouched."""
    import copy

    from fcexport.program import ProgramModule, capture

    if example_input is None or not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise FcxError("pass an example input of shape (N, C, H, W): folding works on the exported program")
    shape = tuple(example_input.shape[1:])
    program = model.program if isinstance(model, ProgramModule) else capture(copy.deepcopy(model).eval(), shape)
    fused, report = fuse_program(program, shape, strict)
    return ProgramModule(fused).eval(), report


def fuse_batchnorm(model, example_input: torch.Tensor, strict: bool = False):
    """A new eval-mode module with every legal BatchNorm folded; the input model is untouched."""
    return fuse_with_report(model, example_input, strict)[0]


class _Work:
    """The program being rewritten: nodes by name, tensors (replaced as folds land), who reads what."""

    def __init__(self, program: Program, shapes):
        self.order = [n.name for n in program.nodes]
        self.nodes = {n.name: n for n in program.nodes}
        self.tensors = dict(program.tensors)
        self.output, self.extras = program.output, program.extras
        self.shapes = shapes
        self.readers: dict[str, set[str]] = {}
        for node in program.nodes:
            self._add_reader(node)

    def _add_reader(self, node: Node) -> None:
        for ref in refs_in((node.args, node.kwargs)):
            self.readers.setdefault(ref.name, set()).add(node.name)

    def program(self) -> Program:
        nodes = tuple(self.nodes[name] for name in self.order if name in self.nodes)
        return Program(nodes, self.output, self.tensors, self.extras).without_unused()

    def users(self, name: str) -> list[Node]:
        return [self.nodes[n] for n in sorted(self.readers.get(name, ())) if n in self.nodes]

    def returned(self, name: str) -> bool:
        """Whether the model returns this value (its logits or another output): a fold must not change it."""
        return name == self.output or any(node == name for _, node in self.extras)

    def stored(self, arg) -> torch.Tensor | None:
        return self.tensors.get(arg.name) if isinstance(arg, Ref) else None

    # -- finding affine maps

    def affine_at(self, node: Node) -> _Affine | None:
        if node.name not in self.nodes:
            return None
        if node.op == BATCHNORM:
            return self._batchnorm(node)
        if node.op == "aten.div.Tensor":
            return self._normalization(node)
        return None

    def _batchnorm(self, node: Node) -> _Affine | None:
        source, weight, bias, mean, var = node.args[:5]
        eps = node.args[6]
        if not isinstance(source, Ref) or any(a is not None and self.stored(a) is None for a in (weight, bias)) \
                or self.stored(mean) is None or self.stored(var) is None:
            return None
        outputs = self.users(node.name)
        if not outputs or any(u.op != "getitem" or u.args[1] != 0 for u in outputs) or len(outputs) != 1:
            return None
        scale, shift = batchnorm_affine(self.stored(weight), self.stored(bias), self.stored(mean), self.stored(var), float(eps))
        return _Affine((node.name, outputs[0].name), source.name, outputs[0].name, scale, shift, node.layer, node.layer_type)

    def _normalization(self, node: Node) -> _Affine | None:
        """div(sub(a, mean), std) with stored per-channel (or single) mean and std: the input normalisation."""
        numerator, std_ref = node.args
        sub = self.nodes.get(numerator.name) if isinstance(numerator, Ref) else None
        if sub is None or sub.op != "aten.sub.Tensor" or len(sub.args) != 2 or sub.kwargs or node.kwargs:
            return None
        source, mean_ref = sub.args
        mean, std = self.stored(mean_ref), self.stored(std_ref)
        if mean is None or std is None or not isinstance(source, Ref) or len(self.users(sub.name)) != 1 or self.returned(sub.name):
            return None
        rank = len(self.shapes.get(source.name, ())) if source.name != INPUT else 4
        per_channel = [t for t in (mean, std) if t.numel() > 1]
        if any(t.dim() != rank - 1 or t.shape[1:].numel() != 1 for t in per_channel) or \
                (len(per_channel) == 2 and mean.numel() != std.numel()):
            return None
        std64, mean64 = std.double().flatten(), mean.double().flatten()
        count = max(mean64.numel(), std64.numel())
        scale = (1.0 / std64).expand(count).clone()
        shift = (-mean64 / std64).expand(count).clone()
        return _Affine((sub.name, node.name), source.name, node.name, scale, shift, node.layer or sub.layer, node.layer_type or "Normalize")

    # -- folding

    def fold_before(self, affine: _Affine) -> Fold | None:
        """Into the Conv or Linear that produces the affine map's input, when nothing else reads it."""
        producer = self.nodes.get(affine.source)
        if producer is None or len(self.users(producer.name)) != 1 or self.returned(producer.name):
            return None
        if producer.op == "aten.view.default":  # timm's (N, L, C) -> (N * L, C) -> BatchNorm1d: the channel axis stays last
            merged, inner = self.shapes.get(producer.name, ()), self.nodes.get(getattr(producer.args[0], "name", ""))
            if inner is None or inner.op not in (LINEAR, *LINEARS) or len(merged) != 2 or self.shapes.get(inner.name, ())[-1:] != merged[-1:] \
                    or len(self.users(inner.name)) != 1 or self.returned(inner.name):
                return None
            producer = inner
        elif producer.op != CONV and len(self.shapes.get(producer.name, ())) != 2:
            return None  # a Linear on (N, L, C): the BatchNorm's channel axis is not its output axis
        weight_ref, bias_ref, make_bias = self._weights(producer)
        if weight_ref is None:
            return None
        weight = self.tensors[weight_ref.name]
        channels = weight.shape[0]
        if affine.scale.numel() not in (1, channels):
            return None
        scale, shift = affine.scale.expand(channels), affine.shift.expand(channels)
        w, b = fold_into_preceding(weight, self.stored(bias_ref), scale, shift)
        self._set_weights(producer, weight_ref, bias_ref, make_bias, w, b)
        self._remove(affine)
        return Fold(affine.layer, affine.layer_type, f"{producer.layer} ({producer.layer_type})", "into preceding")

    def fold_after(self, affine: _Affine) -> Fold | str:
        """Into the single Conv (unpadded) or Linear that reads the affine map's output; else why not."""
        users = [u for u in self.users(affine.value) if u.op not in SHAPE_READERS]
        if len(users) != 1:
            return f"its output has {len(users)} users, so no single layer can absorb it"
        if self.returned(affine.value):
            return "its output is also one of the model's outputs, so no following layer can absorb it"
        user, repeat = users[0], 1
        shape = self.shapes.get(affine.value) or self.shapes.get(affine.source) or ()
        if user.op == "aten.view.default" and len(self.users(user.name)) == 1 and self._flattens(shape, self.shapes.get(user.name)):
            user, repeat = self.users(user.name)[0], math.prod(shape[2:])
        weight_ref, bias_ref, make_bias = self._weights(user)
        if weight_ref is None:
            return f"its output feeds {user.op.removeprefix('aten.')} ({user.layer or 'top level'}), not a Linear/Conv"
        reads = user.args[1] if user.op == "aten.addmm.default" else user.args[0]
        if not isinstance(reads, Ref) or reads.name not in (affine.value, *(n.name for n in users if n.op == "aten.view.default")):
            return f"the following layer '{user.layer}' takes it as a non-input argument"
        weight = self.tensors[weight_ref.name]
        if user.op == CONV:
            padding, groups = user.args[4], user.args[8]
            if groups != 1 or any(p != 0 for p in padding):
                return (f"the following Conv '{user.layer}' pads with zeros (or is grouped): folding would change its "
                        "border, so it stays an explicit op")
            if len(shape) != weight.dim():
                return f"its output is not {weight.dim()}-D, so the channel axis is not the next layer's input axis"
        elif repeat == 1 and len(shape) != 2:
            return "its output is not 2-D, so the channel axis is not the next Linear's input axis"
        features = weight.shape[1]
        channels = affine.scale.numel()
        if channels != 1 and channels * repeat != features:
            return f"its {channels} channels do not match '{user.layer}' input size {features}"
        scale = affine.scale.repeat_interleave(repeat) if channels != 1 else affine.scale.expand(features)
        shift = affine.shift.repeat_interleave(repeat) if channels != 1 else affine.shift.expand(features)
        w, b = fold_into_following(weight, self.stored(bias_ref), scale, shift)
        self._set_weights(user, weight_ref, bias_ref, make_bias, w, b)
        self._remove(affine)
        return Fold(affine.layer, affine.layer_type, f"{user.layer} ({user.layer_type})", "into following")

    @staticmethod
    def _flattens(before, after) -> bool:
        return bool(before) and len(before) >= 3 and after is not None and tuple(after) == (before[0], math.prod(before[1:]))

    def _weights(self, node: Node):
        """(weight ref, bias ref or None, whether a bias must be created) of a Conv/Linear node whose
        stored weight (and bias) nothing else reads; (None, None, False) otherwise."""
        if node.op == CONV:
            if node.args[6]:  # transposed
                return None, None, False
            weight_ref, bias_ref = node.args[1], node.args[2]
        elif node.op == LINEAR:
            if node.kwargs:
                return None, None, False
            weight_ref = node.args[1]
            bias_ref = node.args[2] if len(node.args) > 2 else None
        elif node.op in LINEARS:
            transposed = node.args[-1]
            permute = self.nodes.get(transposed.name) if isinstance(transposed, Ref) else None
            if permute is None or permute.op != "aten.permute.default" or tuple(permute.args[1]) != (1, 0) \
                    or len(self.users(permute.name)) != 1:
                return None, None, False
            weight_ref = permute.args[0]
            bias_ref = node.args[0] if node.op == "aten.addmm.default" else None
            if node.kwargs:
                return None, None, False
        else:
            return None, None, False
        weight = self.stored(weight_ref)
        if weight is None or not weight.is_floating_point() or len(self.users(weight_ref.name)) != 1:
            return None, None, False
        if bias_ref is not None:
            bias = self.stored(bias_ref)
            if bias is None or bias.shape != (weight.shape[0],) or len(self.users(bias_ref.name)) != 1:
                return None, None, False
        return weight_ref, bias_ref, bias_ref is None

    def _set_weights(self, node: Node, weight_ref: Ref, bias_ref, make_bias: bool, w, b) -> None:
        dtype = self.tensors[weight_ref.name].dtype
        self.tensors[weight_ref.name] = w.to(dtype)
        if make_bias:
            name = weight_ref.name.removesuffix("weight") + "bias" if weight_ref.name.endswith("weight") else f"{weight_ref.name}.bias"
            while name in self.tensors:
                name += "_"
            bias_ref = Ref(name)
            if node.op in (CONV, LINEAR):
                self.nodes[node.name] = replace(node, args=(*node.args[:2], bias_ref, *node.args[3:]))
            else:  # mm(x, w.T) becomes addmm(b, x, w.T)
                self.nodes[node.name] = replace(node, op="aten.addmm.default", args=(bias_ref, *node.args))
            self.readers[name] = {node.name}
        self.tensors[bias_ref.name] = b.to(dtype)

    def _remove(self, affine: _Affine) -> None:
        """Route the affine map's input straight to its readers and drop its nodes."""
        def rewire(value):
            if isinstance(value, Ref) and value.name == affine.value:
                return Ref(affine.source)
            return tuple(rewire(v) for v in value) if isinstance(value, tuple) else value

        for name in affine.nodes:
            self.nodes.pop(name, None)
        for name in self.readers.pop(affine.value, set()):
            if name in self.nodes:
                node = self.nodes[name] = replace(self.nodes[name], args=rewire(self.nodes[name].args), kwargs=rewire(self.nodes[name].kwargs))
                self._add_reader(node)
        if self.returned(affine.value):  # a returned BatchNorm (the logits) folded backwards: its producer is returned
            self.output = affine.source if self.output == affine.value else self.output
            self.extras = tuple((name, affine.source if node == affine.value else node) for name, node in self.extras)
