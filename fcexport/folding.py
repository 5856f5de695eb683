"""Fold every BatchNorm (and the input Normalize) into a neighbouring Linear or Conv, exactly.

At inference BatchNorm is the per-channel affine map y = scale * x + shift. After a Linear/Conv
it folds into that layer's output rows; before a Linear it folds into that layer's input columns
(so Linear -> ReLU -> BN -> Linear folds into the second Linear), and before a Conv without
padding into its input channels (zero padding would turn into a non-zero border, so a padded Conv
keeps it). The maths runs in float64 and is cast back once, so folding adds no more rounding than
one float32 cast. Any module that torch.fx can trace works, not only nn.Sequential.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fcexport.errors import FcxError
from fcexport.graph import Tracer
from fcexport.models import Normalize

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---- pure maths --------------------------------------------------------------------------


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 with bn(x) == scale * x + shift per channel, in eval mode."""
    mean = bn.running_mean.detach().double()
    inv_std = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(mean)
    scale = gamma * inv_std
    return scale, beta - mean * scale


def normalize_affine(norm: Normalize, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 for (x - mean) / std over `features` values: one statistic for all,
    one per channel, or (after a Flatten of (N, C, H, W)) each channel's value repeated H * W times."""
    std, mean = norm.std.detach().double().flatten(), norm.mean.detach().double().flatten()
    scale, shift = 1.0 / std, -mean / std
    return scale.repeat_interleave(features // len(scale)), shift.repeat_interleave(features // len(shift))


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


@dataclass
class FuseReport:
    """What was folded into what, what was left in place and why, and what was dropped."""

    folded: list[dict] = field(default_factory=list)  # {"layer", "type", "into", "direction"}
    left: list[dict] = field(default_factory=list)  # {"layer", "reason"}
    removed: list[dict] = field(default_factory=list)  # {"layer", "reason"}: eval-mode identities
    notes: list[str] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---- graph pass --------------------------------------------------------------------------


def fuse_batchnorm(model: nn.Module, example_input: torch.Tensor | None = None, strict: bool = False) -> nn.Module:
    """A new eval-mode model with every legal BatchNorm folded; the input model is untouched."""
    return fuse_with_report(model, example_input, strict)[0]


def fuse_with_report(
    model: nn.Module, example_input: torch.Tensor | None = None, strict: bool = False
) -> tuple[fx.GraphModule, FuseReport]:
    """Fold BatchNorms and Normalize layers; with `example_input`, shapes are checked before folding.

    `strict=True` raises FcxError when any BatchNorm cannot be folded instead of leaving it in place.
    """
    report = FuseReport(parameters_before=sum(p.numel() for p in model.parameters()))
    work = copy.deepcopy(model)
    if work.training:
        report.notes.append("model was in training mode: folded its eval-mode behaviour (running statistics)")
    work.eval()
    try:
        gm = fx.GraphModule(work, Tracer().trace(work))
    except Exception as exc:
        raise FcxError(f"cannot trace the model with torch.fx ({type(exc).__name__}: {exc}); nothing was folded") from exc
    shapes_known = example_input is not None
    if shapes_known:
        ShapeProp(gm).propagate(example_input)
    else:
        report.notes.append("no example input: tensor ranks were not checked (Linear folds assume 2-D activations)")
    _remove_dropout(gm, report)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], (*BATCHNORMS, Normalize)):
            continue
        reason = _fold_node(gm, node, modules, calls, shapes_known, report)
        if reason:
            report.left.append({"layer": node.target, "type": type(modules[node.target]).__name__, "reason": reason})
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    report.parameters_after = sum(p.numel() for p in gm.parameters())
    if strict and report.left:
        details = "; ".join(f"{x['layer']}: {x['reason']}" for x in report.left)
        raise FcxError(f"strict folding: {len(report.left)} BatchNorm layer(s) cannot be folded ({details})")
    return gm, report


