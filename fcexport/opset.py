"""The closed set of operations a stored model may use: core ATen overloads that are pure tensor functions.

`torch.export` + `run_decompositions()` lowers any exportable model to the core ATen opset; fcexport keeps
the overloads of it that are functional (no argument is written to), deterministic (no random numbers)
and whose output shape follows from the input shapes and arguments (and `linear` and `adaptive_avg_pool2d`,
kept whole so that a Linear layer stays one op and a pool stays a pool, and the activations `hardswish`,
`hardsigmoid`, `silu` and `mish`, kept whole so that runtimes run each as one kernel), plus the integer arithmetic that
a dynamic batch size needs (`aten.sym_size.int` and Python's +, -, *, //, % on sizes) and tuple indexing.
Left out on purpose: random ops, in-place and `out=` ops, uninitialised memory (`empty`), strides read back
(`sym_stride`), data-dependent shapes (`nonzero`) and reading a tensor into Python
(`_local_scalar_dense`). `as_strided` stays (torch.export lowers some pooling to it): torch checks it
against its source's storage and fcexport bounds its result like any other. Every argument is checked against the op's schema before anything runs.
Every op has a cost model (COST_MODELS, below) that the shape check sums: the opset is its keys.
"""

from __future__ import annotations

import math
import operator

# ---- what each op costs ---------------------------------------------------------------------------
# A cost model takes the op's arguments by schema name (tensors, ints, lists: concrete on the meta device, or
# symbolic in the batch) and its result, and returns (multiply-accumulates, elements): the products a kernel
# computes and the values it reads, writes or visits. Views count at their full (materialised) size: the next op
# reads every value, and an expand of one value to 2^31 is 2^31 reads. An op with no cost model is not in the opset.


def numel(value) -> int:
    """Values in every tensor inside `value` (a tensor, or nested lists and tuples of them), at full size."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum((numel(v) for v in value), 0)
    return 0


def _read_and_written(a: dict, out) -> tuple[int, int]:
    """Elementwise ops, views, copies, reductions, indexing, padding: each value read and written once."""
    return 0, numel(list(a.values())) + numel(out)


def _shape_only(a: dict, out) -> tuple[int, int]:
    """Reading a tensor's shape touches none of its values."""
    return 0, 0


def _kernel(size, dims: int) -> int:
    """Values in a pooling window: `size` is one number for every spatial dim, or one per dim."""
    return math.prod(size) if len(size) > 1 else size[0] ** dims


def _pool(dims: int):
    """avg/max pooling: every output value visits its whole window (a 4096^2 window is 16.7M reads per value)."""
    def cost(a: dict, out) -> tuple[int, int]:
        first = out[0] if isinstance(out, (tuple, list)) else out
        return 0, _read_and_written(a, out)[1] + first.numel() * _kernel(a["kernel_size"], dims)
    return cost


