"""Bring your own model: `fcx import` / `fcexport.import_model`, then fuse-bn, export, verify, predict.

Every model here is made in the test: a course-style Sequential with its model file, a nested training
checkpoint, a Conv-BN CNN with 3 input channels, torchvision's resnet18, and a non-Sequential module
with BatchNorm after the activation and a residual add.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torchvision
from helpers import float64_error, invoke, save_png, settle_batchnorms
from torch import nn

import fcexport
from fcexport.checkpoint import load_model
from fcexport.errors import FcxError
from fcexport.results import Status
from fcexport.spec import Normalization

EXACT_BACKENDS = {"fused", "torchscript", "pt2", "onnxruntime", "openvino"}  # every backend on cpu but int8 and the reference


COURSE_FILE = '''
from torch import nn


def course_mlp(hidden=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


class ColourNet(nn.Module):
    """A small Conv-BN CNN on 3-channel 12x12 images; the first Conv has no padding."""

    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class ResidualNet(nn.Module):
    """Not a Sequential: BN after the activation (folds into the next Linear) and a residual add."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 32)
        self.bn2 = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        a = torch.relu(self.fc1(torch.flatten(x, 1)))
        h = a + torch.relu(self.bn2(self.fc2(self.bn1(a))))
        return self.head(h)


def exits():
    raise SystemExit(3)  # user code that ends the process must not end fcx's


