"""The stored program: capture, JSON round trip, checks, meta-device bounds, the interpreter."""

import json
import warnings

import pytest
import torch
from torch import nn

from fcexport.errors import FcxError
from fcexport.program import (INPUT, Node, Program, ProgramModule, Ref, capture, check_program, check_shapes, fingerprint,
                              from_data, to_data, with_input_normalization)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


def test_capture_round_trips_through_json_and_runs_like_the_module():
    model = small_net()
    program = capture(model, (3, 8, 8))
    data = json.loads(json.dumps(to_data(program)))  # plain JSON, nothing else
    again = from_data(data, dict(program.tensors), "test")
    assert fingerprint(again) == fingerprint(program)
    x = torch.rand(5, 3, 8, 8)  # another batch size than the export's: the batch is dynamic
    torch.testing.assert_close(ProgramModule(again)(x), model(x))
    layers = {n.layer: n.layer_type for n in program.nodes if n.layer}
    assert layers["0"] == "Conv2d" and layers["1"] == "BatchNorm2d" and layers["4"] == "Linear"
    assert set(program.tensors) >= {"0.weight", "1.running_mean", "4.weight"}


def test_float64_run_widens_every_op():
    program = capture(small_net(), (3, 8, 8))
    out = ProgramModule(program).double()(torch.rand(2, 3, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("per, kernel, stride, padding, dilation, bias", [
    (1, (7, 7), (1, 1), (3, 3), (1, 1), True), (2, (7, 7), (2, 2), (2, 2), (1, 1), False),
    (3, (7, 9), (2, 1), (4, 3), (2, 1), True), (1, (7, 7), (3, 3), (0, 0), (1, 1), False)])
def test_a_large_depthwise_convolution_in_float64_gives_torchs_sums_in_another_order(per, kernel, stride, padding, dilation, bias):
    """The reference's depthwise taps (program._depthwise_float64): the same answers as torch's float64 kernel to
    float64 rounding, whatever the stride, padding, dilation, depth multiplier and bias; run through a program too."""
    from fcexport.program import _depthwise_float64

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 6, 23, 19, dtype=torch.float64, generator=generator)
    weight = torch.randn(6 * per, 1, *kernel, dtype=torch.float64, generator=generator)
    b = torch.randn(6 * per, dtype=torch.float64, generator=generator) if bias else None
    args = (x, weight, b, list(stride), list(padding), list(dilation), False, [0, 0], 6)
    expected = torch.ops.aten.convolution.default(*args)
    got = _depthwise_float64(*args)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    net = nn.Sequential(nn.Conv2d(6, 6 * per, kernel, stride, padding, dilation, groups=6, bias=bias), nn.ReLU())
    program = capture(net, (6, 23, 19))
    with torch.no_grad():
        torch.testing.assert_close(ProgramModule(program).double()(x), net.double()(x), rtol=1e-13, atol=1e-13)


def test_indexing_by_arange_of_the_batch_size_runs_at_every_batch_and_traces_with_a_dynamic_batch():
    """`y[torch.arange(x.shape[0]), idx]` and `torch.full((), True)` (transformers' masks, HF Perceiver): stored,
    run, and traced for model.ts without fixing the batch size."""
    class Pick(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 4)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            rows = torch.arange(x.shape[0])
            keep = torch.full((), True)  # a bool fill value, which TorchScript's full does not take as such
            return torch.where(keep, y + y[rows, rows % 4].unsqueeze(1), y)

    model = Pick().eval()
    program = capture(model, (3, 2, 2))
    assert any(n.op == "aten.arange.start_step" and isinstance(n.args[1], Ref) for n in program.nodes)
    assert any(n.op == "aten.full.default" and n.args[1] is True for n in program.nodes)
    module = ProgramModule(program)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; fcexport's model.ts is traced the same way
        traced = torch.jit.trace(module, torch.rand(2, 3, 2, 2))
    with torch.no_grad():
        for batch in (1, 5):
            x = torch.rand(batch, 3, 2, 2)
            torch.testing.assert_close(module(x), model(x))
            torch.testing.assert_close(traced(x), model(x))


def test_a_model_whose_first_linear_reads_the_images_last_axis_is_told_it_takes_patches_not_images():
    """Siglip2's classifier takes patches (N, L, 3*16*16): the misfit says so instead of suggesting another C,H,W."""
    from fcexport.program import input_misfit

    said = input_misfit(nn.Sequential(nn.Linear(768, 4)), (3, 224, 224))
    assert "reads the image's last axis (224 values; it takes 768)" in said and "patches or a sequence" in said
    assert "C*H*W = 64" in input_misfit(nn.Sequential(nn.Flatten(), nn.Linear(64, 4)), (1, 9, 9))


class _Blocks(nn.Module):
    """Takes only sides that are a multiple of 8, as timm's halo attention does (an assert in the model's code)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pretrained_cfg = {"input_size": (3, 32, 32)}

    def forward(self, x):
        assert x.shape[-1] % 8 == 0, "side must be a multiple of 8"
        return self.conv(x).mean((2, 3))


def test_a_model_that_fails_on_the_input_shape_is_told_where_in_its_code_not_what_torch_export_saw():
    with pytest.raises(FcxError) as caught:
        capture(_Blocks().eval(), (3, 20, 20))
    said = str(caught.value)
    assert "the model itself fails on an input of shape 3,20,20" in said and "side must be a multiple of 8" in said
    assert f"test_program.py:{_Blocks.forward.__code__.co_firstlineno + 1}" in said and "pretrained_cfg says 3,32,32" in said
    capture(_Blocks().eval(), (3, 24, 24))  # a side it takes


def test_tensor_names_that_clash_with_module_attributes_still_run():
    program = Program(
        (Node("relu", "aten.relu.default", (Ref("training"),)), Node("out", "aten.add.Tensor", (Ref(INPUT), Ref("relu")))),
        "out", {"training": torch.ones(3), "_forward_hooks": torch.zeros(1)})
    check_program(program, "test")
    module = ProgramModule(program)
    assert module.training is True and isinstance(module._forward_hooks, dict)  # nn.Module's own attributes intact
    torch.testing.assert_close(module(torch.zeros(2, 3)), torch.ones(2, 3))


def test_normalisation_goes_in_front_and_keeps_shape_readers_on_the_input():
    program = with_input_normalization(capture(small_net(), (3, 8, 8)), [0.5, 0.4, 0.3], [0.2, 0.3, 0.25])
    assert [n.layer_type for n in program.nodes[:2]] == ["Normalize", "Normalize"]
    sizes = [n for n in program.nodes if n.op == "aten.sym_size.int"]
    assert all(n.args[0] == Ref(INPUT) for n in sizes)


@pytest.mark.parametrize("node, expected", [
    (Node("a", "aten.empty.memory_format", ((2, 2),)), "op is not in fcexport's opset"),
    (Node("a", "aten.relu.default", (Ref("nowhere"),)), "uses 'nowhere' before it is defined"),
    (Node("a b", "aten.relu.default", (Ref(INPUT),)), "invalid or repeated node name"),
    (Node("a", "aten.view.default", (Ref(INPUT), ("2", 3))), "argument 'size' must be List[int]"),
    (Node("a", "aten.relu.default", (Ref(INPUT),), (("inplace", True),)), "unknown or repeated argument 'inplace'"),
    (Node("a", "sym.mul", ((Ref(INPUT),), 300000000)), "size arithmetic takes two integers"),
    (Node("a", "getitem", (Ref(INPUT), 0)), "index 0 is out of range"),
])
def test_static_checks_refuse_with_the_node(node, expected):
    with pytest.raises(FcxError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        check_program(Program((node,), "a", {}), "test")


def test_meta_run_bounds_every_intermediate_before_anything_is_allocated():
    huge = Program((Node("pad", "aten.constant_pad_nd.default", (Ref(INPUT), (20000, 20000, 20000, 20000))),), "pad", {})
    check_program(huge, "test")
    with pytest.raises(FcxError, match=r"makes a tensor of shape \(1, 3, 40008, 40008\)"):
        check_shapes(huge, (3, 8, 8), "test")
    # each under the bound alone (265 MB), 20 of them over the total (and all alive: none is read): refused at the
    # 17th, before any is real
    many = Program(tuple(Node(f"pad{i}", "aten.constant_pad_nd.default", (Ref(INPUT), (2346,) * 4)) for i in range(20)), "pad19", {})
    with pytest.raises(FcxError, match=r"node 'pad16' .*needs 4,506,360,768 bytes alive at once for one image"):
        check_shapes(many, (3, 8, 8), "test")


@pytest.mark.parametrize("node, expected", [
    (Node("p", "aten.avg_pool2d.default", (Ref(INPUT), (2, 2), (0, 0))), "stride should not be zero"),
    (Node("p", "aten.constant_pad_nd.default", (Ref(INPUT), (-20000, -20000))), "length must be non-negative"),
    (Node("p", "aten.convolution.default", (Ref(INPUT), Ref("w"), None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1)), "failed on input"),
    (Node("p", "aten.view.default", (Ref(INPUT), (-1, 63))), "is invalid for input of size 64"),
])
def test_operands_that_cannot_work_are_one_line_naming_the_node(node, expected):
    program = Program((node,), "p", {"w": torch.zeros(4, 1, 20, 20)})  # a kernel larger than the image
    check_program(program, "test")
    with pytest.raises(FcxError, match=f"node 'p' .*{expected}"):
        check_shapes(program, (1, 8, 8), "test")


class _Windows(nn.Module):
    """Overlapping windows as timm's HaloAttn takes them: Tensor.unfold twice (aten.unfold, a view)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.conv(x)
        windows = y.unfold(2, 4, 2).unfold(3, 4, 2)  # (N, 8, 7, 7, 4, 4): windows of 4 every 2
        return self.head(windows.mean((2, 3, 4, 5)) + windows[..., 0, 0].amax((2, 3)))


def test_overlapping_windows_run_as_the_model_does_and_export_to_every_default_format(tmp_path):
    import fcexport

    model = _Windows().eval()
    program = capture(model, (3, 16, 16))
    assert any(n.op == "aten.unfold.default" for n in program.nodes)
    with torch.no_grad():
        for batch in (1, 5):
            x = torch.rand(batch, 3, 16, 16)
            torch.testing.assert_close(ProgramModule(program)(x), model(x))
    fcexport.import_model(model, (3, 16, 16), artifacts=tmp_path)
    fcexport.export(tmp_path / "model.pt", tmp_path, formats=("torchscript", "onnx", "pt2"))
    report = fcexport.verify(tmp_path, backends=("torchscript", "pt2", "onnxruntime"), devices=("cpu",), inputs=16)
    assert report.passed and [r.status.value for r in report.parity.rows] == ["pass"] * 3


def test_an_empty_placeholder_without_values_is_a_pure_function_and_other_empty_tensors_are_refused(tmp_path):
    """segmentation_models_pytorch's Mix Vision Transformer encoders give a decoder a 0-channel torch.empty feature:
    no values, so nothing uninitialised is read; an empty tensor with values stays refused."""
    import torch

    import fcexport
    from fcexport.errors import FcxError

    class Placeholder(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, torch.empty(x.shape[0], 0, 8, 8)], 1).mean((2, 3))

    class Garbage(torch.nn.Module):
        def forward(self, x):
            return (x + torch.empty_like(x)).mean((2, 3))

    fcexport.import_model(Placeholder(), (3, 8, 8), artifacts=tmp_path / "ok")
    with pytest.raises(FcxError, match="not in fcexport's opset"):
        fcexport.import_model(Garbage(), (3, 8, 8), artifacts=tmp_path / "refused")


def test_import_refuses_a_program_longer_than_model_pt_may_be_rather_than_writing_it(monkeypatch, tmp_path):
    """timm's sequencer2d_s unrolls its LSTMs into 26,480 nodes: import wrote a model.pt that every later command
    refused; now import refuses it, naming the bound, and writes nothing."""
    import fcexport
    from fcexport import program as program_module

    monkeypatch.setattr(program_module, "MAX_NODES", 3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4), nn.Softmax(-1)).eval()
    with pytest.raises(FcxError, match=r"the model: the program has \d+ nodes, fcexport takes 1 to 3"):
        fcexport.import_model(model, (3, 2, 2), artifacts=tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_sees_nan_and_inf_in_every_float_dtype(dtype):
    from fcexport.program import all_finite

    values = torch.linspace(-3, 3, 1000, dtype=dtype)
    assert all_finite(values) and all_finite(values.reshape(10, 100).t())  # a view that is not contiguous too
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = values.clone()
        broken[617] = bad
        assert not all_finite(broken)
