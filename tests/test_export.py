"""`fcx export` artifacts and `fcx verify` parity, including plain consumers with no fcexport code."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from helpers import invoke

from fcexport.compare import FLOAT32_EPS
from fcexport.registry import open_predictor
from fcexport.files import sha256_file

ONNX_CLIENT = """
import json, sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
names = json.loads(meta["class_names"])
x = np.load(sys.argv[2])
logits = session.run(None, {session.get_inputs()[0].name: x})[0]
assert "fcexport" not in sys.modules and "torch" not in sys.modules
print(json.dumps([names[i] for i in logits.argmax(1)]))
"""

TORCHSCRIPT_CLIENT = """
import json, sys
import numpy as np, torch
extra = {"metadata.json": ""}
module = torch.jit.load(sys.argv[1], _extra_files=extra)
names = json.loads(extra["metadata.json"])["class_names"]
logits = module(torch.from_numpy(np.load(sys.argv[2])))
assert "fcexport" not in sys.modules
print(json.dumps([names[i] for i in logits.argmax(1).tolist()]))
"""


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    from fcexport.data import load_dataset

    x = load_dataset("digits").test.images[:25].numpy()
    path = tmp_path_factory.mktemp("batch") / "x.npy"
    np.save(path, x)
    return x, path


def test_onnx_contract(exported_dir):
    model = onnx.load(str(exported_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["pixels"] and [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["input_shape"] == [1, 8, 8]
    assert meta["provenance"]["source_sha256"] == sha256_file(exported_dir / "model.pt")
    assert meta["provenance"]["fused"] is True and meta["provenance"]["onnx"] == onnx.__version__


@pytest.mark.parametrize("n", [1, 7])
def test_onnx_runs_any_batch_size_and_matches_checkpoint(exported_dir, batch, n):
    x = batch[0][:n]
    onnx_logits = open_predictor(exported_dir / "model.onnx")(x)
    eager_logits = open_predictor(exported_dir / "model.pt")(x)
    assert onnx_logits.shape == (n, 10)
    np.testing.assert_allclose(onnx_logits, eager_logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("artifact, client", [("model.onnx", ONNX_CLIENT), ("model.ts", TORCHSCRIPT_CLIENT)])
def test_plain_consumers_agree_with_fcx(exported_dir, batch, artifact, client, tmp_path):
    out = subprocess.run([sys.executable, "-c", client, str(exported_dir / artifact), str(batch[1])],
                         capture_output=True, text=True, cwd=tmp_path, check=True)
    theirs = json.loads(out.stdout)
    predictor = open_predictor(exported_dir / "model.pt")
    ours = [predictor.spec.class_names[i] for i in predictor(batch[0]).argmax(1)]
    assert theirs == ours


def test_torchscript_metadata_and_frozen(exported_dir):
    predictor = open_predictor(exported_dir / "model.ts")
    assert predictor.backend == "torchscript" and predictor.spec.input_shape == (1, 8, 8)
    assert predictor.spec.provenance.folds


def test_manifest_lists_every_model_with_hashes(exported_dir):
    manifest = json.loads((exported_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "model.fused.pt", "model.ts", "model.onnx", "model.pt2", "reference.npz"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(exported_dir / name)
        assert entry["bytes"] == (exported_dir / name).stat().st_size
    assert set(manifest["versions"]) == {"torch", "onnx", "onnxruntime"}


def test_export_no_fuse_and_single_format(tmp_path, runner, trained_dir):
    r = invoke(runner, "export", trained_dir / "model.pt", "--artifacts", tmp_path, "--format", "onnx", "--no-fuse", "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "model.onnx").is_file() and not (tmp_path / "model.ts").exists()
    ops = {n.op_type for n in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert {"Sub", "Div"} <= ops  # the input normalisation was not folded
    np.testing.assert_allclose(open_predictor(tmp_path / "model.onnx")(np.full((3, 1, 8, 8), 0.5, np.float32)),
                               open_predictor(trained_dir / "model.pt")(np.full((3, 1, 8, 8), 0.5, np.float32)), atol=1e-5, rtol=1e-4)


def test_export_rejects_low_opset(tmp_path, runner, trained_dir):
    r = invoke(runner, "export", trained_dir / "model.pt", "--artifacts", tmp_path, "--opset", "11")
    assert r.exit_code == 2 and "opset must be from 17" in r.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was exported


def test_a_model_over_one_onnx_files_limit_is_told_to_export_another_format(tmp_path, runner, trained_dir, monkeypatch):
    """Over 2 GiB (vit_h_14, regnet_y_128gf) protobuf cannot write one ONNX file: a line saying so, exit 2, nothing
    written; here the limit is lowered to the tiny model's size instead of building a 2.5 GB one."""
    import fcexport.targets.onnx as onnx_target

    monkeypatch.setattr(onnx_target, "MAX_ONNX_BYTES", 1000)
    r = invoke(runner, "export", trained_dir / "model.pt", "--artifacts", tmp_path, "--format", "onnx", "--no-fuse")
    assert r.exit_code == 2, r.output
    assert "over the 1,000 of one ONNX file" in r.stderr and "export torchscript or pt2" in r.stderr
    assert not (tmp_path / "model.onnx").exists()