import torch  # noqa: E402  (after the classes on purpose: the file is read as a user would write it)
'''


def user_classes() -> dict:
    """The classes of the model file, as the user's own code defines them."""
    namespace: dict = {}
    exec(compile(COURSE_FILE, "course_model.py", "exec"), namespace)
    return namespace


def write_course_model(folder: Path) -> tuple[Path, nn.Module]:
    """course_model.py plus a state dict of the course MLP with settled BatchNorm statistics."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "course_model.py").write_text(COURSE_FILE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                          nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    settle_batchnorms(model, torch.rand(64, 1, 8, 8))
    torch.save(model.state_dict(), folder / "course.pt")
    return folder / "course.pt", model


def run_ok(runner, *args):
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output
    return result


def onnx_ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def downstream(runner, art: Path, image: Path, shape: tuple[int, ...], backends: set[str] = EXACT_BACKENDS) -> dict:
    """fuse-bn --verify -> export -> verify `backends` -> predict through the CLI; returns fuse-bn's JSON.

    Also checks that the fused model is as close to float64 maths as the model itself (<= 1.5x). 64 inputs each
    (--inputs): the subject is the model getting in (the automatic count: test_the_input_budget_follows_the_cost)."""
    fused = json.loads(run_ok(runner, "fuse-bn", "--verify", "--inputs", "64", "--artifacts", art, "--json").stdout)
    assert fused["verification"]["passed"]
    run_ok(runner, "export", "--artifacts", art)
    assert "BatchNormalization" not in onnx_ops(art / "model.onnx") or fused["report"]["left"]
    run_ok(runner, "verify", "--artifacts", art, "--devices", "cpu", "--backends", ",".join(sorted(backends)), "--inputs", "64",
           "--json-file", art / "report.json")
    report = json.loads((art / "report.json").read_text())
    assert report["passed"] and {r["backend"] for r in report["rows"] if r["status"] == "pass"} == backends
    rows = json.loads(run_ok(runner, "predict", image, "--artifacts", art, "--json").stdout)
    model, spec = load_model(art / "model.pt")
    assert rows[0]["label"] in spec.class_names
    torch.manual_seed(0)
    own, folded = float64_error(model, load_model(art / "model.fused.pt")[0], torch.rand(32, *shape))
    assert folded <= 1.5 * own + 1e-7, (own, folded)
    return fused


def test_course_model_four_commands_to_verified_onnx_and_predictions(tmp_path, runner, image_folder):
    weights, model = write_course_model(tmp_path)
    art = tmp_path / "artifacts"
    run_ok(runner, "import", weights, "--model-def", f"{tmp_path}/course_model.py:course_mlp", "--input-shape", "1,8,8",
           "--classes", "digits", "--mean", "0.3", "--std", "0.4", "--artifacts", art)
    fused = json.loads(run_ok(runner, "fuse-bn", "--verify", "--data", "digits", "--artifacts", art, "--json").stdout)
    folds = {f["layer"]: f["into"] for f in fused["report"]["folded"]}
    assert folds == {"input_normalize": "1 (Linear)", "2": "1 (Linear)", "5": "4 (Linear)"} and not fused["report"]["left"]
    assert fused["verification"]["passed"] and "test images of digits" in fused["verification"]["inputs"]
    run_ok(runner, "export", "--artifacts", art)
    assert not {"BatchNormalization", "Sub", "Div"} & onnx_ops(art / "model.onnx")
    run_ok(runner, "verify", "--artifacts", art, "--data", "digits", "--json-file", tmp_path / "report.json")
    report = json.loads((tmp_path / "report.json").read_text())
    exact = {r["backend"] for r in report["rows"] if r["status"] == "pass" and r["criterion"] != "agreement"}
    assert report["passed"] and exact == EXACT_BACKENDS
    predictions = json.loads(run_ok(runner, "predict", image_folder / "class0", "--artifacts", art, "--json").stdout)
    assert len(predictions) == 20 and {p["label"] for p in predictions} <= {str(i) for i in range(10)}
    # the stored model computes what the user's model computed, on [0, 1] pixels
    stored, spec = load_model(art / "model.pt")
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(stored(x), model((x - 0.3) / 0.4), atol=1e-6, rtol=1e-5)
    assert spec.normalization == Normalization((0.3,), (0.4,)) and spec.class_names[0] == "0"
    assert spec.architecture.details["model_def"].endswith("course_model.py:course_mlp")


def test_nested_training_checkpoint_is_found_or_named(tmp_path, runner):
    weights, model = write_course_model(tmp_path)
    nested = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "optimizer": {"lr": 0.1}}, nested)
    args = ["--model-def", f"{tmp_path}/course_model.py:course_mlp", "--input-shape", "1,8,8"]
    run_ok(runner, "import", nested, *args, "--artifacts", tmp_path / "a")
    run_ok(runner, "import", nested, *args, "--key", "model_state_dict", "--artifacts", tmp_path / "b")
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(load_model(tmp_path / "a" / "model.pt")[0](x), model(x))
    image = save_png(tmp_path / "digit.png", np.random.default_rng(2).integers(0, 255, (8, 8), dtype=np.uint8))
    downstream(runner, tmp_path / "a", image, (1, 8, 8), {"onnxruntime"})  # the subject is finding the state dict
    r = invoke(runner, "import", nested, *args, "--key", "ema", "--artifacts", tmp_path / "c")
    assert r.exit_code == 2 and "no state dict under key 'ema'" in r.stderr and "model_state_dict" in r.stderr


def test_strict_loading_lists_missing_unexpected_and_shape_mismatches(tmp_path, runner):
    weights, model = write_course_model(tmp_path)
    state = model.state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["1.bias"]
    state["4.weight"] = torch.zeros(16, 99)
    torch.save(state, tmp_path / "bad.pt")
    r = invoke(runner, "import", tmp_path / "bad.pt", "--model-def", f"{tmp_path}/course_model.py:course_mlp", "--input-shape", "1,8,8")
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "missing (1): 1.bias" in line and "unexpected (1): extra.weight" in line
    assert "shape mismatch (1): 4.weight is (16, 99) in the file, (16, 32) in the model" in line
    assert "classes" not in line  # not the head: no class-count hint


def test_a_head_for_another_class_count_says_which_side_is_the_files_and_what_to_give(tmp_path, runner):
    weights, model = write_course_model(tmp_path)
    state = model.state_dict()
    state["7.weight"], state["7.bias"] = torch.zeros(5, 16), torch.zeros(5)
    torch.save(state, tmp_path / "five.pt")
    r = invoke(runner, "import", tmp_path / "five.pt", "--model-def", f"{tmp_path}/course_model.py:course_mlp", "--input-shape", "1,8,8")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "7.weight is (5, 16) in the file, (10, 16) in the model" in r.stderr
    assert "The file's head has 5 classes, the model's 10" in r.stderr and '"num_classes": 5' in r.stderr and "--classes" in r.stderr


@pytest.mark.parametrize("given, expected, extra", [("1,32,32", "--input-shape 3,H,W", ()), ("32,32,3", "3,32,32", ()),
                                                    ("32,32,3", "3,32,32", ("--mean", "0.5,0.4,0.3", "--std", "0.2,0.2,0.2"))])
def test_an_input_shape_the_first_layer_cannot_take_names_the_layer_and_the_fix(tmp_path, runner, given, expected, extra):
    """With a mean per channel too (every timm and Hugging Face model), the shape's fix, not "mean needs 32 values"."""
    write_course_model(tmp_path)
    net = user_classes()["ColourNet"](classes=4)
    torch.save(net.state_dict(), tmp_path / "colour.pt")
    r = invoke(runner, "import", tmp_path / "colour.pt", "--model-def", f"{tmp_path}/course_model.py:ColourNet", "--input-shape", given,
               *extra)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "features.0" in r.stderr and "takes 3 channels" in r.stderr and expected in r.stderr, r.stderr


def test_colour_cnn_folds_normalisation_into_unpadded_conv_and_predicts_colour(tmp_path, runner):
    write_course_model(tmp_path)
    net = user_classes()["ColourNet"](classes=4)
    settle_batchnorms(net, torch.rand(16, 3, 12, 12))
    torch.save(net.state_dict(), tmp_path / "cnn.pt")
    art = tmp_path / "cnn"
    run_ok(runner, "import", tmp_path / "cnn.pt", "--model-def", f"{tmp_path}/course_model.py:ColourNet",
           "--model-args", '{"classes": 4}', "--input-shape", "3,12,12", "--classes", "red,green,blue,gray",
           "--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.3", "--artifacts", art)
    photo = save_png(tmp_path / "photo.png", np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8))
    fused = downstream(runner, art, photo, (3, 12, 12), {"fused", "pt2", "onnxruntime"})
    assert {f["layer"] for f in fused["report"]["folded"]} == {"input_normalize", "features.1", "features.5"}
    assert not {"BatchNormalization", "Sub", "Div"} & onnx_ops(art / "model.onnx")
    # colour files of any size: letterboxed to 12x12, the same answer as the user's model on that input
    row = json.loads(run_ok(runner, "predict", photo, "--artifacts", art, "--json").stdout)[0]
    from fcexport.preprocess import resized_image
    from fcexport.spec import Preprocess

    pixels = torch.from_numpy(resized_image(photo, 3, (12, 12), Preprocess("letterbox")))[None]
    assert pixels[0, :, :2].abs().max() == 0 and pixels[0, :, 3:9].abs().max() > 0  # 30x50 -> 7x12, padded above/below
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    expected = net((pixels - mean) / std).argmax(1).item()
    assert row["label"] == ["red", "green", "blue", "gray"][expected]


def test_resnet18_through_the_cli(tmp_path, runner):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    settle_batchnorms(net, torch.rand(4, 3, 32, 32), steps=3)
    torch.save(net.state_dict(), tmp_path / "resnet18.pt")
    art = tmp_path / "rn"
    run_ok(runner, "import", tmp_path / "resnet18.pt", "--model-def", "torchvision.models:resnet18",
           "--model-args", '{"num_classes": 10}', "--input-shape", "3,32,32", "--mean", "0.485,0.456,0.406",
           "--std", "0.229,0.224,0.225", "--artifacts", art)
    photo = save_png(tmp_path / "photo.png", np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    fused = downstream(runner, art, photo, (3, 32, 32), {"onnxruntime"})  # the others: on the small models (make zoo: all)
    assert len(fused["report"]["folded"]) == 20  # every BatchNorm2d of resnet18
    left = fused["report"]["left"]
    assert [x["layer"] for x in left] == ["input_normalize"] and "pads with zeros" in left[0]["reason"]
    assert "BatchNormalization" not in onnx_ops(art / "model.onnx")


def test_residual_model_with_bn_after_activation_through_the_cli(tmp_path, runner):
    write_course_model(tmp_path)
    model = settle_batchnorms(user_classes()["ResidualNet"](), torch.rand(32, 1, 8, 8))
    torch.save(model.state_dict(), tmp_path / "res.pt")
    run_ok(runner, "import", tmp_path / "res.pt", "--model-def", f"{tmp_path}/course_model.py:ResidualNet",
           "--input-shape", "1,8,8", "--artifacts", tmp_path / "res")
    image = save_png(tmp_path / "x.png", np.random.default_rng(1).integers(0, 255, (20, 20), dtype=np.uint8))
    fused = downstream(runner, tmp_path / "res", image, (1, 8, 8), {"fused", "torchscript", "onnxruntime"})
    assert {f["layer"]: f["direction"] for f in fused["report"]["folded"]} == {"bn1": "into following", "bn2": "into preceding"}


def test_live_module_from_python_with_bn_after_activation_and_residual(tmp_path):
    model = settle_batchnorms(user_classes()["ResidualNet"](), torch.rand(32, 1, 8, 8))
    path = fcexport.import_model(model, (1, 8, 8), class_names=[f"c{i}" for i in range(10)], artifacts=tmp_path)
    assert path == tmp_path / "model.pt"
    result = fcexport.fuse(path, tmp_path / "model.fused.pt", verify=True)
    assert result.verification.passed and result.written
    folded = {f.layer: (f.into, f.direction) for f in result.report.folded}
    assert folded["bn1"] == ("fc2 (Linear)", "into following") and folded["bn2"] == ("fc2 (Linear)", "into preceding")
    assert result.report.left == ()
    fused, _ = load_model(tmp_path / "model.fused.pt")
    x = torch.rand(16, 1, 8, 8)
    own, folded_err = float64_error(model, fused, x)
    assert folded_err <= 1.5 * own + 1e-7
    exported = fcexport.export(path, tmp_path)
    assert "BatchNormalization" not in onnx_ops(tmp_path / "model.onnx") and exported.folds
    report = fcexport.verify(tmp_path, devices=("cpu",))
    assert report.passed and {r.status for r in report.rows} == {Status.PASS, Status.SKIPPED}
    rows = fcexport.bench(tmp_path, batch_sizes=(1,), backends=("onnxruntime",), max_seconds=0.05, warmup=1)
    assert rows[0].status is Status.OK and rows[0].p50_ms > 0
    image = save_png(tmp_path / "x.png", np.random.default_rng(1).integers(0, 255, (20, 20), dtype=np.uint8))
    assert next(iter(fcexport.predict([image], artifacts=tmp_path)))["label"].startswith("c")
    assert {"import_model", "fuse_batchnorm", "export", "verify", "predict", "bench"} <= set(dir(fcexport))
    assert all(callable(getattr(fcexport, name)) for name in fcexport.__all__ if name != "__version__")


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1) + torch.rand_like(torch.flatten(x, 1)))


class NonZero(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))[:, torch.nonzero(x[0, 0, 0])[:, 0]]


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(torch.flatten(x, 1))
        return -self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("module, expected", [
    (Noisy(), "the model's own forward(): aten.rand_like.default is not in fcexport's opset"),
    (NonZero(), "aten.nonzero.default is not in fcexport's opset"),
    (DataDependent(), "torch.export cannot export the model (GuardOnDataDependentSymNode"),
])
def test_models_outside_the_opset_are_refused_naming_the_op(tmp_path, module, expected, capfd):
    with pytest.raises(FcxError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        fcexport.import_model(module, (1, 8, 8), artifacts=tmp_path)
    assert not (tmp_path / "model.pt").exists()
    assert capfd.readouterr().err == ""  # torch's own logging stays quiet: the error is the one line


def test_an_lstm_classifier_gets_in_and_verifies(tmp_path):
    class LSTMHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(8, 4, batch_first=True)

        def forward(self, x):
            return self.rnn(x[:, 0])[0][:, -1]

    fcexport.import_model(LSTMHead(), (1, 8, 8), artifacts=tmp_path)
    fcexport.export(tmp_path / "model.pt", tmp_path, formats=("onnx",))
    assert fcexport.verify(tmp_path, backends=("fused", "onnxruntime"), devices=("cpu",)).passed


def test_torchscript_and_pickled_models_are_refused_with_the_way_in(tmp_path, runner):
    _, model = write_course_model(tmp_path)
    with torch.no_grad():
        torch.jit.save(torch.jit.script(model.eval()), str(tmp_path / "scripted.pt"))
    torch.save(model, tmp_path / "whole.pt")
    args = ["--model-def", f"{tmp_path}/course_model.py:course_mlp", "--input-shape", "1,8,8"]
    for name, expected in (("scripted.pt", "a TorchScript file is code"), ("whole.pt", "it holds a pickled torch.nn.modules")):
        for argv in (["import", tmp_path / name, *args], ["fuse-bn", tmp_path / name, "--out", tmp_path / "f.pt"]):
            r = invoke(runner, *argv)
            assert r.exit_code == 2, r.output
            line = r.stderr.strip()
            assert len(line.splitlines()) == 1 and expected in line and "fcx import" in line and "corrupt" not in line
    r = invoke(runner, "fuse-bn", tmp_path / "course.pt", "--out", tmp_path / "f.pt")
    assert r.exit_code == 2 and "not an fcexport model" in r.stderr and "fcx import" in r.stderr


@pytest.mark.parametrize("argv_tail, expected", [
    (["--model-def", "no_colon"], "FILE.py:NAME or package.module:NAME"),
    (["--model-def", "missing.py:f"], "missing.py: model file not found"),
    (["--model-def", "torchvision.models:no_such_net"], "defines no class or function named 'no_such_net'"),
    (["--model-def", "torchvision.models:resnet18", "--model-args", "{bad"], "--model-args is not valid JSON"),
    (["--model-def", "torchvision.models:resnet18", "--model-args", '{"depth": 3}'], "unexpected keyword argument"),
    (["--model-def", "COURSE:course_mlp", "--input-shape", "1,8"], "three positive integers C,H,W"),
    (["--model-def", "COURSE:course_mlp", "--classes", "a,b"], "2 class names given but the model returns 10"),
    (["--model-def", "COURSE:course_mlp", "--mean", "0.5"], "--mean and --std go together"),
    (["--model-def", "COURSE:course_mlp", "--mean", "0.5", "--std", "0"], "std must be >= 1e-06"),
    (["--model-def", "COURSE:course_mlp", "--mean", "0.5", "--std", "1e-40"], "does not survive float32"),
    (["--model-def", "COURSE:course_mlp", "--mean", "1e300", "--std", "1"], "mean must be within"),
    (["--model-def", "COURSE:course_mlp", "--mean", "0.5,0.5", "--std", "1,1"], "mean needs 1 value, got 2"),
    (["--model-def", "COURSE:course_mlp", "--input-shape", "1,9,9"], "takes 64 values, but an input of shape 1,9,9 gives it 81: give an --input-shape C,H,W with C*H*W = 64 (e.g. 1,8,8)"),
    (["--model-def", "COURSE:course_mlp", "--classes", "names.txt"], "names.txt: class names file not found"),
    (["--model-def", "COURSE:course_mlp", "--classes", "fashion_mnist"], "(did you mean fashion-mnist?); the known sets are"),
    (["--model-def", "COURSE:course_mlp", "--classes", ",".join(["x" * 300] + list("123456789"))], "1 to 256 characters, one is 300"),
    (["--model-def", "COURSE:exits"], "failed: SystemExit"),
])
def test_import_bad_options_exit_2_with_one_line(tmp_path, runner, argv_tail, expected):
    weights, _ = write_course_model(tmp_path)
    argv = [a.replace("COURSE", f"{tmp_path}/course_model.py") for a in argv_tail]
    if "--input-shape" not in argv:
        argv += ["--input-shape", "1,8,8"]
    r = invoke(runner, "import", weights, *argv, "--artifacts", tmp_path / "out")
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not (tmp_path / "out" / "model.pt").exists()


def test_hostile_program_data_is_refused_before_anything_runs(tmp_path, trained_dir):
    raw = torch.load(trained_dir / "model.pt", weights_only=True)
    cases = {
        "python function": lambda p: p["nodes"][2].update(op="os.system"),
        "builtin": lambda p: p["nodes"][2].update(op="getattr"),
        "dunder method": lambda p: p["nodes"][2].update(op="aten.__reduce__.default"),
        "tensor name with code": lambda p: p["tensors"].update({"x; import os": {"dtype": "float32", "shape": [1]}}),
        "huge declared weight": lambda p: p["tensors"]["fc1.weight"].update(shape=[10**9, 64]),
        "dangling reference": lambda p: p["nodes"][-1]["args"].__setitem__(0, {"ref": "nowhere"}),
        "output that is no node": lambda p: p.update(output="x"),
        "string where an int goes": lambda p: next(n for n in p["nodes"] if n["op"] == "aten.view.default")["args"].__setitem__(1, "64"),
    }
    for name, damage in cases.items():
        program = json.loads(raw["program"])
        damage(program)
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save({**raw, "program": json.dumps(program)}, path)
        with pytest.raises(FcxError) as info:
            load_model(path)
        assert str(path) in str(info.value), name


ENDING_MODEL = '''
import os, sys
import torch
from torch import nn

