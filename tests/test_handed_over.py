"""Models as users hand them over: wrapped (torch.compile, DataParallel), pruned, weight-normed, left in train mode,
in float16, with a batch fixed in their code, saved by training scripts with their wrappers' key prefixes and
arguments, with model files that import their neighbours, with a fastai pooling head, with four input channels,
ending in a softmax or a sigmoid, with one logit."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import bounded, invoke, save_png
from torch import nn

import fcexport
from fcexport.checkpoint import load_model, read_model, save_program
from fcexport.compare import Tolerance, compare
from fcexport.errors import FcxError
from fcexport.preprocess import prepare_image
from fcexport.spec import ModelSpec


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


def test_adaptive_max_pooling_to_more_windows_than_spelled_is_said_as_such(tmp_path):
    """17 x 16 windows of 37 x 37: one line naming the bound and the fix, before anything is written."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveMaxPool2d((17, 16)), nn.Flatten(), nn.Linear(4 * 272, 5))
    with pytest.raises(FcxError) as refused:
        fcexport.import_model(model.eval(), (3, 37, 37), artifacts=tmp_path)
    said = str(refused.value)
    assert "to 17x16 (272 windows" in said and "at most 256" in said and "\n" not in said, said
    assert not (tmp_path / "model.pt").exists()


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


class YoloLikeHead(nn.Module):
    """An ultralytics classifier's head in eval mode: (softmax probabilities, logits), the probabilities first."""

    def __init__(self):
        super().__init__()
        self.body = small()

    def forward(self, x):
        logits = self.body(x)
        return logits.softmax(1), logits


def one_logit(end: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1), end).eval()


@pytest.mark.parametrize("model, expected", [
    (lambda: nn.Sequential(small(), nn.Softmax(dim=1)), "softmax"), (YoloLikeHead, "softmax"),
    (lambda: nn.Sequential(small(), nn.LogSoftmax(dim=1)), "softmax"), (small, "softmax"),
    (lambda: one_logit(nn.Sigmoid()), "p"), (lambda: one_logit(nn.Identity()), "sigmoid")],
    ids=["nn.Softmax", "yolo-cls", "log_softmax", "logits", "sigmoid", "one-logit"])
