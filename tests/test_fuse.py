"""BatchNorm folding: every pattern against a float64 reference, refusals, and `fcx fuse-bn`."""

import copy
import json

import pytest
import torch
from helpers import float64_error, invoke, settle_batchnorms
from torch import nn

import fcexport
from fcexport.checkpoint import load_model
from fcexport.errors import FcxError
from fcexport.folding import BATCHNORM, batchnorm_affine, fold_into_following, fold_into_preceding, fuse_with_report
from fcexport.models import Normalize
from fcexport.program import ProgramModule


def bn_count(model: nn.Module) -> int:
    """BatchNorm and normalisation layers of a module, or their ops in a stored program's interpreter."""
    if isinstance(model, ProgramModule):
        return sum(n.op == BATCHNORM or n.layer_type == "Normalize" for n in model.program.nodes)
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, Normalize)) for m in model.modules())


PATTERNS = {
    "linear-bn": (lambda: nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)), (6, 12)),
    "bn-after-relu-into-next-linear": (lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 3)), (6, 12)),
    "linear-without-bias": (lambda: nn.Sequential(nn.Linear(12, 16, bias=False), nn.BatchNorm1d(16), nn.Linear(16, 3, bias=False)), (6, 12)),
    "affine-false": (lambda: nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16, affine=False), nn.Tanh(), nn.Linear(16, 3)), (6, 12)),
    "conv-bn": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, bias=False), nn.BatchNorm2d(4)), (2, 3, 10, 10)),
    "bn-into-unpadded-conv": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)), (2, 3, 10, 10)),
    "normalize-per-channel-into-unpadded-conv": (lambda: nn.Sequential(Normalize([0.5, 0.4, 0.3], [0.2, 0.3, 0.25]), nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8)), (2, 3, 9, 9)),
    "normalize-through-flatten-into-linear": (lambda: nn.Sequential(Normalize([0.5, 0.2], [0.3, 0.1]), nn.Flatten(), nn.Linear(2 * 4 * 4, 5), nn.BatchNorm1d(5)), (6, 2, 4, 4)),
    "chain-with-dropout": (lambda: nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.Linear(16, 3)), (6, 12)),
}


@pytest.mark.parametrize("name", PATTERNS)
def test_each_pattern_folds_exactly(name):
    make, shape = PATTERNS[name]
    torch.manual_seed(1)
    x = torch.randn(*shape)
    model = settle_batchnorms(make(), x)
    fused, report = fuse_with_report(model, x)
    assert bn_count(fused) == 0 and not report.left
    assert report.parameters_after <= report.parameters_before  # affine=False BNs hold buffers only
    assert sum(t.numel() for t in fused.state_dict().values()) < sum(t.numel() for t in model.state_dict().values())
    original_err, fused_err = float64_error(model, fused, torch.randn(64, *shape[1:]))
    assert fused_err <= 1.5 * original_err + 1e-7, (original_err, fused_err)


def test_normalisation_before_a_padded_conv_stays_explicit_because_folding_would_be_wrong():
    x = torch.rand(4, 3, 6, 6)
    model = settle_batchnorms(nn.Sequential(Normalize([0.5, 0.4, 0.3], [0.2, 0.3, 0.25]), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)), x)
    fused, report = fuse_with_report(model, x)
    assert [r.layer for r in report.left] == ["0"] and "pads with zeros" in report.left[0].reason
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-4)
    # what a naive fold would compute: the padded border sees the shift it should not
    conv = model[1]
    scale, shift = 1 / model[0].std.flatten().double(), -model[0].mean.flatten().double() / model[0].std.flatten().double()
    w, b = fold_into_following(conv.weight, conv.bias, scale, shift)
    naive = nn.functional.conv2d(x.double(), w, b, padding=1)
    exact = conv.double()(model[0].double()(x.double()))
    border_error = (naive - exact).abs()
    assert border_error[..., 1:-1, 1:-1].max() < 1e-9 and border_error.max() > 1e-3


def test_input_model_is_untouched_and_result_is_eval():
    make, shape = PATTERNS["linear-bn"]
    x = torch.randn(*shape)
    model = settle_batchnorms(make(), x).train()
    before = copy.deepcopy(model.state_dict())
    fused, report = fuse_with_report(model, x)  # folds the eval-mode behaviour (running statistics)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not fused.training and report.folded
    torch.testing.assert_close(fused(x), copy.deepcopy(model).eval()(x), atol=1e-5, rtol=1e-4)