def test_int8_brings_the_onnx_it_is_made_from(tmp_path, runner, trained_dir):
    r = invoke(runner, "export", trained_dir / "model.pt", "--artifacts", tmp_path, "--format", "torchscript", "--int8", "--json")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.glob("model.*")) == ["model.int8.onnx", "model.onnx", "model.ts"]


def test_verify_passes_with_table_and_json(exported_dir, runner, tmp_path):
    report_path = tmp_path / "report.json"
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--json-file", report_path)
    assert r.exit_code == 0, r.output
    assert "PASSED" in r.stdout and "onnxruntime" in r.stdout
    report = json.loads(report_path.read_text())
    ran = {(row["backend"], row["device"]): row for row in report["rows"]}
    for backend in ("fused", "torchscript", "onnxruntime"):
        row = ran[(backend, "cpu")]
        assert row["status"] == "pass" and row["max_abs"] <= 1e-4 and row["top1_agreement"] == 1.0
        assert row["accuracy"] == pytest.approx(report["reference_accuracy"])
        assert set(row) >= {"max_abs", "mean_abs", "p99_abs", "max_rel", "noise_ratio", "allowed_max_abs"}
        # the band is factor x own error, or the noise floor (8 float32 steps of the largest logit, here under 50) where
        # that is larger: which one depends on the own error, and that on the batches it was computed in
        by_factor = report["noise_factor"] * report["own_float32_error"]
        floor = row["noise_floor_steps"] * FLOAT32_EPS * 50
        assert row["criterion"] == "noise" and row["max_abs"] <= row["allowed_max_abs"] <= max(by_factor, floor) + 1e-9
        assert row["allowed_max_abs"] >= by_factor
    for device in ("cuda",):
        assert all(row["status"] in ("pass", "skipped") for (b, d), row in ran.items() if d == device)


def test_verify_without_cuda_reports_skipped_not_passed(exported_dir, runner, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--devices", "cuda", "--json-file", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert all(row["status"] == "skipped" and row["reason"] for row in report["rows"])
    assert r.exit_code == 1 and not report["passed"]  # nothing ran, so nothing was proven


def test_sabotaged_onnx_fails_verification(artifacts_copy, runner):
    path = artifacts_copy / "model.onnx"
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data) if t.raw_data else len(t.float_data))
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] += 0.01  # one weight nudged
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(path))
    r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--backends", "onnxruntime,torchscript")
    assert r.exit_code == 1
    assert "FAIL" in r.stdout and "verification failed" in r.stderr


def test_verify_with_only_model_pt_is_not_a_pass(tmp_path, runner, trained_dir):
    import shutil

    shutil.copy(trained_dir / "model.pt", tmp_path / "model.pt")
    r = invoke(runner, "verify", "--artifacts", tmp_path, "--devices", "cpu")
    assert r.exit_code == 2 and "nothing to verify" in r.stderr and "fcx export" in r.stderr and "PASSED" not in r.stdout