def _remove_dropout(gm: fx.GraphModule, report: FuseReport) -> None:
    """Dropout is the identity in eval mode; removing it lets BN -> Dropout -> Linear fold."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(modules[node.target], nn.modules.dropout._DropoutNd):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            report.removed.append({"layer": node.target, "reason": "dropout is the identity at inference"})


def _fold_node(gm, node, modules, calls, shapes_known, report) -> str | None:
    """Fold one BN/Normalize node into its producer, else its single consumer; return why not, or None."""
    norm = modules[node.target]
    if isinstance(norm, BATCHNORMS) and (not norm.track_running_stats or norm.running_mean is None):
        return "track_running_stats=False: it normalises with batch statistics at inference, which is not an affine map"
    source = node.args[0]
    producer = modules.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
    if _can_fold_into_producer(norm, source, producer, calls, shapes_known):
        scale, shift = _affine(norm, producer.weight.shape[0])
        _assign(producer, *fold_into_preceding(producer.weight, producer.bias, scale, shift))
        fold = {"layer": node.target, "type": type(norm).__name__, "into": f"{source.target} ({type(producer).__name__})",
                "direction": "into preceding"}
    else:
        users = list(node.users)
        if len(users) != 1:
            return f"its output has {len(users)} users, so no single layer can absorb it"
        user, through = users[0], node
        if isinstance(norm, Normalize) and _is_flatten(user, modules) and len(user.users) == 1:
            through, user = user, next(iter(user.users))  # (x - m) / s commutes with Flatten
        consumer = modules.get(user.target) if user.op == "call_module" else None
        why_not = _why_not_consumer(norm, through, user, consumer, calls, shapes_known)
        if why_not:
            return why_not
        scale, shift = _affine(norm, _input_features(consumer))
        _assign(consumer, *fold_into_following(consumer.weight, consumer.bias, scale, shift))
        fold = {"layer": node.target, "type": type(norm).__name__, "into": f"{user.target} ({type(consumer).__name__})",
                "direction": "into following"}
    # the norm is now inside a neighbour's weights: route its input straight to its users
    node.replace_all_uses_with(source)
    gm.graph.erase_node(node)
    report.folded.append(fold)
    return None


def _can_fold_into_producer(norm, source, producer, calls, shapes_known) -> bool:
    if producer is None or len(source.users) != 1 or calls[source.target] != 1:
        return False
    if isinstance(producer, nn.Linear):
        return _features(norm, producer.out_features) and _rank_ok(source, 2, shapes_known)
    if isinstance(producer, CONVS) and isinstance(norm, BATCHNORMS):
        return norm.num_features == producer.out_channels
    return False


def _why_not_consumer(norm, node, user, consumer, calls, shapes_known) -> str | None:
    if isinstance(consumer, CONVS) and not (consumer.groups == 1 and all(p == 0 for p in _padding(consumer))):
        return (f"the following Conv '{user.target}' pads with zeros (or is grouped): folding would change its border, "
                "so it stays an explicit op")
    if not isinstance(consumer, (nn.Linear, *CONVS)):
        kind = type(consumer).__name__ if consumer is not None else user.op
        return f"no neighbouring Linear/Conv: its input comes from a shared or non-linear op and its output feeds {kind}"
    if user.args[0] is not node or calls[user.target] != 1:
        return f"the following layer '{user.target}' is shared or takes it as a non-input argument"
    features = _input_features(consumer)
    if not _features(norm, features):
        return f"its {_norm_size(norm)} features do not match '{user.target}' input size {features}"
    rank = 2 if isinstance(consumer, nn.Linear) else consumer.weight.dim()
    if not _rank_ok(node, rank, shapes_known):
        return f"its output is not {rank}-D, so the channel axis is not the next layer's input axis"
    return None


def _features(norm, count: int) -> bool:
    """A BN must match exactly; a Normalize has one statistic, one per channel, or channels that tile `count`."""
    if isinstance(norm, Normalize):
        return count % norm.mean.numel() == 0
    return norm.num_features == count


def _norm_size(norm) -> int:
    return norm.mean.numel() if isinstance(norm, Normalize) else norm.num_features


def _input_features(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _padding(conv) -> tuple:
    return (1,) if conv.padding == "same" else (0,) if conv.padding == "valid" else tuple(conv.padding)


def _is_flatten(node: fx.Node, modules: dict) -> bool:
    """nn.Flatten() or torch.flatten(x, 1): keeps the batch axis, flattens the rest."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if node.op == "call_function" and node.target is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        return start == 1 and len(node.args) <= 2 and "end_dim" not in node.kwargs
    return False


def _rank_ok(node: fx.Node, rank: int, shapes_known: bool) -> bool:
    meta = node.meta.get("tensor_meta")
    return not shapes_known or (meta is not None and len(meta.shape) == rank)


def _affine(norm, features: int) -> tuple[torch.Tensor, torch.Tensor]:
    return normalize_affine(norm, features) if isinstance(norm, Normalize) else batchnorm_affine(norm)


def _assign(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write float64 results back in the layer's own dtype and device, creating a bias if it had none."""
    dtype, device = layer.weight.dtype, layer.weight.device
    layer.weight = nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(bias.to(device=device, dtype=dtype))