class TwoBranch(nn.Module):
    """Not nn.Sequential: a residual-style model with a shared BN output and a batch-stat BN."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 10)
        self.bn = nn.BatchNorm1d(10)  # folds into fc
        self.pre = nn.BatchNorm1d(10)  # output used twice: must stay
        self.a, self.b = nn.Linear(10, 4), nn.Linear(10, 4)
        self.live = nn.BatchNorm1d(4, track_running_stats=False)  # batch statistics: must stay

    def forward(self, x):
        h = torch.relu(self.bn(self.fc(x)))
        p = self.pre(h)
        return self.live(self.a(p) + self.b(p))


def test_non_sequential_model_folds_legal_and_reports_the_rest():
    x = torch.randn(8, 10)
    model = settle_batchnorms(TwoBranch(), x)
    fused, report = fuse_with_report(model, x)
    assert [f.layer for f in report.folded] == ["bn"]
    reasons = {r.layer: r.reason for r in report.left}
    assert "2 users" in reasons["pre"] and "track_running_stats=False" in reasons["live"]
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-4)


def test_strict_refuses_unfoldable_batchnorm_naming_it():
    with pytest.raises(FcxError, match="live: track_running_stats=False"):
        fcexport.fuse_batchnorm(TwoBranch(), torch.randn(4, 10), strict=True)


def test_bn_on_3d_input_is_not_folded_into_a_linear_when_shapes_are_known():
    model = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 2)).eval()
    model[0].running_mean.fill_(2.0)
    x = torch.randn(3, 6, 6)
    fused, report = fuse_with_report(model, x)  # (N, C=6, L=6): channel axis != Linear axis
    assert report.left and not report.folded and "not 2-D" in report.left[0].reason
    torch.testing.assert_close(fused(x), model(x))


def test_pure_fold_maths_against_hand_computation():
    bn = nn.BatchNorm1d(2).eval()
    bn.running_mean.copy_(torch.tensor([1.0, -2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25]))
    bn.weight.data.copy_(torch.tensor([2.0, 1.0]))
    bn.bias.data.copy_(torch.tensor([0.5, 0.0]))
    scale, shift = batchnorm_affine(bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.0)
    assert scale.tolist() == [1.0, 2.0] and shift.tolist() == [-0.5, 4.0]
    w, b = fold_into_preceding(torch.eye(2), None, scale, shift)
    assert w.tolist() == [[1.0, 0.0], [0.0, 2.0]] and b.tolist() == [-0.5, 4.0]
    w, b = fold_into_following(torch.ones(1, 2), torch.zeros(1), scale, shift)
    assert w.tolist() == [[1.0, 2.0]] and b.tolist() == [3.5]


def test_fuse_bn_cli_writes_a_fused_checkpoint(tmp_path, runner, trained_dir):
    import shutil

    shutil.copy(trained_dir / "model.pt", tmp_path / "model.pt")
    r = invoke(runner, "fuse-bn", "--artifacts", tmp_path, "--verify", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert {f["layer"] for f in result["report"]["folded"]} == {"normalize", "bn1"}
    assert result["verification"]["passed"] and result["verification"]["rows"][0]["top1_agreement"] == 1.0
    assert "359 test images of digits" in result["verification"]["inputs"]
    fused, spec = load_model(tmp_path / "model.fused.pt")
    assert bn_count(fused) == 0 and spec.provenance.fused is True
    assert len(spec.provenance.source_sha256) == 64
    original, _ = load_model(tmp_path / "model.pt")
    x = torch.rand(20, 1, 8, 8)
    torch.testing.assert_close(fused(x), original(x), atol=1e-5, rtol=1e-4)


def test_fuse_bn_table_output(tmp_path, runner, trained_dir):
    r = invoke(runner, "fuse-bn", trained_dir / "model.pt", "--out", tmp_path / "f.pt")
    assert r.exit_code == 0, r.output
    assert "bn1" in r.stdout and "parameters" in r.stdout and "latency" in r.stdout
    assert (tmp_path / "f.pt").is_file()


def test_verify_catches_a_wrong_fold_and_writes_nothing(tmp_path, runner, trained_dir, monkeypatch):
    import fcexport.folding as fuse

    real = fuse.fold_into_preceding

    def corrupted(weight, bias, scale, shift):
        w, b = real(weight, bias, scale, shift)
        w[0, 0] += 0.05  # one wrong weight
        return w, b

    monkeypatch.setattr(fuse, "fold_into_preceding", corrupted)
    r = invoke(runner, "fuse-bn", trained_dir / "model.pt", "--out", tmp_path / "f.pt", "--verify")
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.stdout and "beyond tolerance" in r.stderr
    assert not (tmp_path / "f.pt").exists()