def test_verify_reports_missing_artifacts_as_skipped(tmp_path, runner, exported_dir):
    import shutil

    for name in ("model.pt", "model.fused.pt", "manifest.json"):
        shutil.copy(exported_dir / name, tmp_path / name)
    r = invoke(runner, "verify", "--artifacts", tmp_path, "--devices", "cpu", "--json-file", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    rows = {row["backend"]: row for row in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert rows["fused"]["status"] == "pass" and rows["onnxruntime"]["status"] == "skipped"
    assert "fcx export" in rows["torchscript"]["hint"] and "model.ts not found" in rows["torchscript"]["reason"]


def test_retraining_moves_the_previous_generation_aside(artifacts_copy, runner):
    """A new model.pt never sits next to files made from the old one: they move, whole, to superseded/STAMP/."""
    r = invoke(runner, "train", "--data", "digits", "--hidden", "32", "--epochs", "1", "--seed", "9", "--artifacts", artifacts_copy, "-q")
    assert r.exit_code == 0, r.output
    said = "".join(r.stderr.split())  # a long temporary path wraps at 80 columns, even inside a word
    assert "movedto" in said and "superseded" in said
    assert not [f for f in ("model.onnx", "model.ts", "model.pt2", "model.fused.pt", "manifest.json") if (artifacts_copy / f).exists()]
    (old,) = (artifacts_copy / "superseded").iterdir()
    assert {"model.pt", "model.onnx", "model.ts", "manifest.json"} <= {p.name for p in old.iterdir()}
    r = invoke(runner, "verify", "--artifacts", old, "--backends", "onnxruntime", "--devices", "cpu")
    assert r.exit_code == 0, r.output  # the old set is still whole
    r = invoke(runner, "verify", "--artifacts", artifacts_copy)
    assert r.exit_code == 2 and "nothing to verify" in r.output


@pytest.fixture
def stale_copy(artifacts_copy, runner, tmp_path) -> Path:
    """The folder's model.pt overwritten by another model's (a `cp`, which fcx cannot see coming)."""
    r = invoke(runner, "train", "--data", "digits", "--hidden", "16", "--epochs", "1", "--seed", "9", "--artifacts", tmp_path / "other", "-q")
    assert r.exit_code == 0, r.output
    shutil.copy(tmp_path / "other" / "model.pt", artifacts_copy / "model.pt")
    return artifacts_copy


def test_verify_flags_a_stale_export(stale_copy, runner, tmp_path):
    r = invoke(runner, "verify", "--artifacts", stale_copy, "--backends", "onnxruntime", "--devices", "cpu", "--json-file", tmp_path / "r.json")
    row = json.loads((tmp_path / "r.json").read_text())["rows"][0]
    assert r.exit_code == 1 and row["status"] == "fail"
    assert "made from another model.pt" in row["problems"][0] and "another model.pt" in r.stdout


def test_predict_refuses_a_stale_export_unless_allowed(stale_copy, runner, tmp_path):
    from fcexport.samples import write_samples

    write_samples("digits", tmp_path / "s", 2)
    r = invoke(runner, "predict", tmp_path / "s", "--artifacts", stale_copy)
    assert r.exit_code == 2 and "made from another model.pt" in r.output and "--allow-stale" in r.output
    r = invoke(runner, "predict", tmp_path / "s", "--artifacts", stale_copy, "--allow-stale")
    assert r.exit_code == 0 and "warning:" in r.stderr and "stale" in r.stderr


# ---- int8 (approximate) ONNX ---------------------------------------------------------------


def test_int8_export_contract(int8_dir):
    model = onnx.load(str(int8_dir / "model.int8.onnx"))
    onnx.checker.check_model(model, full_check=True)
    weights = {t.name: t for t in model.graph.initializer if len(t.dims) == 2}
    assert weights and all(t.data_type == onnx.TensorProto.INT8 for t in weights.values())  # no float matrix left
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in model.graph.node}
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["quantization"])["exact"] is False
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
    assert json.loads(meta["provenance"])["source_sha256"] == sha256_file(int8_dir / "model.pt")
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    assert manifest["files"]["model.int8.onnx"]["sha256"] == sha256_file(int8_dir / "model.int8.onnx")