def test_predict_shows_the_models_own_probabilities(model, expected, tmp_path):
    """A model that already returns probabilities (its last op a softmax, or a sigmoid on one logit) is shown them as
    they are, not a softmax of them; logits (log_softmax too) are softmaxed; one logit is X or "not X" by a sigmoid."""
    model = model().eval()
    fcexport.import_model(model, (3, 16, 16), artifacts=tmp_path)
    fcexport.export(tmp_path / "model.pt", tmp_path, ["onnx"])
    save_png(tmp_path / "a.png", np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    row = next(iter(fcexport.predict([tmp_path / "a.png"], artifacts=tmp_path, runtime="onnxruntime", top_k=10)))
    spec = load_model(tmp_path / "model.pt")[1]
    with torch.no_grad():
        out = model(torch.from_numpy(prepare_image(tmp_path / "a.png", spec.input_shape, spec.preprocess))[None])
    out = (out[0] if isinstance(out, tuple) else out)[0].double()
    assert spec.probabilities == (expected == "p" or isinstance(model, YoloLikeHead) or isinstance(model[-1], nn.Softmax))
    if out.numel() == 1:
        p = float(out if expected == "p" else torch.sigmoid(out))
        shown = {t["label"]: t["probability"] for t in row["top"]}
        assert shown == pytest.approx({"0": p, "not 0": 1 - p}, abs=1e-5) and row["label"] == ("0" if p > 0.5 else "not 0")
    else:
        wanted = out if spec.probabilities else out.softmax(0)
        assert [t["probability"] for t in row["top"]] == pytest.approx(sorted(wanted.tolist(), reverse=True), abs=1e-5)
    assert sum(t["probability"] for t in row["top"]) == pytest.approx(1.0, abs=1e-5)


def test_a_spec_that_lies_about_probabilities_is_refused(tmp_path):
    fcexport.import_model(small(), (3, 16, 16), artifacts=tmp_path)
    stored = read_model(tmp_path / "model.pt")
    save_program(stored.program, replace(stored.spec, probabilities=True), tmp_path / "lying.pt")
    with pytest.raises(FcxError, match="lying.pt: its spec says the model returns probabilities"):
        load_model(tmp_path / "lying.pt")
    for value in ("yes", 1, None):
        with pytest.raises(FcxError, match="probabilities must be true or false"):
            ModelSpec.from_dict({"input_shape": [3, 8, 8], "class_names": ["a", "b"], "probabilities": value})
    assert "probabilities" not in stored.spec.to_dict()  # a model returning logits keeps its spec's layout


def test_one_probability_is_decided_at_one_half():
    """A sigmoid output decides by its side of 1/2 (its sign would call every input the class): an approximate file
    that flips one input across 1/2 disagrees on it."""
    reference = np.array([[0.9], [0.1], [0.8], [0.3], [0.95], [0.05]])
    flipped = reference.copy()
    flipped[0] = 0.4
    row = compare(flipped, reference, 1e-7, None, Tolerance(), approximate=True, probabilities=True)
    assert row["top1_agreement"] == pytest.approx(5 / 6)
    assert compare(flipped, reference, 1e-7, None, Tolerance(), approximate=True)["top1_agreement"] == 1.0  # by sign: blind


class Holder(nn.Module):
    """A model whose own keys begin with a wrapper's word (`model.`, `module.`)."""

    def __init__(self, attribute: str):
        super().__init__()
        self.attribute = attribute
        self.add_module(attribute, small())

    def forward(self, x):
        return getattr(self, self.attribute)(x)


@pytest.mark.parametrize("attribute, prefix", [("model", "model."), ("module", "module."), ("module", "_orig_mod.module.")])
def test_a_wrappers_prefix_is_dropped_when_the_models_own_keys_begin_alike(attribute, prefix):
    """Lightning's `model.` before a model that has its own `model`; DataParallel (and torch.compile over it) of a
    model with its own `module`."""
    from fcexport.sources import _strip_prefix

    model = Holder(attribute)
    saved = {prefix + k: v for k, v in model.state_dict().items()}
    stripped = _strip_prefix(saved, model)
    assert list(stripped) == list(model.state_dict()) and all(stripped[k] is saved[prefix + k] for k in stripped)


def test_a_dataparallel_subclass_with_its_own_forward_is_the_model(tmp_path):
    class Scaled(nn.DataParallel):
        def forward(self, x):
            return self.module(x) * 10

    model = Scaled(small())
    stored, _ = stored_program(model, tmp_path, "scaled")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(stored(x), model(x), atol=1e-5)


def test_the_model_files_folder_is_on_sys_path_only_while_the_file_runs(tmp_path):
    """Its own imports find their neighbours; a neighbour it never imports (a profile.py, a secrets.py) is not found
    by what torch imports later."""
    from fcexport.sources import build_user_model

    (tmp_path / "layers.py").write_text(NEIGHBOUR)
    (tmp_path / "net.py").write_text("from layers import Net\n")
    (tmp_path / "fcx_late_neighbour.py").write_text("raise SystemExit('ran')\n")
    assert isinstance(build_user_model(f"{tmp_path / 'net.py'}:Net", {}), nn.Module)
    assert str(tmp_path) not in sys.path
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("fcx_late_neighbour")


@pytest.mark.parametrize("kind", ["sparse", "quantised", "complex"])
def test_weights_that_are_not_dense_and_real_are_named_with_the_file(kind):
    from fcexport.sources import check_weights

    model = small()
    weights = model.state_dict()
    weight = weights["0.weight"]
    weights["0.weight"] = {"sparse": weight.to_sparse(), "complex": weight.to(torch.complex64),
                           "quantised": torch.quantize_per_tensor(weight, 0.1, 0, torch.qint8)}[kind]
    with pytest.raises(FcxError, match=f"w.pt: weight '0.weight' is a {kind} tensor"):
        check_weights(model, weights, "w.pt")


def test_a_key_of_megabytes_is_said_in_one_bounded_line(tmp_path, runner):
    """The child passes on at most a few thousand characters of its error (its pipe takes a megabyte)."""
    (tmp_path / "net.py").write_text(NEIGHBOUR)
    torch.save({**Net().state_dict(), "x" * 5_000_000: torch.zeros(1)}, tmp_path / "w.pt")
    r = invoke(runner, "import", str(tmp_path / "w.pt"), "--model-def", str(tmp_path / "net.py") + ":Net",
               "--input-shape", "3,8,8", "--artifacts", str(tmp_path / "out"))
    assert r.exit_code == 2 and "weights do not match the model: unexpected (1)" in r.output, r.output[:500]
    assert len(r.output) < 10_000 and "Traceback" not in r.output


def test_an_ema_copy_is_found_only_where_nothing_else_is_and_an_empty_file_is_said():
    from pathlib import Path

    from fcexport.sources import find_state_dict

    weights, ema = small().state_dict(), {k: v + 1 for k, v in small().state_dict().items()}
    assert find_state_dict({"state_dict_ema": ema}, Path("ema.pt")) is ema
    assert find_state_dict({"state_dict": weights, "state_dict_ema": ema}, Path("both.pt")) is weights
    with pytest.raises(FcxError, match="empty.pt: holds an empty dict: no weights"):
        find_state_dict({}, Path("empty.pt"))


def test_training_checkpoints_pass_the_hash_flood_check(tmp_path):
    """What check_keys must never refuse: optimizer and scheduler states (integer keys), a Namespace with a 64-bit
    seed and tuples, an EMA copy, RNG states, a few float keys."""
    import random

    from fcexport.checkpoint import load_weights_file

    model = small()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.rand(2, 3, 16, 16)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    torch.save({"epoch": 3, "global_step": 2 ** 40, "state_dict": model.state_dict(), "state_dict_ema": model.state_dict(),
                "optimizer": optimizer.state_dict(), "lr_schedulers": [schedule.state_dict()],
                "args": argparse.Namespace(seed=2 ** 63 + 5, img_size=(224, 224), mean=(0.5, 0.5, 0.5)),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}, "thresholds": {0.5: 1, 0.25: 2}},
               tmp_path / "train.pth.tar")
    loaded, _ = load_weights_file(tmp_path / "train.pth.tar")
    assert loaded["epoch"] == 3 and set(loaded["state_dict"]) == set(model.state_dict())
