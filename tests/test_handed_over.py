"""Models as users hand them over: wrapped (torch.compile, DataParallel), pruned, weight-normed, left in train mode,
in float16, with a batch fixed in their code, saved by training scripts with their wrappers' key prefixes and
arguments, with model files that import their neighbours, with a fastai pooling head, with four input channels."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import bounded, invoke, save_png
from torch import nn

import fcexport
from fcexport.checkpoint import load_model
from fcexport.errors import FcxError


def small(channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10)).eval()


def stored_program(module, tmp_path, name: str, shape=(3, 16, 16)):
    fcexport.import_model(module, shape, artifacts=tmp_path / name)
    return load_model(tmp_path / name / "model.pt")


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel, lambda m: torch.compile(nn.DataParallel(m))],
                         ids=["torch.compile", "DataParallel", "both"])
def test_a_wrapped_model_is_stored_as_the_model_inside(wrap, tmp_path):
    model = small()
    plain, _ = stored_program(model, tmp_path, "plain")
    wrapped, _ = stored_program(wrap(model), tmp_path, "wrapped")
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(plain(x), wrapped(x)) and torch.allclose(wrapped(x), model(x), atol=1e-6)


def test_pruned_and_legacy_weight_normed_models_import_and_the_users_modes_are_kept(tmp_path):
    """Their weights are computed (deepcopy refuses them): the model itself is captured, in eval mode, and each of
    its submodules gets its own mode back."""
    from torch.nn.utils import prune

    model = small()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    model[5] = nn.utils.weight_norm(model[5])
    model.train()
    model[1].eval()  # a mix of modes, as a user might leave it
    modes = [m.training for m in model.modules()]
    stored, _ = stored_program(model, tmp_path, "pruned")
    assert [m.training for m in model.modules()] == modes
    x = torch.rand(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(stored(x), model(x), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_said_with_the_fix(dtype, tmp_path):
    with pytest.raises(FcxError, match=rf"weights are {str(dtype).removeprefix('torch.')}: .*model\.float\(\)"):
        fcexport.import_model(small().to(dtype), (3, 16, 16), artifacts=tmp_path)


class BatchOfOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.reshape(1, -1))


class SizedByInt(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.reshape(int(x.shape[0]), -1))


@pytest.mark.parametrize("module, expected", [
    (BatchOfOne(), r"runs on one image but fails on a batch of two \(RuntimeError: .*test_handed_over\.py:\d+\): its code fixes the batch size"),
    (SizedByInt(), r"the model's code fixes the batch size"),
])
def test_a_batch_fixed_in_the_models_code_is_said_as_such(module, expected, tmp_path):
    with pytest.raises(FcxError, match=expected) as caught:
        fcexport.import_model(module, (3, 8, 8), artifacts=tmp_path)
    assert "input-shape" not in str(caught.value) and "Constraints violated" not in str(caught.value)


@pytest.mark.parametrize("size", [1, 2, (3, 5)])
def test_fastais_concat_pool_head_gets_in_and_verifies(size, tmp_path):
    """AdaptiveMaxPool2d to 1x1 (an amax), to a size that divides the input (a max pool) or to any other (windows)."""
    class ConcatPool(nn.Module):
        def __init__(self):
            super().__init__()
            self.mp, self.ap = nn.AdaptiveMaxPool2d(size), nn.AdaptiveAvgPool2d(size)

        def forward(self, x):
            return torch.cat([self.mp(x), self.ap(x)], 1)

    torch.manual_seed(0)
    cells = size * size if isinstance(size, int) else size[0] * size[1]
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), ConcatPool(), nn.Flatten(), nn.Linear(16 * cells, 5)).eval()
    fcexport.import_model(model, (3, 8, 8), artifacts=tmp_path)
    fcexport.export(tmp_path / "model.pt", tmp_path, ["onnx", "torchscript"])
    report = fcexport.verify(tmp_path, ["torchscript", "onnxruntime"], ["cpu"], inputs=16)
    assert report.passed, report.to_json()


@pytest.mark.parametrize("size, output", [((7, 7), (5, 5)), ((16, 13), (5, 7)), ((9, 20), (4, 6)), ((6, 6), (6, 4))])
def test_adaptive_max_pooling_to_any_size_is_torchs_values_and_indices(size, output):
    """Windows that overlap or differ in size: each output cell and its argmax exactly as torch's kernel has them."""
    from fcexport.program import _adaptive_max_pool

    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    values, indices = _adaptive_max_pool(lambda *args: NotImplemented, x, output)
    expected_values, expected_indices = nn.functional.adaptive_max_pool2d(x, output, return_indices=True)
    assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)


NEIGHBOUR = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))
'''
_defined: dict = {}
exec(NEIGHBOUR, _defined)  # the user's file, and the model the tests build from the same code
Net = _defined["Net"]


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod."])
def test_weights_saved_through_wrappers_load_without_their_prefix(prefix, tmp_path, runner, monkeypatch):
    """DataParallel, torch.compile, Lightning (its `model` attribute), and both nested; the model file imports its
    neighbour as `python net.py` would, and a training script's argparse.Namespace beside the weights is data."""
    models = tmp_path / "code"
    models.mkdir()
    (models / "layers.py").write_text(NEIGHBOUR)
    (models / "net.py").write_text("from layers import Net\n")
    model = Net()
    checkpoint = {"state_dict": {prefix + k: v for k, v in model.state_dict().items()},
                  "args": argparse.Namespace(model="net", lr=0.1, epochs=3), "epoch": 3}
    torch.save(checkpoint, tmp_path / "train.pth.tar")
    monkeypatch.chdir(tmp_path)  # not the model's folder
    r = invoke(runner, "import", str(tmp_path / "train.pth.tar"), "--model-def", str(models / "net.py") + ":Net",
               "--input-shape", "3,8,8", "--artifacts", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    stored, _ = load_model(tmp_path / "out" / "model.pt")
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(stored(x), model(x), atol=1e-6)


class TrainingSettings:  # anything but plain data: unpickling it could run code
    pass


def test_a_pickled_object_in_a_checkpoint_is_named(tmp_path, runner):
    (tmp_path / "net.py").write_text(NEIGHBOUR)
    torch.save({"state_dict": Net().state_dict(), "settings": TrainingSettings()}, tmp_path / "ckpt.pt")
    r = invoke(runner, "import", str(tmp_path / "ckpt.pt"), "--model-def", str(tmp_path / "net.py") + ":Net",
               "--input-shape", "3,8,8", "--artifacts", str(tmp_path / "out"))
    assert r.exit_code == 2 and "refused: it holds a pickled " in r.output and "TrainingSettings" in r.output, r.output
    assert not (tmp_path / "out" / "model.pt").exists()


def test_predict_refuses_a_model_of_four_channels_instead_of_feeding_it_gray(tmp_path):
    fcexport.import_model(small(4), (4, 16, 16), artifacts=tmp_path)
    fcexport.export(tmp_path / "model.pt", tmp_path, ["onnx"])
    rgba = np.zeros((16, 16, 3), np.uint8)
    rgba[..., 0] = 255
    save_png(tmp_path / "red.png", rgba)
    done = subprocess.run([sys.executable, "-c", "from cli.main import main; main()", "predict", str(tmp_path / "red.png"),
                           "--artifacts", str(tmp_path)], capture_output=True, text=True, preexec_fn=bounded())
    said = done.stdout + done.stderr
    assert done.returncode == 2 and "model.onnx: the model takes 4 channels" in said, said
    assert said.count("takes 4 channels") == 1 and "red.png" not in said and "Traceback" not in done.stderr  # once, for the model