def test_int8_runs_in_plain_onnxruntime_like_fcx(int8_dir, batch, tmp_path):
    out = subprocess.run([sys.executable, "-c", ONNX_CLIENT, str(int8_dir / "model.int8.onnx"), str(batch[1])],
                         capture_output=True, text=True, cwd=tmp_path, check=True)
    predictor = open_predictor(int8_dir / "model.int8.onnx")
    assert predictor.backend == "onnxruntime-int8"
    assert json.loads(out.stdout) == [predictor.spec.class_names[i] for i in predictor(batch[0]).argmax(1)]


def test_verify_judges_int8_by_agreement_not_float_tolerance(int8_dir, runner, tmp_path):
    r = invoke(runner, "verify", "--artifacts", int8_dir, "--devices", "cpu", "--int8-agreement", "0.9",
               "--int8-max-drop", "0.05", "--json-file", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    row = {row["backend"]: row for row in report["rows"]}["onnxruntime-int8"]
    assert row["criterion"] == "agreement" and row["max_abs"] > report["noise_factor"] * report["own_float32_error"]  # the noise rule would fail it
    assert row["top1_agreement"] >= 0.9 and row["accuracy_drop"] <= 0.05
    assert row["status"] == "pass" and r.exit_code == 0, r.output
    assert "approximate backends (int8, bf16) pass on top-1 agreement >= 90.0%" in r.stdout


def test_sabotaged_int8_fails_verification(int8_dir, runner, tmp_path):
    path = Path(shutil.copytree(int8_dir, tmp_path / "a")) / "model.int8.onnx"
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2:  # scramble every weight matrix
            array = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(np.random.default_rng(0).permutation(array.ravel()).reshape(array.shape), t.name))
    onnx.save(model, str(path))
    r = invoke(runner, "verify", "--artifacts", path.parent, "--backends", "onnxruntime-int8", "--devices", "cpu")
    assert r.exit_code == 1 and "FAIL" in r.stdout


def test_export_without_int8_removes_a_stale_int8_model(int8_dir, runner, tmp_path):
    folder = Path(shutil.copytree(int8_dir, tmp_path / "a"))
    r = invoke(runner, "export", "--artifacts", folder)
    assert r.exit_code == 0, r.output
    assert not (folder / "model.int8.onnx").exists() and "removed" in r.stdout
    assert "model.int8.onnx" not in json.loads((folder / "manifest.json").read_text())["files"]


def test_judging_an_approximate_candidate():
    from fcexport.compare import Tolerance, compare

    reference = np.eye(10, dtype=np.float32)[np.arange(100) % 10]
    labels = np.arange(100) % 10
    candidate = reference + 0.05  # every element off by more than atol
    candidate[0] = np.roll(candidate[0], 1)  # one top-1 flip: 99% agreement, accuracy 100% -> 99%
    own = 1e-6  # the float32 model's own error
    exact = compare(candidate, reference, own, labels, Tolerance())
    assert not exact["passed"] and exact["criterion"] == "noise"
    assert not compare(candidate, reference, own, labels, Tolerance(atol=1e-5, rtol=1e-4))["passed"]
    assert compare(candidate, reference, own, labels, Tolerance(atol=1.1))["passed"]
    assert compare(candidate, reference, own, labels, Tolerance(), approximate=True)["passed"]
    assert not compare(candidate, reference, own, labels, Tolerance(min_agreement=0.995), approximate=True)["passed"]
    assert not compare(candidate, reference, own, labels, Tolerance(max_accuracy_drop=0.005), approximate=True)["passed"]
    candidate[1, 0] = np.nan
    assert not compare(candidate, reference, own, labels, Tolerance(), approximate=True)["passed"]