class Ending(BaseException):
    pass

if os.environ.get("FCX_TEST_END_AT_IMPORT"):
    sys.exit(0)

class Net(nn.Module):
    def __init__(self, how="none"):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.how = how

    def forward(self, x):
        if self.how == "sys.exit":
            sys.exit(0)
        if self.how == "os._exit":
            os._exit(0)
        if self.how == "BaseException":
            raise Ending("the user's own")
        if self.how == "KeyboardInterrupt":
            raise KeyboardInterrupt
        return self.fc(x.flatten(1))
'''


@pytest.mark.parametrize("how", ["sys.exit", "os._exit", "BaseException", "at import"])
def test_the_models_code_cannot_end_fcx(how, tmp_path, runner, monkeypatch):
    """sys.exit(0), os._exit(0) or a BaseException in forward() or at import: exit 2 naming the file, nothing
    written (the code runs in a child process, so even os._exit ends only that)."""
    (tmp_path / "ending.py").write_text(ENDING_MODEL)
    torch.save({f"fc.{k}": v for k, v in nn.Linear(64, 10).state_dict().items()}, tmp_path / "w.pt")
    monkeypatch.setenv("FCX_TEST_END_AT_IMPORT", "1" if how == "at import" else "")
    r = invoke(runner, "import", tmp_path / "w.pt", "--model-def", f"{tmp_path}/ending.py:Net", "--model-args",
               json.dumps({"how": how}), "--input-shape", "1,8,8", "--artifacts", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "ending.py" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out" / "model.pt").exists()


def test_model_def_finds_a_module_in_the_current_folder(tmp_path, runner, monkeypatch):
    """`--model-def course_model:course_mlp` next to course_model.py works as `course_model.py:course_mlp` does."""
    weights, _ = write_course_model(tmp_path)
    monkeypatch.chdir(tmp_path)
    run_ok(runner, "import", weights, "--model-def", "course_model:course_mlp", "--input-shape", "1,8,8", "--artifacts", "out")
    assert (tmp_path / "out" / "model.pt").is_file()
    r = invoke(runner, "import", weights, "--model-def", "no_such_module:net", "--input-shape", "1,8,8", "--artifacts", "out2")
    assert r.exit_code == 2 and "for a file, write FILE.py:NAME" in r.stderr


def test_import_reports_its_steps_from_the_child_process(tmp_path):
    from fcexport import import_weights

    weights, _ = write_course_model(tmp_path)
    heard = []
    import_weights(weights, f"{tmp_path}/course_model.py:course_mlp", "1,8,8", artifacts=tmp_path / "art", on_step=heard.append)
    assert heard[0].startswith("starting a process") and heard[-1] == "writing model.pt"
    assert any(s.startswith("exporting with torch.export") for s in heard) and any(s.startswith("building") for s in heard)