def _adaptive_pool(dims: int):
    """Adaptive average pooling: an output value's window spans at most in // out + 2 inputs per spatial dim."""
    def cost(a: dict, out) -> tuple[int, int]:
        spatial = a["self"].shape[-dims:]
        window = math.prod(size // max(int(o), 1) + 2 for size, o in zip(spatial, out.shape[-dims:]))
        return 0, _read_and_written(a, out)[1] + out.numel() * window
    return cost


def _convolution(a: dict, out) -> tuple[int, int]:
    """Every output value (every input value, transposed) meets a whole kernel: in_channels/groups x kernel."""
    per_value = math.prod(a["weight"].shape[1:])
    scattered = a["input"] if a["transposed"] else out
    return _dense(scattered.numel() * per_value, a, out)


def _dense(macs: int, a: dict, out) -> tuple[int, int]:
    """A convolution's or matrix product's count: multiply-accumulates in float32 or float64 (BLAS and oneDNN take
    0.03-0.14 ns each); in any other dtype ATen runs a naive loop (int64 convolution 7.7 ns each, float16 1.6-2.4),
    so they count as SLOW values visited each."""
    import torch

    if out.dtype in (torch.float32, torch.float64):
        return macs, _read_and_written(a, out)[1]
    return 0, SLOW * macs + _read_and_written(a, out)[1]


def scratch_bytes(op: str, a: dict, out) -> int:
    """Bytes the CPU kernel of `op` allocates beside its result and frees before it returns (COST_MODELS count what ops
    read and write, not this), measured in plain torch: a convolution that oneDNN does not take (every float64 one, the
    reference's) lays its input out as im2col columns, in_channels/groups x kernel values for each output position
    (each input position, transposed): one 3x3 convolution of a 5.8 KB model.pt made 5.1 GB of them; topk keeps a
    (value, int64 index) queue of each row, 16 bytes a value; sort a stable-sort buffer, 8; cdist through its matrix
    product both operands again, twice."""
    if op == "aten.convolution.default":
        positions = (a["input"] if a["transposed"] else out).shape[2:]
        return out.shape[0] * math.prod(a["weight"].shape[1:]) * math.prod(positions) * a["input"].element_size()
    if op in ("aten.topk.default", "aten.sort.default"):
        return (16 if op == "aten.topk.default" else 8) * a["self"].numel()
    if op == "aten._cdist_forward.default":
        return 2 * (a["x1"].numel() + a["x2"].numel()) * a["x1"].element_size()
    return 0


def _matmul(left: str):
    """mm, bmm, addmm, linear: each output value is a dot product over the last dim of `left`."""
    def cost(a: dict, out) -> tuple[int, int]:
        return _dense(out.numel() * a[left].shape[-1], a, out)
    return cost


def _per_output(a_name: str):
    """cdist/pdist: each output value is a distance over the last dim of `a_name` (8192 points: 3.4e7 pairs), each
    term counted as SLOW values visited, not a multiply-accumulate: a p-norm takes a pow per term (10-29 ns here)."""
    def cost(a: dict, out) -> tuple[int, int]:
        return 0, SLOW * out.numel() * a[a_name].shape[-1] + _read_and_written(a, out)[1]
    return cost


# What one value costs where a contiguous float64 add costs 3 ns and a float32 one 0.2 (one thread, AMD EPYC, 2026-12-07:
# python /tmp/calib.py times each op over its opset count): 8-17 ns for float64 transcendentals and reductions
# along a dim, 10-40 for an argmin along a strided dim (the adversary's 65536 x 1024), 28 a p-norm term. These
# count SLOW times each value, so that MAX_ELEMENTS bounds the time of any mix alike.
SLOW = 16


def _slow(a: dict, out) -> tuple[int, int]:
    """An op whose kernel takes 8-40 ns a value (see SLOW): each value read and written counts SLOW times."""
    return 0, SLOW * _read_and_written(a, out)[1]


def _interpolate(taps: int):
    """Resampling: each output value reads at most `taps` inputs (nearest 1, bilinear 4, bicubic grid 16)."""
    def cost(a: dict, out) -> tuple[int, int]:
        return 0, _read_and_written(a, out)[1] + out.numel() * taps
    return cost


def _antialiased(taps: int):
    """Antialiased resampling (timm resizing a ViT's position embeddings): shrinking by a factor widens each output
    value's reach by it along each axis, so `taps` per value times both shrink factors."""
    def cost(a: dict, out) -> tuple[int, int]:
        size = a["self"].shape
        for axis, name in ((-2, "scales_h"), (-1, "scales_w")):  # torch's CPU kernel sizes its filter by a given scale
            scale = a.get(name)  # unchecked: one that disagrees with the sizes reads outside the input (a crash)
            if scale is not None and not (type(scale) in (int, float) and 0 < scale < 1 << 20
                                          and math.floor(size[axis] * scale) == out.shape[axis]):
                raise ValueError(f"{name} {scale!r} disagrees with the sizes {size[axis]} -> {out.shape[axis]} "
                                 "(torch's interpolate gives None or their ratio)")
        shrink = max(1.0, size[-2] / max(out.shape[-2], 1)) * max(1.0, size[-1] / max(out.shape[-1], 1))
        return 0, _read_and_written(a, out)[1] + int(out.numel() * taps * shrink)
    return cost


def _index_put(a: dict, out) -> tuple[int, int]:
    """index_put writes once per element of its indices' broadcast shape, times the values each index selects: the
    dims of `self` that no index covers (a boolean mask covers as many dims as it has and counts at its full size)."""
    import torch

    shapes, dims, selected = [], list(a["self"].shape), 1
    for index in a["indices"]:
        if index is None:  # a whole dim, as a slice
            selected *= dims.pop(0) if dims else 1
            continue
        mask = index.dtype in (torch.bool, torch.uint8)
        shapes.append((index.numel(),) if mask else tuple(index.shape))
        del dims[: index.dim() if mask else 1]
    selected *= math.prod(dims)
    writes = math.prod(torch.broadcast_shapes(*shapes)) * selected if shapes else 0
    return 0, _read_and_written(a, out)[1] + writes


def _sorting(a: dict, out) -> tuple[int, int]:
    """sort/topk: n log n comparisons, with log n at most 64."""
    return 0, _read_and_written(a, out)[1] + a["self"].numel() * 64


_PLAIN = """
_log_softmax.default _native_batch_norm_legit.no_stats _native_batch_norm_legit_no_training.default _softmax.default
_to_copy.default abs.default add.Scalar add.Tensor alias.default amax.default amin.default any.default any.dim
any.dims arange.start_step as_strided.default bitwise_and.Scalar bitwise_and.Tensor bitwise_not.default
bitwise_or.Scalar bitwise_or.Tensor bitwise_xor.Scalar bitwise_xor.Tensor cat.default ceil.default clamp.Tensor
clamp.default clone.default col2im.default constant_pad_nd.default copy.default cos.default diagonal.default
div.Scalar div.Scalar_mode div.Tensor div.Tensor_mode elu.default embedding.default eq.Scalar eq.Tensor erf.default
exp.default expand.default expm1.default fill.Scalar flip.default floor.default full.default
full_like.default gather.default ge.Scalar ge.Tensor gelu.default gt.Scalar gt.Tensor hardsigmoid.default
hardswish.default hardtanh.default index.Tensor index_select.default isinf.default isnan.default le.Scalar le.Tensor
leaky_relu.default log.default log10.default log1p.default log2.default logical_and.default logical_not.default
logical_or.default logical_xor.default lt.Scalar lt.Tensor masked_scatter.default maximum.default mish.default
mean.default mean.dim minimum.default mul.Scalar mul.Tensor native_group_norm.default native_layer_norm.default
ne.Scalar ne.Tensor neg.default permute.default pow.Scalar pow.Tensor_Scalar pow.Tensor_Tensor prod.default
prod.dim_int reciprocal.default reflection_pad1d.default reflection_pad2d.default reflection_pad3d.default
relu.default repeat.default replication_pad2d.default replication_pad3d.default
round.default rsqrt.default scalar_tensor.default scatter.src scatter.value scatter_add.default scatter_reduce.two
select.int select_scatter.default sigmoid.default sign.default silu.default sin.default slice.Tensor
slice_scatter.default split_with_sizes.default sqrt.default squeeze.dim squeeze.dims sub.Scalar sub.Tensor
sum.dim_IntList tanh.default trunc.default unfold.default unsqueeze.default view.default where.self
""".split()

_SLOW_OPS = """
acos.default acosh.default asin.default asinh.default atan.default atan2.default atanh.default cosh.default sinh.default
tan.default argmax.default argmin.default max.dim min.dim var.correction var.dim cumsum.default fmod.Scalar fmod.Tensor
remainder.Scalar remainder.Tensor
""".split()

COST_MODELS = {
    **{f"aten.{name}": _read_and_written for name in _PLAIN},
    **{f"aten.{name}": _slow for name in _SLOW_OPS},
    "aten.sym_size.int": _shape_only, "aten.sym_numel.default": _shape_only,
    "aten.avg_pool2d.default": _pool(2), "aten.max_pool2d_with_indices.default": _pool(2),
    "aten.avg_pool3d.default": _pool(3), "aten.max_pool3d_with_indices.default": _pool(3),
    "aten._adaptive_avg_pool2d.default": _adaptive_pool(2), "aten.adaptive_avg_pool2d.default": _adaptive_pool(2),
    "aten._adaptive_avg_pool3d.default": _adaptive_pool(3),
    "aten.convolution.default": _convolution,
    "aten.mm.default": _matmul("self"), "aten.bmm.default": _matmul("self"), "aten.addmm.default": _matmul("mat1"),
    "aten.linear.default": _matmul("weight"),
    "aten._cdist_forward.default": _per_output("x1"), "aten._pdist_forward.default": _per_output("self"),
    "aten.upsample_nearest2d.vec": _interpolate(1), "aten.upsample_bilinear2d.vec": _interpolate(4),
    "aten.grid_sampler_2d.default": _interpolate(16),
    "aten._upsample_bicubic2d_aa.default": _antialiased(16), "aten._upsample_bilinear2d_aa.default": _antialiased(4),
    "aten.upsample_bicubic2d.vec": _interpolate(16),
    "aten.index_put.default": _index_put,
    "aten.sort.default": _sorting, "aten.topk.default": _sorting,
}
ATEN_OPS = tuple(COST_MODELS)


# Integer arithmetic on sizes (a dynamic batch makes `view(x, [batch, 576])` need it): operands must be ints.
SIZE_OPS = {"sym.add": operator.add, "sym.sub": operator.sub, "sym.mul": operator.mul,
            "sym.floordiv": operator.floordiv, "sym.mod": operator.mod}
SIZE_OP_NAMES = {fn: name for name, fn in SIZE_OPS.items()}
GETITEM = "getitem"  # one output of an op that returns several (batch norm, max pool with indices, split)


def aten_op(name: str):
    """The torch.ops.aten overload for an allow-listed name such as 'aten.convolution.default'."""
    import torch

    _, packet, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, packet), overload)