def test_the_noise_rule_scales_with_the_model_and_catches_what_exceeds_it():
    from fcexport.compare import Tolerance, compare

    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1e4, (50, 10))  # a deep random net's logits
    own = 3e-2  # float32 rounding through a deep net at that size (a few tens of float32 steps)
    noisy = reference + rng.uniform(-own, own, reference.shape)
    assert compare(noisy, reference, own, None, Tolerance())["passed"]  # a fixed atol of 1e-5 would fail this
    wrong = noisy.copy()
    wrong[3, 4] += 10 * own  # one logit off by ten times the noise
    row = compare(wrong, reference, own, None, Tolerance())
    assert not row["passed"] and row["noise_ratio"] > 5
    assert compare(wrong, reference, own, None, Tolerance(factor=20))["passed"]


def test_int8_is_listed_as_cpu_only_on_cuda(int8_dir, runner, tmp_path):
    r = invoke(runner, "verify", "--artifacts", int8_dir, "--backends", "onnxruntime-int8", "--devices", "cuda", "--json-file", tmp_path / "r.json")
    [row] = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert r.exit_code == 1 and "nothing was verified" in r.stderr  # a skip is never a pass
    assert row["status"] == "skipped" and "onnxruntime-int8 runs on cpu only" in row["reason"]


