"""The closed set of operations a stored model may use: core ATen overloads that are pure tensor functions.

`torch.export` + `run_decompositions()` lowers any exportable model to the core ATen opset; fcexport keeps
the overloads of it that are functional (no argument is written to), deterministic (no random numbers)
and whose output shape follows from the input shapes and arguments (and `linear` and `adaptive_avg_pool2d`,
kept whole so that a Linear layer stays one op and a pool stays a pool), plus the integer arithmetic that
a dynamic batch size needs (`aten.sym_size.int` and Python's +, -, *, //, % on sizes) and tuple indexing.
Left out on purpose: random ops, in-place and `out=` ops, uninitialised memory (`empty`), strides read back
(`sym_stride`), data-dependent shapes (`nonzero`) and reading a tensor into Python
(`_local_scalar_dense`). `as_strided` stays (torch.export lowers some pooling to it): torch checks it
against its source's storage and fcexport bounds its result like any other. Every argument is checked against the op's schema before anything runs.
"""

from __future__ import annotations

import operator

ATEN_OPS = tuple(f"aten.{name}" for name in """
_adaptive_avg_pool2d.default _adaptive_avg_pool3d.default adaptive_avg_pool2d.default _cdist_forward.default _log_softmax.default
_native_batch_norm_legit.no_stats _native_batch_norm_legit_no_training.default _pdist_forward.default
_softmax.default _to_copy.default abs.default acos.default acosh.default add.Tensor add.Scalar addmm.default
alias.default amax.default amin.default any.default any.dim any.dims arange.start_step argmax.default
argmin.default as_strided.default asin.default asinh.default atan.default atan2.default atanh.default avg_pool2d.default
avg_pool3d.default bitwise_and.Tensor bitwise_and.Scalar bitwise_not.default bitwise_or.Tensor bitwise_or.Scalar
bitwise_xor.Tensor bitwise_xor.Scalar bmm.default cat.default ceil.default clamp.default clamp.Tensor
clone.default col2im.default copy.default constant_pad_nd.default convolution.default cos.default cosh.default cumsum.default
diagonal.default div.Tensor div.Scalar div.Tensor_mode div.Scalar_mode elu.default embedding.default eq.Tensor
eq.Scalar erf.default exp.default expand.default expm1.default fill.Scalar flip.default floor.default fmod.Tensor
fmod.Scalar full.default full_like.default gather.default ge.Tensor ge.Scalar gelu.default grid_sampler_2d.default
gt.Tensor gt.Scalar hardtanh.default index.Tensor index_put.default index_select.default isinf.default
isnan.default le.Tensor le.Scalar leaky_relu.default linear.default log.default log10.default log1p.default log2.default
logical_and.default logical_not.default logical_or.default logical_xor.default lt.Tensor lt.Scalar
masked_scatter.default max.dim max_pool2d_with_indices.default max_pool3d_with_indices.default maximum.default
mean.default mean.dim min.dim minimum.default mm.default mul.Tensor mul.Scalar native_group_norm.default
native_layer_norm.default ne.Tensor ne.Scalar neg.default permute.default pow.Tensor_Tensor pow.Tensor_Scalar
pow.Scalar prod.default prod.dim_int reciprocal.default reflection_pad1d.default reflection_pad2d.default
reflection_pad3d.default relu.default remainder.Tensor remainder.Scalar repeat.default replication_pad2d.default
replication_pad3d.default round.default rsqrt.default scalar_tensor.default scatter.value scatter.src
scatter_add.default scatter_reduce.two select.int select_scatter.default sigmoid.default sign.default sin.default
sinh.default slice.Tensor slice_scatter.default sort.default split_with_sizes.default sqrt.default squeeze.dim
squeeze.dims sub.Tensor sub.Scalar sum.dim_IntList sym_numel.default sym_size.int tan.default tanh.default
topk.default trunc.default unsqueeze.default upsample_bilinear2d.vec upsample_nearest2d.vec var.dim
var.correction view.default where.self
""".split())

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
