"""`fcx train --model cnn`: a Conv-BN classifier trained, folded, exported, verified and used end to end."""

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import float64_error, invoke, save_png
from torch import nn

from fcexport.checkpoint import load_model
from fcexport.errors import FcxError
from fcexport.models import build_model, model_config

TINY_CNN = ["--model", "cnn", "--channels", "8,16", "--hidden", "32", "--epochs", "4", "--batch-size", "64", "-q"]


@pytest.mark.parametrize("shape, channels, flat", [([1, 28, 28], [32, 64], 64 * 7 * 7), ([1, 8, 8], [4, 8], 8 * 2 * 2), ([3, 9, 12], [5], 5 * 4 * 6)])
def test_cnn_shapes(shape, channels, flat):
    model = build_model(model_config(shape, 10, [16], channels=channels, arch="cnn", normalize={"mean": 0.3, "std": 0.3}))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == channels and all(c.padding == (1, 1) for c in convs)
    assert model.fc1.in_features == flat
    assert model(torch.rand(3, *shape)).shape == (3, 10)


def test_cnn_needs_stages_that_fit_the_image():
    with pytest.raises(FcxError, match="each halving the image"):
        model_config([1, 8, 8], 10, [16], channels=[4, 4, 4, 4], arch="cnn")
    with pytest.raises(FcxError, match="1 or more conv stages"):
        model_config([1, 8, 8], 10, [16], channels=[], arch="cnn")


def test_tiny_cnn_train_fuse_export_verify_predict(tmp_path, runner):
    art = tmp_path / "cnn"
    r = invoke(runner, "train", "--data", "digits", *TINY_CNN, "--artifacts", art, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["test_accuracy"] > 0.5  # 10 classes; measured 0.75 after four epochs
    model, spec = load_model(art / "model.pt")
    assert spec.architecture.kind == "cnn" and spec.architecture.details["channels"] == (8, 16)
    fused = json.loads(invoke(runner, "fuse-bn", "--verify", "--artifacts", art, "--json").stdout)
    assert fused["verification"]["passed"]
    assert {f["layer"] for f in fused["report"]["folded"]} == {"conv_bn1", "conv_bn2", "bn1"}
    # the normalisation before the padded first Conv stays an explicit op, with the reason
    assert [(x["layer"], "pads with zeros" in x["reason"]) for x in fused["report"]["left"]] == [("normalize", True)]
    assert invoke(runner, "export", "--artifacts", art).exit_code == 0
    ops = [n.op_type for n in onnx.load(str(art / "model.onnx")).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2 and {"Sub", "Div"} <= set(ops)
    r = invoke(runner, "verify", "--artifacts", art, "--devices", "cpu")
    assert r.exit_code == 0 and "PASSED" in r.stdout, r.output
    image = save_png(tmp_path / "digit.png", (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8))
    rows = json.loads(invoke(runner, "predict", image, "--artifacts", art, "--json").stdout)
    assert rows[0]["label"] in spec.class_names
    fused_model, _ = load_model(art / "model.fused.pt")
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8)
    own, folded = float64_error(model, fused_model, x)
    assert folded <= 1.5 * own + 1e-7, (own, folded)