def test_a_program_too_long_for_torchscript_is_skipped_with_the_reason(artifacts_copy, runner, monkeypatch):
    """Beyond MAX_TORCHSCRIPT_NODES torch's own passes crash: the export says why and writes model.onnx."""
    import fcexport.targets.torchscript as export_torchscript

    monkeypatch.setattr(export_torchscript, "MAX_TORCHSCRIPT_NODES", 3)
    (artifacts_copy / "model.ts").unlink()
    r = invoke(runner, "export", "--artifacts", artifacts_copy, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert "TorchScript export is limited to 3" in result["skipped"]["torchscript"]
    assert not (artifacts_copy / "model.ts").exists() and (artifacts_copy / "model.onnx").is_file()


def test_export_reuses_the_model_fused_pt_that_fuse_bn_proved(artifacts_copy, runner, monkeypatch):
    """fuse-bn --verify wrote model.fused.pt from this model.pt (the manifest says so): export takes it as it is."""
    import fcexport.folding as folding

    def must_not_fold(*args, **kwargs):
        raise AssertionError("export folded again although model.fused.pt was made from this model.pt")

    monkeypatch.setattr(folding, "fuse_program", must_not_fold)
    r = invoke(runner, "export", "--artifacts", artifacts_copy, "--format", "onnx", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["folds"]  # the folds recorded in model.fused.pt
    (artifacts_copy / "model.fused.pt").unlink()  # without it, export folds (and here, fails loudly)
    assert invoke(runner, "export", "--artifacts", artifacts_copy, "--format", "onnx").exit_code == 3


# ---- export checks what it wrote -----------------------------------------------------------


def test_export_checks_each_file_it_wrote(artifacts_copy, runner):
    r = invoke(runner, "export", "--int8", "--json", "--artifacts", artifacts_copy)
    assert r.exit_code == 0, r.output
    rows = {row["backend"]: row["status"] for row in json.loads(r.stdout)["check"]["rows"]}
    assert rows == {"torchscript": "pass", "onnxruntime": "pass", "onnxruntime-int8": "skipped", "pt2": "pass"}
    r = invoke(runner, "export", "--no-check", "--json", "--artifacts", artifacts_copy)
    assert r.exit_code == 0 and json.loads(r.stdout)["check"] is None


def test_an_export_that_computes_something_else_fails_its_check(artifacts_copy, runner, monkeypatch):
    from dataclasses import replace

    import fcexport.pipeline as pipeline

    real = pipeline.open_backend

    def off_by_a_little(*args, **kwargs):
        predictor = real(*args, **kwargs)
        return replace(predictor, run=lambda x: predictor.run(x) + 1e-3)

    monkeypatch.setattr(pipeline, "open_backend", off_by_a_little)
    r = invoke(runner, "export", "--format", "onnx", "--artifacts", artifacts_copy)
    assert r.exit_code == 1 and "export check failed (onnxruntime)" in r.output
    assert (artifacts_copy / "model.onnx").is_file()  # written and listed: fcx verify shows the whole story


def test_activations_runtimes_compute_in_one_kernel_stay_whole_and_verify(tmp_path):
    """hardswish, hardsigmoid, silu and mish are kept whole in the stored program (not add/clamp/mul/div): model.onnx
    then holds one HardSwish where a plain export does, and runs as fast (benchmarks/onnx_quality.py), and every
    exact runtime still passes verify. GELU, which opset 18 can only write as its erf formula, is written in the
    order onnxruntime fuses into one Gelu kernel."""
    import torch
    from torch import nn

    import fcexport
    from fcexport.checkpoint import read_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Hardswish(), nn.Conv2d(8, 8, 1), nn.GELU(), nn.Hardsigmoid(), nn.SiLU(),
                          nn.Mish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    fcexport.import_model(model, (3, 16, 16), artifacts=tmp_path)
    ops = {node.op for node in read_model(tmp_path / "model.pt").program.nodes}
    assert {"aten.hardswish.default", "aten.hardsigmoid.default", "aten.silu.default", "aten.mish.default"} <= ops
    assert not ops & {"aten.clamp.default", "aten.hardtanh.default", "aten.softplus.default"}, ops  # nothing taken apart
    fcexport.export(tmp_path / "model.pt", tmp_path)
    kinds = {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert {"HardSwish", "HardSigmoid"} <= kinds and "Clip" not in kinds, kinds
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath, options.log_severity_level = str(tmp_path / "optimized.onnx"), 3
    onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    fused = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Gelu" in fused and "Erf" not in fused, fused
    report = fcexport.verify(tmp_path, devices=("cpu",), inputs=32)
    assert report.passed, report.to_json()


def test_attention_without_a_mask_is_stored_as_runtimes_fuse_it_and_a_masked_one_still_verifies(tmp_path):
    """scaled_dot_product_attention without a mask is stored as softmax(q k^T * scale) v (no guard for rows masked
    entirely: timm's ViTs ran at 0.80x of a plain export with it, 1.02x without); with a mask torch's own
    decomposition stays. Either is laid out as torch's kernel lays it out, which the model's later view was traced
    against (torch's default decomposition fails this model when masked). Both verify on every default runtime."""
    import torch
    import torch.nn.functional as F

    import fcexport
    from fcexport.checkpoint import read_model

    class Attention(torch.nn.Module):
        def __init__(self, masked: bool):
            super().__init__()
            self.masked, self.proj, self.head = masked, torch.nn.Linear(16, 48), torch.nn.Linear(16 * 16, 3)

        def forward(self, x):
            tokens = x.flatten(2).transpose(1, 2)  # (N, 16 pixels, 16 channels)
            q, k, v = self.proj(tokens).view(x.shape[0], 16, 3, 2, 8).permute(2, 0, 3, 1, 4)
            mask = torch.ones(16, 16, dtype=torch.bool).tril() if self.masked else None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            # as transformers' Data2VecVision: a copy the trace dropped (torch's kernel returns it laid out so) and a view
            return self.head(out.permute(0, 2, 1, 3).contiguous().view(x.shape[0], -1))

    for masked in (False, True):
        torch.manual_seed(0)
        folder = tmp_path / f"masked-{masked}"
        fcexport.import_model(Attention(masked).eval(), (16, 4, 4), artifacts=folder)
        ops = {node.op for node in read_model(folder / "model.pt").program.nodes}
        guarded = {"aten.where.self", "aten.amax.default"} & ops
        assert "aten._softmax.default" in ops and (guarded if masked else not guarded), ops
        fcexport.export(folder / "model.pt", folder)
        report = fcexport.verify(folder, devices=("cpu",), inputs=32)
        assert report.passed, report.to_json()
