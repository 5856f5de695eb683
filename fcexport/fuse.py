"""Fold every BatchNorm (and the input Normalize) into a neighbouring Linear or Conv, exactly.

At inference BatchNorm is the per-channel affine map y = scale * x + shift. After a Linear/Conv
it folds into that layer's output rows; before a Linear it folds into that layer's input columns
(so Linear -> ReLU -> BN -> Linear folds into the second Linear). The maths runs in float64 and
is cast back once, so folding adds no more rounding than one float32 cast. Any module that
torch.fx can trace works, not only nn.Sequential.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fcexport.errors import FcxError
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
    """(scale, shift) in float64 for (x - mean) / std, broadcast to `features` channels."""
    std, mean = norm.std.detach().double(), norm.mean.detach().double()
    return torch.full((features,), 1.0, dtype=torch.float64) / std, torch.full((features,), 1.0, dtype=torch.float64) * (-mean / std)


def fold_into_preceding(weight, bias, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """scale * (W x + b) + shift == W' x + b' for Linear (out, in) or Conv (out, in, *k) weights."""
    w = weight.detach().double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = (bias.detach().double() if bias is not None else torch.zeros_like(scale)) * scale + shift
    return w, b


def fold_into_following(weight, bias, scale, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """W (scale * x + shift) + b == W' x + b' for a Linear weight (out, in)."""
    w64 = weight.detach().double()
    b = (bias.detach().double() if bias is not None else torch.zeros(w64.shape[0], dtype=torch.float64)) + w64 @ shift
    return w64 * scale.view(1, -1), b


# ---- report ------------------------------------------------------------------------------


@dataclass
class FuseReport:
    """What was folded into what, what was left in place and why, and what was dropped."""

    folded: list[dict] = field(default_factory=list)  # {"layer", "into", "direction"}
    left: list[dict] = field(default_factory=list)  # {"layer", "reason"}
    removed: list[dict] = field(default_factory=list)  # {"layer", "reason"}: eval-mode identities
    notes: list[str] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# ---- graph pass --------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """Keeps Normalize as one node so it can be folded like a BatchNorm."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or super().is_leaf_module(m, qualname)


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
        gm = fx.GraphModule(work, _Tracer().trace(work))
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
            report.left.append({"layer": node.target, "reason": reason})
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    report.parameters_after = sum(p.numel() for p in gm.parameters())
    if strict and report.left:
        details = "; ".join(f"{x['layer']}: {x['reason']}" for x in report.left)
        raise FcxError(f"--strict: {len(report.left)} BatchNorm layer(s) cannot be folded ({details})")
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
        fold = {"layer": node.target, "into": source.target, "direction": "into preceding"}
    else:
        users = list(node.users)
        if len(users) != 1:
            return f"its output has {len(users)} users, so no single layer can absorb it"
        user = users[0]
        consumer = modules.get(user.target) if user.op == "call_module" else None
        why_not = _why_not_consumer(norm, node, user, consumer, calls, shapes_known)
        if why_not:
            return why_not
        scale, shift = _affine(norm, consumer.in_features)
        _assign(consumer, *fold_into_following(consumer.weight, consumer.bias, scale, shift))
        fold = {"layer": node.target, "into": user.target, "direction": "into following"}
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
    if not isinstance(consumer, nn.Linear):
        kind = type(consumer).__name__ if consumer is not None else user.op
        return f"no neighbouring Linear/Conv: its input comes from a shared or non-linear op and its output feeds {kind}"
    if user.args[0] is not node or calls[user.target] != 1:
        return f"the following Linear '{user.target}' is shared or takes it as a non-input argument"
    if not _features(norm, consumer.in_features):
        return f"its {norm.num_features} features do not match '{user.target}' in_features={consumer.in_features}"
    if not _rank_ok(node, 2, shapes_known):
        return "its output is not 2-D (N, features), so the channel axis is not the Linear's input axis"
    return None


def _features(norm, count: int) -> bool:
    return isinstance(norm, Normalize) or norm.num_features == count


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


# ---- checkpoints -------------------------------------------------------------------------


def fuse_checkpoint_model(checkpoint: dict, strict: bool = True) -> tuple[nn.Module, FuseReport]:
    """Fuse an fcexport checkpoint's model into the plain MLP of its inference config.

    Rebuilding from the config (rather than keeping the fx GraphModule) gives a model that a
    fused checkpoint can describe and that scripts and exports like any nn.Sequential.
    """
    from fcexport.checkpoint import model_from_checkpoint
    from fcexport.models import build_model, inference_config

    model = model_from_checkpoint(checkpoint)
    example = torch.zeros(2, *checkpoint["input_shape"])
    graph, report = fuse_with_report(model, example, strict=strict)
    fused = build_model(inference_config(checkpoint["config"]))
    fused.load_state_dict(graph.state_dict(), strict=True)
    return fused.eval(), report


def fused_checkpoint(checkpoint: dict, source_sha256: str, source_name: str) -> tuple[dict, nn.Module, FuseReport]:
    """The fused model as a new checkpoint whose config rebuilds it (no BatchNorm, no Normalize)."""
    from fcexport.checkpoint import make_checkpoint
    from fcexport.models import inference_config

    fused, report = fuse_checkpoint_model(checkpoint)
    new = make_checkpoint(
        fused,
        inference_config(checkpoint["config"]),
        checkpoint["class_names"],
        normalization=checkpoint.get("normalization"),
        preprocess=checkpoint.get("preprocess"),
        dataset=checkpoint.get("dataset"),
        metrics=checkpoint.get("metrics"),
        provenance={"fused": True, "source": source_name, "source_sha256": source_sha256, "folds": report.folded},
    )
    return new, fused, report


def run(
    checkpoint_path: Path,
    out_path: Path,
    verify: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    device: str = "cpu",
    data: str | None = None,
    data_root: str | None = None,
) -> dict:
    """`fcx fuse-bn`: write the fused checkpoint, time both models at batch 1, optionally verify parity."""
    import numpy as np

    from fcexport import verify as verification
    from fcexport.backends import module_predictor
    from fcexport.bench import measure
    from fcexport.checkpoint import artifact_metadata, load_model, save_checkpoint
    from fcexport.files import sha256_file

    tolerance = verification.Tolerance(atol, rtol)
    original, checkpoint = load_model(checkpoint_path)
    new_checkpoint, fused, report = fused_checkpoint(checkpoint, sha256_file(checkpoint_path), checkpoint_path.name)
    metadata = artifact_metadata(checkpoint)
    before = module_predictor(original, "eager", device, checkpoint_path, metadata)
    after = module_predictor(fused, "fused", device, out_path, metadata)
    one = np.random.default_rng(0).random((1, *checkpoint["input_shape"]), dtype=np.float32)
    result = {
        "source": str(checkpoint_path),
        "output": str(out_path),
        "report": report.as_dict(),
        "latency_ms": {"before": measure(before, one)["p50_ms"], "after": measure(after, one)["p50_ms"], "device": device},
        "verification": None,
    }
    if verify:
        inputs = verification.make_inputs(checkpoint, data, data_root)
        reference = module_predictor(original.to("cpu"), "eager", "cpu", checkpoint_path, metadata)(inputs.x)
        rows = verification.compare_predictors(reference, [after], inputs, tolerance)
        result["verification"] = verification.report(rows, inputs, verification.accuracy(reference, inputs.labels), tolerance)
        if not result["verification"]["passed"]:
            return result  # a failed fold is reported, never written
    save_checkpoint(new_checkpoint, out_path)
    return result
