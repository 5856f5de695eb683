"""fcx export --triton: the repository's layout, its configs against Triton's schema and the graphs they serve, its place
in the manifest and in fcx verify, and broken or hostile repositories refused with the reason. No server here
(tests/test_serve.py runs one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import invoke

from fcexport.errors import FcxError
from fcexport.targets import TritonSettings
from fcexport.targets.triton import check_repository
from fcexport.triton_config import parse_config, schema

REPO = "model_repository"


@pytest.fixture(scope="module")
def triton_dir(tmp_path_factory, exported_dir, runner) -> Path:
    out = Path(shutil.copytree(exported_dir, tmp_path_factory.mktemp("triton") / "artifacts"))
    result = invoke(runner, "export", "--triton", "--name", "digits", "--max-batch-size", "8", "--instances", "2", "--artifacts", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def triton_copy(tmp_path, triton_dir) -> Path:
    return Path(shutil.copytree(triton_dir, tmp_path / "artifacts"))


def _refresh(folder: Path, *names: str) -> None:
    """What an attacker who can write the folder does: change files, then list them in the manifest anew."""
    from fcexport.artifacts import record_in_manifest
    from fcexport.files import sha256_file

    source = sha256_file(folder / "model.pt")
    record_in_manifest(folder, {n: source for n in names}, {}, "tampered")


def _read(path: Path) -> bytes:
    return Path(path).read_bytes()


def test_repository_layout_and_config(triton_dir):
    root = triton_dir / REPO
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "digits/1/model.onnx", "digits/config.pbtxt", "digits/labels.txt",
        "digits_torchscript/1/model.ts", "digits_torchscript/config.pbtxt", "digits_torchscript/labels.txt"]
    assert (root / "digits/1/model.onnx").read_bytes() == (triton_dir / "model.onnx").read_bytes()
    assert (root / "digits_torchscript/1/model.ts").read_bytes() == (triton_dir / "model.ts").read_bytes()
    types = schema()
    onnx = parse_config((root / "digits/config.pbtxt").read_bytes(), "config")
    assert (onnx.name, onnx.platform, onnx.max_batch_size) == ("digits", "onnxruntime_onnx", 8)
    assert list(onnx.input[0].dims) == [1, 8, 8]  # the batch dimension is out of dims
    assert (onnx.input[0].name, onnx.output[0].name, onnx.output[0].label_filename) == ("pixels", "logits", "labels.txt")
    assert list(onnx.output[0].dims) == [10] and onnx.input[0].data_type == types.TYPE_FP32
    assert onnx.instance_group[0].count == 2 and onnx.instance_group[0].kind == types.ModelInstanceGroup.KIND_CPU
    assert onnx.HasField("dynamic_batching") and onnx.version_policy.latest.num_versions == 1
    assert onnx.parameters["intra_op_thread_count"].string_value == "4"
    spec = json.loads(onnx.parameters["fcexport_spec"].string_value)
    assert spec["input_shape"] == [1, 8, 8] and len(spec["class_names"]) == 10
    libtorch = parse_config((root / "digits_torchscript/config.pbtxt").read_bytes(), "config")
    assert libtorch.platform == "pytorch_libtorch" and (libtorch.input[0].name, libtorch.output[0].name) == ("pixels__0", "logits__0")
    assert (root / "digits/labels.txt").read_text().splitlines() == spec["class_names"]
    manifest = json.loads((triton_dir / "manifest.json").read_text())["files"]
    assert {f"{REPO}/digits/config.pbtxt", f"{REPO}/digits/1/model.onnx", f"{REPO}/digits_torchscript/1/model.ts"} <= set(manifest)
    assert check_repository(root, _read, triton_dir)[1] == []


def test_gpu_instances_and_options_need_triton(tmp_path, exported_dir, runner):
    folder = Path(shutil.copytree(exported_dir, tmp_path / "a"))
    result = invoke(runner, "export", "--format", "onnx", "--triton", "--gpu", "--artifacts", folder)
    assert result.exit_code == 0, result.output
    config = parse_config((folder / REPO / "classifier/config.pbtxt").read_bytes(), "c")
    assert config.instance_group[0].kind == schema().ModelInstanceGroup.KIND_GPU
    assert not (folder / REPO / "classifier_torchscript").exists()  # no TorchScript in this export: no libtorch model
    result = invoke(runner, "export", "--max-batch-size", "4", "--artifacts", folder)
    assert result.exit_code == 2 and "add --triton" in result.output
    for bad in (["--name", "../x"], ["--name", "a" * 101], ["--max-batch-size", "0"], ["--instances", "65"]):
        result = invoke(runner, "export", "--triton", *bad, "--artifacts", folder)
        assert result.exit_code == 2, (bad, result.output)


def test_export_again_under_another_name_replaces_the_repository(triton_copy, runner):
    result = invoke(runner, "export", "--triton", "--name", "other", "--artifacts", triton_copy)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (triton_copy / REPO).iterdir()) == ["other", "other_torchscript"]
    manifest = json.loads((triton_copy / "manifest.json").read_text())["files"]
    assert not [k for k in manifest if k.startswith(f"{REPO}/digits")]
    result = invoke(runner, "export", "--artifacts", triton_copy)  # without --triton: a repository built on the old onnx
    assert result.exit_code == 0, result.output
    assert not (triton_copy / REPO).exists()


def test_verify_checks_the_repository(triton_dir, runner):
    result = invoke(runner, "verify", "--backends", "onnxruntime", "--devices", "cpu", "--json", "--artifacts", triton_dir)
    assert result.exit_code == 0, result.output
    row = next(t for t in json.loads(result.stdout)["trust"] if t["check"] == "triton")
    assert row["status"] == "pass" and "6 files" in row["detail"]


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.replace('name: "pixels"', 'name: "image"'), "input is named 'image' but the model's is 'pixels'"),
    (lambda t: t.replace("  dims: 1\n", "  dims: -1\n  dims: 1\n", 1), "the batch dimension is left out of dims"),
    (lambda t: t.replace("max_batch_size: 8", "max_batch_size: 0"), "max_batch_size 0"),
    (lambda t: t.replace("TYPE_FP32", "TYPE_FP16", 1), "is TYPE_FP16"),
    (lambda t: t.replace('default_model_filename: "model.onnx"', 'default_model_filename: "../../../model.pt"'), "default_model_filename"),
    (lambda t: t.replace('platform: "onnxruntime_onnx"', 'platform: "tensorflow_savedmodel"'), "not one fcexport writes"),
    (lambda t: t.replace("max_batch_size: 8", "max_batch_size: 8 }"), "not a Triton model configuration: 8:19"),
])
def test_a_broken_config_fails_with_its_reason(triton_copy, runner, change, expected):
    config = triton_copy / REPO / "digits/config.pbtxt"
    config.write_text(change(config.read_text()))
    _refresh(triton_copy, f"{REPO}/digits/config.pbtxt")  # the manifest agrees: only the check can tell
    problems = check_repository(triton_copy / REPO, _read, triton_copy)[1]
    assert any(expected in p for p in problems), problems
    result = invoke(runner, "verify", "--backends", "onnxruntime", "--devices", "cpu", "--json", "--artifacts", triton_copy)
    assert result.exit_code == 1
    row = next(t for t in json.loads(result.stdout)["trust"] if t["check"] == "triton")
    assert row["status"] == "fail" and expected in row["detail"]


def test_missing_labels_and_swapped_model_fail(triton_copy):
    (triton_copy / REPO / "digits/labels.txt").unlink()
    swapped = triton_copy / REPO / "digits_torchscript/labels.txt"
    swapped.write_text("".join(f"{i}\n" for i in reversed(range(10))))
    problems = check_repository(triton_copy / REPO, _read, triton_copy)[1]
    assert any("digits/labels.txt: 0 labels for the model's 10 classes" in p for p in problems), problems
    assert any("digits_torchscript/labels.txt: 10 labels that differ" in p for p in problems), problems


def test_a_planted_or_changed_file_fails_verify(triton_copy, runner):
    (triton_copy / REPO / "digits/1/model.py").write_text("import os; os.system('touch /tmp/pwned')\n")
    result = invoke(runner, "verify", "--backends", "onnxruntime", "--devices", "cpu", "--json", "--artifacts", triton_copy)
    assert result.exit_code == 1
    row = next(t for t in json.loads(result.stdout)["trust"] if t["check"] == "triton")
    assert "model.py is not listed in manifest.json" in row["detail"]
    (triton_copy / REPO / "digits/1/model.py").unlink()
    served = triton_copy / REPO / "digits/1/model.onnx"
    served.write_bytes(served.read_bytes()[:-1] + b"\0")
    result = invoke(runner, "verify", "--backends", "onnxruntime", "--devices", "cpu", "--json", "--artifacts", triton_copy)
    row = next(t for t in json.loads(result.stdout)["trust"] if t["check"] == "triton")
    assert result.exit_code == 1 and "changed after it was written" in row["detail"]


def test_a_served_file_from_another_model_fails_even_with_a_refreshed_manifest(triton_copy, int8_dir):
    served = triton_copy / REPO / "digits/1/model.onnx"
    served.write_bytes((int8_dir / "model.int8.onnx").read_bytes())
    _refresh(triton_copy, f"{REPO}/digits/1/model.onnx")
    problems = check_repository(triton_copy / REPO, _read, triton_copy)[1]
    assert any("is not the folder's model.onnx" in p for p in problems), problems


def test_hostile_config_is_bounded(tmp_path):
    with pytest.raises(FcxError, match="larger than a model configuration"):
        parse_config(b"name: 'x'\n" * 200_000, tmp_path / "config.pbtxt")
    with pytest.raises(FcxError, match="not a Triton model configuration"):
        parse_config(b"\xff\xfe", tmp_path / "config.pbtxt")
    root = tmp_path / REPO
    for i in range(70):
        (root / f"m{i}").mkdir(parents=True)
    assert "more than fcexport reads" in check_repository(root, _read)[1][0]


def test_settings_are_checked():
    with pytest.raises(FcxError, match="Triton model name"):
        TritonSettings(name="x_torchscript")
    assert TritonSettings().name == "classifier"


# ---- what an attacker who can write the folder (and refresh its manifest) tries -------------------------------


@pytest.mark.parametrize("change, recorded, alone", [
    (lambda t: t + 'parameters { key: "EXECUTION_ENV_PATH" value { string_value: "/tmp/evil" } }\n',
     "parameters it does not write: EXECUTION_ENV_PATH", "parameters it does not write: EXECUTION_ENV_PATH"),
    (lambda t: t.replace("count: 2", "count: 1000000"), "instance_group differ", "instances must be from 1 to 64"),
    (lambda t: t.replace("max_batch_size: 8", "max_batch_size: 2147483647"), "max_batch_size differ",
     "max batch size must be from 1 to 4096"),
    (lambda t: t.replace("latest {\n    num_versions: 1\n  }", "specific {\n    versions: 7\n  }"), "version_policy differ",
     "version_policy"),
    (lambda t: t.replace('string_value: "4"', 'string_value: "100000"'), "parameters differ", "parameters not as fcx export writes them"),
    (lambda t: t + 'model_warmup { name: "w" batch_size: 1 inputs { key: "pixels" value { data_type: TYPE_FP32 dims: 1 '
               'input_data_file: "../../../../etc/passwd" } } }\n', "model_warmup", "model_warmup"),
])
def test_a_config_fcx_did_not_write_is_refused(triton_copy, runner, change, recorded, alone):
    """Against the settings export recorded in the manifest (byte for byte); a repository on its own (no manifest)
    against what export writes with the settings the config states."""
    config = triton_copy / REPO / "digits/config.pbtxt"
    config.write_text(change(config.read_text()))
    _refresh(triton_copy, f"{REPO}/digits/config.pbtxt")
    problems = check_repository(triton_copy / REPO, _read, triton_copy)[1]
    assert any(recorded in p for p in problems), problems
    problems = check_repository(triton_copy / REPO, _read)[1]
    assert any(alone in p for p in problems), problems
    result = invoke(runner, "verify", "--backends", "onnxruntime", "--devices", "cpu", "--json", "--artifacts", triton_copy)
    assert result.exit_code == 1


def test_a_repository_serving_another_model_fails_without_the_folders_model_onnx(triton_copy, tmp_path, runner):
    other = tmp_path / "other"
    assert invoke(runner, "train", "--data", "digits", "--hidden", "16", "--epochs", "1", "-q", "--artifacts", other).exit_code == 0
    assert invoke(runner, "export", "--format", "onnx", "--no-check", "--artifacts", other).exit_code == 0
    shutil.copy(other / "model.onnx", triton_copy / REPO / "digits/1/model.onnx")
    (triton_copy / "model.onnx").unlink()
    _refresh(triton_copy, f"{REPO}/digits/1/model.onnx")
    problems = check_repository(triton_copy / REPO, _read, triton_copy)[1]
    assert any("the folder's own model.onnx, which it must equal, is missing" in p for p in problems), problems


def test_odd_names_links_and_sizes_are_refused_before_reading(triton_copy, tmp_path):
    root = triton_copy / REPO
    shutil.copytree(root / "digits", root / "x#y")
    assert "'x#y' is not a model name" in check_repository(root, _read, triton_copy)[1][0]
    shutil.rmtree(root / "x#y")
    with open(root / "digits/config.pbtxt", "r+b") as f:
        f.truncate(3 << 30)  # sparse: 3 GB that are never read
    problems = check_repository(root, _read, triton_copy)[1]
    assert any("larger than fcexport reads for it" in p for p in problems), problems
    shutil.rmtree(root)
    (triton_copy / REPO).symlink_to(tmp_path)
    from fcexport.verification import folder_checks

    row = folder_checks(triton_copy, json.loads((triton_copy / "manifest.json").read_text()), None)
    assert row and row[0].status.value == "fail" and "symbolic link" in row[0].detail


def test_inspect_describes_the_repository(triton_dir, runner):
    for target in (triton_dir, triton_dir / REPO):
        result = invoke(runner, "inspect", target, "--json")
        assert result.exit_code == 0, result.output
        (found,) = [f for f in json.loads(result.stdout)["files"] if f["file"].endswith(REPO)]
        assert found["manifest"] == "6 files match, made from this model.pt"
        assert found["details"]["models"]["digits"].startswith("onnxruntime_onnx, max batch 8, 2 x KIND_CPU")
