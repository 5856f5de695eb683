"""The stored program's bound check (issue 30, items 1-3): it runs nothing real, it counts the work of every op,
and its bounds hold at every batch size. Hostile model.pt files run in a real `fcx` process under RLIMIT_AS and
RLIMIT_CPU (never a wall-clock limit): exit 2, one line, nothing written."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_png
from torch.utils._python_dispatch import TorchDispatchMode

from fcexport.checkpoint import save_program
from fcexport.errors import FcxError
from fcexport.opset import ATEN_OPS, COST_MODELS, aten_op
from fcexport.program import INPUT, MAX_NODES, Node, Program, Ref, check_program, check_shapes
from fcexport.spec import ModelSpec

ROOT = Path(__file__).parents[1]
ADDRESS_SPACE = 6 << 30  # a CUDA build of torch maps ~4 GB of address space just to load; the rest is 1.5 GB
PEAK_RSS = 1536 << 20  # bytes one command may really use, imports included
CPU_SECONDS = 30
LARGEST_CPU_SECONDS = 120  # the 10,000-node check took 35-39 s of CPU on a shared AVX2 EPYC core (2026-12-07): over 30
# Runs `fcx ARGS` and, as it exits, writes its peak resident memory (KiB) to the file named first.
LAUNCHER = """
import atexit, resource, runpy, sys
peak_file = sys.argv[1]
sys.argv = ["fcx", *sys.argv[2:]]
atexit.register(lambda: open(peak_file, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
runpy.run_module("cli.main", run_name="__main__")
"""
SHAPE = (1, 8, 8)


def fcx_bounded(tmp_path: Path, *args, cpu_seconds: int = CPU_SECONDS) -> subprocess.CompletedProcess:
    """`fcx ARGS` under RLIMIT_AS and RLIMIT_CPU; fails the test if it really used more than 1.5 GB."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))

    peak_file = tmp_path / "peak"
    result = subprocess.run([sys.executable, "-c", LAUNCHER, str(peak_file), *map(str, args)], capture_output=True, text=True,
                            preexec_fn=limit, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    peak = int(peak_file.read_text()) * 1024 if peak_file.is_file() else 0
    assert peak < PEAK_RSS, f"fcx {args}: peak memory {peak >> 20} MiB"
    return result


def classifier(*hostile: Node) -> Program:
    """`hostile` nodes, then an honest linear classifier of 8x8 images into 10 classes."""
    logits = (Node("n", "aten.sym_size.int", (Ref(INPUT), 0)), Node("flat", "aten.view.default", (Ref(INPUT), (Ref("n"), 64))),
              Node("logits", "aten.linear.default", (Ref("flat"), Ref("fc.weight"), Ref("fc.bias"))))
    return Program((*hostile, *logits), "logits", {"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)})


def full(name: str, size: tuple, **kwargs) -> Node:
    """aten.full with no device argument: it must still make a meta tensor inside the check."""
    return Node(name, "aten.full.default", (size, 1.0), tuple(kwargs.items()))


def view_of(name: str, size: tuple) -> tuple[Node, Node]:
    """A one-value tensor expanded to `size`: 4 bytes of memory, `size` values for whoever reads it."""
    return full(f"{name}_one", (1,) * len(size)), Node(name, "aten.expand.default", (Ref(f"{name}_one"), size))


N_SQUARED = (Node("bn", "aten.sym_size.int", (Ref(INPUT), 0)), Node("bn2", "sym.mul", (Ref("bn"), Ref("bn"))),
             full("grows", (Ref("bn2"), 40000)))
ATTACKS = {
    "200 sums over a 2^31-value expanded full": (
        (*view_of("big", (1 << 16, 1 << 15)), *(Node(f"s{i}", "aten.sum.dim_IntList", (Ref("big"), (0, 1))) for i in range(200))),
        r"makes a tensor of shape \(65536, 32768\)"),
    "cdist over 8192x8192 views": (
        (*view_of("v", (1, 8192, 8192)), Node("d", "aten._cdist_forward.default", (Ref("v"), Ref("v"), 2.0, None))),
        "more memory or work per image"),
    "avg_pool2d with a 4096 kernel over an 8192^2 view": (
        (*view_of("v", (1, 1, 8192, 8192)), Node("p", "aten.avg_pool2d.default", (Ref("v"), (4096, 4096), (1, 1)))),
        "more memory or work per image"),
    "pdist over a contiguous 8192x8192": (
        (full("v", (8192, 8192)), Node("d", "aten._pdist_forward.default", (Ref("v"), 2.0))),
        "more memory or work per image"),
    "1x1 convolution over a 2^30-value expanded view": (
        (*view_of("v", (1, 1 << 14, 256, 256)), full("w", (1, 1 << 14, 1, 1)),
         Node("c", "aten.convolution.default", (Ref("v"), Ref("w"), None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1))),
        r"makes a tensor of shape \(1, 16384, 256, 256\)"),
    "overlapping windows: unfold(2^16 values, size 2^15, step 1)": (  # Tensor.unfold, as timm's HaloAttn takes windows
        (full("row", (1, 1 << 16)), Node("w", "aten.unfold.default", (Ref("row"), 1, 1 << 15, 1)),
         Node("s", "aten.sum.dim_IntList", (Ref("w"), (1, 2)))),
        r"node 'w' .*makes a tensor of shape \(1, 32769, 32768\)"),
    "full([N * N, 40000])": (N_SQUARED, r"node 'bn2' .*computes a size of N\*\*2 for a batch of N"),
    # torch's CPU kernel sizes its filter by the scales, unchecked: 0.05 for 64 -> 63 read outside the input (SIGSEGV)
    "antialiased bicubic whose scales disagree with its sizes": (
        (full("v", (1, 1, 64, 64)), Node("up", "aten._upsample_bicubic2d_aa.default", (Ref("v"), (63, 63), False, 0.05, 0.05))),
        r"node 'up' .*scales_h 0.05 disagrees with the sizes 64 -> 63"),
    # indices (2^19, 1) and (1, 2^19) broadcast to 2^38 writes into an 8x8 tensor (counted as 2e6 before: hours of CPU)
    "index_put with broadcast indices": (
        (full("t", (8, 8)), full("i", (1 << 19, 1), dtype=torch.int64), full("j", (1, 1 << 19), dtype=torch.int64),
         full("one", ()), Node("p", "aten.index_put.default", (Ref("t"), (Ref("i"), Ref("j")), Ref("one"), False))),
        r"more memory or work per image .*at node 'p'"),
    # 2.7 s of CPU each (40 ns a value: the reduced dim is strided), counted 6.7e7 values each before (1,450 fit 1e11)
    "24 argmins along the strided dim of a 256 MiB tensor": (
        (full("c", (65536, 1024)), *(Node(f"r{i}", "aten.argmin.default", (Ref("c"), 0)) for i in range(24))),
        r"node 'r18' .*values read, written or visited, at most 2e\+10"),
    # ATen has no BLAS or oneDNN path for integers: 7.7 ns a multiply-accumulate, 41 of these (9.9e10) took 13 min of CPU
    "an int64 convolution of 2.4e9 multiply-accumulates": (
        (full("x0", (1, 256, 64, 64), dtype=torch.int64), full("w", (256, 256, 3, 3), dtype=torch.int64),
         Node("c", "aten.convolution.default", (Ref("x0"), Ref("w"), None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1))),
        r"node 'c' .*values read, written or visited, at most 2e\+10"),
    # 20,480 input values; torch's slow_conv2d lays them out as 20,480 x 9 x 81 x 81 im2col columns: 4.6 GB (5.1 GB RSS)
    "a 3x3 convolution whose im2col scratch is 4.6 GB": (
        (full("v", (1, 20480, 1, 1)), full("w", (1, 20480, 3, 3)),
         Node("c", "aten.convolution.default", (Ref("v"), Ref("w"), None, (1, 1), (40, 40), (1, 1), False, (0, 0), 1))),
        r"node 'c' .*needs 4,602,208,900 bytes alive at once for one image, its kernel's scratch included"),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_each_attack_is_refused_by_the_check_naming_the_node(name):
    nodes, expected = ATTACKS[name]
    program = classifier(*nodes)
    check_program(program, "test")
    with pytest.raises(FcxError, match=expected):
        check_shapes(program, SHAPE, "test")


def write_model(folder: Path, program: Program) -> Path:
    spec = ModelSpec(input_shape=SHAPE, class_names=tuple(str(i) for i in range(10)))
    folder.mkdir()
    save_program(program, spec, folder / "model.pt")
    return folder / "model.pt"


@pytest.mark.parametrize("name, command", [("200 sums over a 2^31-value expanded full", "inspect"),
                                           ("pdist over a contiguous 8192x8192", "inspect"),
                                           ("avg_pool2d with a 4096 kernel over an 8192^2 view", "predict"),
                                           ("1x1 convolution over a 2^30-value expanded view", "predict"),
                                           ("overlapping windows: unfold(2^16 values, size 2^15, step 1)", "predict"),
                                           ("full([N * N, 40000])", "fuse-bn"),
                                           ("antialiased bicubic whose scales disagree with its sizes", "predict"),
                                           ("index_put with broadcast indices", "predict"),
                                           ("a 3x3 convolution whose im2col scratch is 4.6 GB", "predict"),
                                           ("24 argmins along the strided dim of a 256 MiB tensor", "predict")])
def test_hostile_model_pt_is_exit_2_one_line_nothing_written(tmp_path, name, command):
    model = write_model(tmp_path / "in", classifier(*ATTACKS[name][0]))
    out = tmp_path / "out"
    args = {"inspect": ["inspect", model],
            "predict": ["predict", save_png(tmp_path / "x.png", np.zeros((8, 8), np.uint8)), "--model", model],
            "fuse-bn": ["fuse-bn", model, "--verify", "--out", out / "model.fused.pt"]}[command]
    result = fcx_bounded(tmp_path, *args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(ATTACKS[name][1], lines[0]), lines[0]  # refused by the check, not by a failed allocation
    assert not out.exists() and sorted(p.name for p in model.parent.iterdir()) == ["model.pt"]


def test_a_batch_dependent_size_that_grows_linearly_passes():
    doubled = (Node("bn", "aten.sym_size.int", (Ref(INPUT), 0)), Node("b2", "sym.mul", (Ref("bn"), 2)),
               Node("b3", "sym.add", (Ref("b2"), 3)), full("rows", (Ref("b3"), 4000)))
    shapes = check_shapes(classifier(*doubled), SHAPE, "test")
    assert shapes.of["rows"] == (5, 4000) and shapes.of["logits"] == (1, 10)


def test_an_arange_of_a_computed_size_is_bounded_like_any_size():
    """transformers' masks call torch.arange(batch size): a computed integer may be a factory's number, and the same
    checks bound what it makes (linear in the batch passes; N * N, or too many values for one image, is refused)."""
    batch = Node("bn", "aten.sym_size.int", (Ref(INPUT), 0))
    linear = (batch, Node("b3", "sym.mul", (Ref("bn"), 3)), Node("rows", "aten.arange.start_step", (0, Ref("b3"), 1)))
    assert check_shapes(classifier(*linear), SHAPE, "test").of["rows"] == (3,)
    squared = (batch, Node("bn2", "sym.mul", (Ref("bn"), Ref("bn"))), Node("rows", "aten.arange.start_step", (0, Ref("bn2"))))
    check_program(classifier(*squared), "test")
    with pytest.raises(FcxError, match=r"node 'bn2' .*computes a size of N\*\*2 for a batch of N"):
        check_shapes(classifier(*squared), SHAPE, "test")
    huge = (batch, Node("many", "sym.mul", (Ref("bn"), 1 << 40)), Node("rows", "aten.arange.start_step", (0, Ref("many"))))
    with pytest.raises(FcxError, match="node 'rows' .*makes a tensor of shape"):
        check_shapes(classifier(*huge), SHAPE, "test")


@pytest.mark.parametrize("size_op", ["sym.mod", "sym.floordiv"])
def test_sizes_that_are_not_linear_in_the_batch_are_refused(size_op):
    nodes = (Node("bn", "aten.sym_size.int", (Ref(INPUT), 0)), Node("odd", size_op, (Ref("bn"), 7)), full("rows", (Ref("odd"), 4)))
    with pytest.raises(FcxError, match="node 'odd' .*computes a size of .*N.* for a batch of N"):
        check_shapes(classifier(*nodes), SHAPE, "test")


def test_a_program_that_runs_at_one_batch_size_only_is_refused():
    nodes = (full("two", (2, 64)), Node("sum", "aten.add.Tensor", (Ref("two"), Ref("flat0"))))
    flat = Node("flat0", "aten.view.default", (Ref(INPUT), (-1, 64)))
    with pytest.raises(FcxError, match="node 'sum' .*works for one batch size only"):
        check_shapes(classifier(flat, *nodes), SHAPE, "test")


def test_every_op_has_a_cost_model():
    assert set(ATEN_OPS) == set(COST_MODELS)


class RealTensors(TorchDispatchMode):
    """Records every op that returns a tensor with real memory (not meta, not fake)."""

    def __init__(self):
        super().__init__()
        self.real: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import is_fake

        result = func(*args, **(kwargs or {}))
        flat = result if isinstance(result, (tuple, list)) else [result]
        self.real += [str(func) for t in flat if isinstance(t, torch.Tensor) and not (t.is_meta or is_fake(t))]
        return result


def example_arguments(op: str) -> tuple:
    """Arguments of each parameter's type for `op`, positionally: tensors are the input, numbers small."""
    by_type = {"Tensor": Ref(INPUT), "Optional[Tensor]": None, "List[Tensor]": (Ref(INPUT), Ref(INPUT)),
               "List[Optional[Tensor]]": (None, Ref("index")), "int": 1, "SymInt": 1, "List[int]": (1, 1),
               "float": 1.0, "number": 1, "bool": False, "str": "none"}
    args = []
    for argument in aten_op(op)._schema.arguments:
        if argument.kwarg_only:
            break
        kind = str(argument.real_type)
        if argument.has_default_value() and kind not in by_type:
            break
        args.append(by_type.get(kind, None))
    return tuple(args)


@pytest.mark.parametrize("op", ATEN_OPS)
def test_the_check_allocates_no_real_tensor_for_any_op(op):
    node = Node("op", op, example_arguments(op))
    program = Program((node, Node("out", "aten.view.default", (Ref(INPUT), (-1, 64)))), "out", {"index": torch.zeros(2, dtype=torch.int64)})
    with RealTensors() as watch:
        try:
            check_shapes(program, SHAPE, "test")
        except FcxError:
            pass  # arguments of the right types need not make sense together: refusing is fine, allocating is not
    assert watch.real == []


def test_a_tensor_small_at_batch_1_that_grows_fast_per_image_is_refused():
    rows = (Node("bn", "aten.sym_size.int", (Ref(INPUT), 0)), Node("many", "sym.mul", (Ref("bn"), 70_000_000)),
            Node("rows", "sym.sub", (Ref("many"), 69_999_999)), full("grows", (Ref("rows"), 1)))  # 1 value at batch 1
    with pytest.raises(FcxError, match=r"node 'grows' .*280,000,000 more bytes for each image of the batch"):
        check_shapes(classifier(*rows), SHAPE, "test")


def test_the_largest_program_is_checked_within_the_cpu_bound(tmp_path):
    """10,000 views (the node limit; views cost the symbolic run most): checked, not killed by RLIMIT_CPU."""
    views = tuple(Node(f"v{i}", "aten.view.default", (Ref(f"v{i - 1}" if i else INPUT), (-1, 64) if i % 2 == 0 else (-1, 1, 8, 8)))
                  for i in range(MAX_NODES - 3))
    result = fcx_bounded(tmp_path, "inspect", write_model(tmp_path / "in", classifier(*views)), cpu_seconds=LARGEST_CPU_SECONDS)
    assert result.returncode == 0, result.stderr[-2000:]


def test_honest_antialiased_scales_and_index_put_pass():
    """What torch's interpolate writes (scales that are the sizes' ratio) and indices that do not broadcast."""
    honest = (full("v", (1, 1, 64, 64)), Node("up", "aten._upsample_bicubic2d_aa.default", (Ref("v"), (32, 32), False, 0.5, 0.5)),
              full("t", (8, 8)), full("i", (8,), dtype=torch.int64), full("one", ()),
              Node("p", "aten.index_put.default", (Ref("t"), (None, Ref("i")), Ref("one"), True)))
    check_shapes(classifier(*honest), SHAPE, "test")
    index = {"self": torch.empty(4, 8, 16, device="meta"), "values": torch.empty((), device="meta"),
             "indices": (None, torch.empty(32, 1, dtype=torch.int64, device="meta"), torch.empty(1, 64, dtype=torch.int64, device="meta"))}
    assert COST_MODELS["aten.index_put.default"](index, index["self"])[1] >= 4 * 32 * 64  # the broadcast grid, per row


def test_the_check_refuses_more_listed_operands_than_it_can_afford():
    """cat of 4,096 operands costs about 2 s to check (meta and symbolic): 20 of them took 45 s in `fcx inspect`."""
    cats = tuple(Node(f"c{i}", "aten.cat.default", ((Ref(INPUT),) * 4096, 1)) for i in range(5))
    with pytest.raises(FcxError, match="lists hold 20,48[01] values of other nodes"):
        check_program(classifier(*cats), "test")


def test_factories_may_not_pin_memory():
    """Pinned memory starts CUDA on a machine with a GPU; the meta check ignores the flag."""
    with pytest.raises(FcxError, match="node 'pinned' .*'pin_memory' must be false"):
        check_program(classifier(full("pinned", (8, 8), pin_memory=True)), "test")


def test_arguments_given_by_keyword_are_read_by_position(tmp_path):
    """A BatchNorm's and a Linear's arguments by keyword passed the schema check, then crashed the code that reads them
    by position (inspect, fuse-bn: exit 3). The reader binds them by position, as torch.export writes them."""
    from fcexport.checkpoint import read_model

    bn = Node("bn", "aten._native_batch_norm_legit_no_training.default", (Ref(INPUT),),
              (("weight", Ref("g")), ("bias", Ref("b")), ("running_mean", Ref("m")), ("running_var", Ref("s")),
               ("momentum", 0.1), ("eps", 1e-5)))
    program = Program((bn, Node("y", "getitem", (Ref("bn"), 0)), Node("n", "aten.sym_size.int", (Ref(INPUT), 0)),
                       Node("flat", "aten.view.default", (Ref("y"), (Ref("n"), 64))),
                       Node("logits", "aten.linear.default", (Ref("flat"),), (("weight", Ref("fc.weight")), ("bias", Ref("fc.bias"))))),
                      "logits", {"fc.weight": torch.randn(10, 64), "fc.bias": torch.zeros(10), "g": torch.ones(1),
                                 "b": torch.zeros(1), "m": torch.zeros(1), "s": torch.ones(1)})
    model = write_model(tmp_path / "in", program)
    nodes = {node.name: node for node in read_model(model).program.nodes}
    assert len(nodes["bn"].args) == 7 and not nodes["bn"].kwargs and nodes["logits"].args[1] == Ref("fc.weight")
    for args in (["inspect", model], ["fuse-bn", model, "--verify", "--out", tmp_path / "out" / "model.fused.pt"]):
        result = fcx_bounded(tmp_path, *args)
        assert result.returncode == 0, result.stderr[-2000:]


def wide_inside(values: int) -> Program:
    """An 8x8 image made (N, 64, values) inside (a view and its copy: 512 * values bytes alive an image at once), summed
    back into a linear classifier: small at its input, large inside."""
    nodes = (Node("bn", "aten.sym_size.int", (Ref(INPUT), 0)), Node("f", "aten.view.default", (Ref(INPUT), (Ref("bn"), 64, 1))),
             Node("e", "aten.expand.default", (Ref("f"), (Ref("bn"), 64, values))), Node("c", "aten.clone.default", (Ref("e"),)),
             Node("s", "aten.sum.dim_IntList", (Ref("c"), (2,))),
             Node("logits", "aten.linear.default", (Ref("s"), Ref("fc.weight"), Ref("fc.bias"))))
    return Program(nodes, "logits", {"fc.weight": torch.randn(10, 64), "fc.bias": torch.zeros(10)})


def test_the_check_finds_what_one_image_keeps_alive_and_model_pt_cannot_claim_less(tmp_path):
    """Shapes.peak counts the values alive at once (not the sum of all, not the freed); a model.pt whose spec says it
    keeps 1 byte alive is read with what its program keeps, which sizes every call's batch (targets.chunk_size)."""
    from fcexport.checkpoint import read_model
    from fcexport.targets import chunk_size

    values = 1 << 16
    peak = check_shapes(wide_inside(values), SHAPE, "test").peak
    assert 512 * values <= peak < 512 * values + 4096
    spec = ModelSpec(input_shape=SHAPE, class_names=tuple(str(i) for i in range(10)), peak_bytes=1)
    (tmp_path / "in").mkdir()
    save_program(wide_inside(values), spec, tmp_path / "in" / "model.pt")
    stored = read_model(tmp_path / "in" / "model.pt")
    assert stored.spec.peak_bytes == peak == stored.shapes.peak
    # just over 32 MiB an image (the clone, the expanded view and the input it shares storage with): 7 fit 256 MiB
    assert chunk_size(SHAPE) == 256 and chunk_size(SHAPE, peak) == 4 and chunk_size(SHAPE, peak, itemsize=8) == 2


def test_a_model_small_at_its_input_and_large_inside_is_run_in_small_batches(tmp_path):
    """128 MiB alive for each 8x8 image: 16 images in one call took 2 GiB (batches were sized by the input alone, up
    to 256 images); now two images a call, within the memory one command may use."""
    model = write_model(tmp_path / "in", wide_inside(1 << 18))
    pngs = [save_png(tmp_path / f"x{i}.png", np.full((8, 8), 16 * i, np.uint8)) for i in range(16)]
    result = fcx_bounded(tmp_path, "predict", *pngs, "--model", model, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(json.loads(result.stdout)) == 16


def test_an_onnx_export_fcexport_would_refuse_to_load_is_never_published(tmp_path):
    """index_put with broadcast indices (2^15 x 1 and 1 x 2^15) into 8x8 is within the program's bounds, but torch's
    exporter writes the broadcast as an Expand of 2^30 values: model.onnx and its manifest were published, and only
    export's own check then refused to load them (exit 2 beside a file no fcx command would open)."""
    nodes = (full("t", (8, 8)), full("i1", (1 << 15, 1), dtype=torch.int64), full("i2", (1, 1 << 15), dtype=torch.int64),
             full("v", ()), Node("ip", "aten.index_put.default", (Ref("t"), (Ref("i1"), Ref("i2")), Ref("v"), False)),
             Node("ipv", "aten.view.default", (Ref("ip"), (1, 64))), Node("bn", "aten.sym_size.int", (Ref(INPUT), 0)),
             Node("flat0", "aten.view.default", (Ref(INPUT), (Ref("bn"), 64))), Node("flat", "aten.add.Tensor", (Ref("flat0"), Ref("ipv"))),
             Node("logits", "aten.linear.default", (Ref("flat"), Ref("fc.weight"), Ref("fc.bias"))))
    model = write_model(tmp_path / "in", Program(nodes, "logits", {"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)}))
    result = fcx_bounded(tmp_path, "export", model, "--artifacts", tmp_path / "out", "--format", "onnx")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert re.search(r"would refuse to load .*makes [\d,]+ values for one image", lines[0]), lines[0]
    assert not any((tmp_path / "out").glob("*"))  # neither model.onnx nor a manifest vouching for it


def test_a_view_keeps_its_base_alive():
    """40 clones of 1 MiB an image, each sliced to 64 values and the slices kept to the end by one cat: each slice holds
    its clone's storage, so 40 MiB are alive at once (counted as 2 MiB when a clone was freed after its last reader)."""
    nodes = [Node("bn", "aten.sym_size.int", (Ref(INPUT), 0)), Node("f", "aten.view.default", (Ref(INPUT), (Ref("bn"), 64, 1))),
             Node("e", "aten.expand.default", (Ref("f"), (Ref("bn"), 64, 4096)))]
    for i in range(40):
        nodes += [Node(f"c{i}", "aten.clone.default", (Ref("e"),)), Node(f"s{i}", "aten.slice.Tensor", (Ref(f"c{i}"), 2, 0, 1))]
    nodes += [Node("cat", "aten.cat.default", (tuple(Ref(f"s{i}") for i in range(40)), 2)),
              Node("s", "aten.sum.dim_IntList", (Ref("cat"), (2,))),
              Node("logits", "aten.linear.default", (Ref("s"), Ref("fc.weight"), Ref("fc.bias")))]
    program = Program(tuple(nodes), "logits", {"fc.weight": torch.zeros(10, 64), "fc.bias": torch.zeros(10)})
    assert check_shapes(program, SHAPE, "test").peak >= 40 * (1 << 20)


def test_topk_and_sort_count_the_buffers_their_kernels_keep():
    """topk keeps a (value, int64 index) queue of the whole row, 16 bytes a value (64M values: 1 GiB beside a 256 MiB
    input, measured); the check counts it while topk runs."""
    nodes = (full("t", (1, 1 << 22)), Node("k", "aten.topk.default", (Ref("t"), 1, 1)), Node("v", "getitem", (Ref("k"), 0)))
    assert check_shapes(classifier(*nodes), SHAPE, "test").peak >= 16 * (1 << 22) + 4 * (1 << 22)


def test_an_image_that_outlasts_the_cpu_backstop_stops_naming_the_node(monkeypatch):
    """Exp to a denormal costs 38 ns a value where the counts assume about 1: the interpreter stops an input once it has
    taken CPU_SECONDS_PER_IMAGE of CPU time (made tiny here), naming the node it reached; no wall clock involved."""
    import fcexport.program as program

    denormal = (full("t", (1 << 22,)), Node("low", "aten.mul.Scalar", (Ref("t"), -100.0)),
                *(Node(f"e{i}", "aten.exp.default", (Ref("low"),)) for i in range(400)))
    assert program.ProgramModule(classifier(*denormal[:4]))(torch.zeros(2, *SHAPE)).shape == (2, 10)  # 0.5 s at most
    monkeypatch.setattr(program, "CPU_SECONDS_PER_IMAGE", 0.5)
    with pytest.raises(FcxError, match=r"node 'e\d+' .*more than 0.5 s of CPU time each"):
        program.ProgramModule(classifier(*denormal))(torch.zeros(1, *SHAPE))


def test_float64_remainders_count_as_slow_values():
    """fmod and remainder of float64 take up to 40 ns a value (1e300 by 1e-300): counted SLOW times each, like argmin."""
    from fcexport.opset import SLOW

    x = torch.ones(1000, dtype=torch.float64)
    for op in ("aten.fmod.Tensor", "aten.remainder.Tensor"):
        macs, elements = COST_MODELS[op]({"self": x, "other": x}, aten_op(op)(x, x))
        assert elements >= SLOW * 1000, op
