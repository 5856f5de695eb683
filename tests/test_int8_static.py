"""Static int8 (QDQ) calibrated on real images: exported, judged by verify on accuracy and agreement for onnxruntime
and OpenVINO, its structure compared with a fresh export whatever images calibrated it, and refused without images."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import invoke, save_png
from onnx import numpy_helper

from fcexport.artifacts import record_in_manifest
from fcexport.targets.int8_static import FILE

TINY_CNN = ["--model", "cnn", "--channels", "8,16", "--hidden", "32", "--epochs", "4", "--batch-size", "64", "-q"]
STATIC_ROWS = ("onnxruntime-int8-static", "openvino-int8-static")


@pytest.fixture(scope="module")
def static_dir(tmp_path_factory, runner):
    """A tiny digits CNN exported with int8-static, calibrated on its own training images."""
    art = tmp_path_factory.mktemp("static") / "cnn"
    r = invoke(runner, "train", "--data", "digits", *TINY_CNN, "--artifacts", art)
    assert r.exit_code == 0, r.output
    r = invoke(runner, "export", "--format", "all,int8-static", "--artifacts", art, "--json")
    assert r.exit_code == 0, r.output
    return art


def _verify(runner, folder, tmp_path, *extra) -> dict:
    out = tmp_path / "report.json"
    r = invoke(runner, "verify", "--artifacts", folder, "--backends", ",".join(STATIC_ROWS), "--devices", "cpu",
               "--json-file", out, *extra)
    report = json.loads(out.read_text())
    return r.exit_code, {row["backend"]: row for row in report["rows"] if row["status"] != "skipped"}


def test_static_int8_runs_its_convolutions_in_int8_and_passes_verify_on_real_data(static_dir, runner, tmp_path, monkeypatch):
    model = onnx.load(str(static_dir / FILE))
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[0] in {o for m in model.graph.node if m.op_type == "DequantizeLinear" for o in m.output}
                         for n in convs)  # every Conv reads dequantized (int8) activations and weights
    assert any(name.endswith("_quantized") for name in quantized)
    described = json.loads({p.key: p.value for p in model.metadata_props}["quantization"])
    assert "training images of digits" in described["calibration"] and described["exact"] is False
    monkeypatch.setenv("FCX_FRESH", "1")  # the structure against a fresh export calibrated on other inputs
    code, rows = _verify(runner, static_dir, tmp_path)
    assert code == 0 and set(rows) == set(STATIC_ROWS), rows
    for row in rows.values():
        assert row["status"] == "pass" and row["top1_agreement"] >= 0.99 and row["accuracy"] is not None


def test_a_changed_int8_weight_is_named_by_the_structure_check(static_dir, runner, tmp_path):
    folder = tmp_path / "copy"
    import shutil

    shutil.copytree(static_dir, folder)
    path = folder / FILE
    model = onnx.load(str(path))
    weight = next(t for t in model.graph.initializer if t.name.endswith("weight_quantized") and t.data_type == onnx.TensorProto.INT8)
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = -values.flat[0] if values.flat[0] else 1
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    path.write_bytes(model.SerializeToString())
    source = json.loads((folder / "manifest.json").read_text())["files"][FILE]["source_sha256"]
    record_in_manifest(folder, {FILE: source}, {}, "tampered")  # a swapped file with a refreshed manifest
    code, rows = _verify(runner, folder, tmp_path)
    assert code == 1 and all(row["status"] == "fail" for row in rows.values())
    assert all(weight.name in " ".join(row["problems"]) for row in rows.values()), rows


def test_calibration_from_a_folder_and_refusals(static_dir, runner, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        save_png(images / f"{i}.png", (rng.random((8, 8)) * 255).astype(np.uint8))
    folder = tmp_path / "cnn"
    import shutil

    shutil.copytree(static_dir, folder)
    r = invoke(runner, "export", "--format", "onnx,int8-static", "--calibration", images, "--artifacts", folder, "-q")
    assert r.exit_code == 0, r.output
    described = json.loads({p.key: p.value for p in onnx.load(str(folder / FILE)).metadata_props}["quantization"])
    assert described["calibration"] == f"6 images of {images}"
    r = invoke(runner, "export", "--calibration", images, "--artifacts", folder)
    assert r.exit_code == 2 and "add --format all,int8-static" in r.stderr
    r = invoke(runner, "export", "--format", "onnx,int8-static", "--calibration", tmp_path / "empty", "--artifacts", folder)
    assert r.exit_code == 2 and "not found" in " ".join(r.stderr.split()), r.output


def test_an_imported_model_without_images_is_told_to_name_them(runner, tmp_path):
    import torch
    from torch import nn

    import fcexport

    folder = tmp_path / "imported"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    fcexport.import_model(model, (1, 8, 8), artifacts=folder)
    r = invoke(runner, "export", "--format", "int8-static", "--artifacts", folder, "--json")
    assert r.exit_code == 0, r.output  # model.onnx, which it builds on, is written; int8-static is said not to be
    assert "--calibration DIR" in json.loads(r.stdout)["skipped"]["int8-static"] and not (folder / FILE).exists()
