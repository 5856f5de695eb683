"""Targets as plugins: the registry, torch.export's model.pt2, OpenVINO, and predict's runtime choice."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import invoke, plugin_registered, save_png

from fcexport import registry, speeds


def test_every_backend_is_one_runtime_on_one_artifact():
    backends = registry.backends()
    assert {"eager", "fused", "torchscript", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16", "pt2"} <= set(backends)
    assert backends["openvino-bf16"].approximate and not backends["openvino"].approximate  # the runtime makes it approximate
    assert backends["openvino"].files == backends["onnxruntime"].files == ("model.onnx",)  # two runtimes, one file
    assert backends["openvino"].runtime.name != backends["onnxruntime"].runtime.name
    assert backends["onnxruntime-int8"].approximate and backends["onnxruntime-int8"].devices == ("cpu",)
    assert backends["pt2"].made_by == "export" and backends["onnxruntime-int8"].made_by == "export-int8"
    assert registry.default_exporters() == ("torchscript", "onnx", "pt2", "reference")


def test_cli_choices_come_from_the_registry(runner):
    from cli.main import ALL_BACKENDS

    assert ALL_BACKENDS.split(", ") == list(registry.backends())
    r = invoke(runner, "export", "--help")
    assert all(name in r.stdout for name in registry.exporters())


def test_a_new_runtime_is_one_module_and_one_registry_line(exported_dir, runner, tmp_path, monkeypatch):
    """A plugin outside fcexport: a second backend on model.onnx, in verify like the built-in ones."""
    source = ("from fcexport.targets import Runtime\n"
              "from fcexport.targets import onnxruntime as ort\n"
              "RUNTIME = Runtime(name='ort-1', format='onnx', devices=('cpu',), open=ort.open_onnx,\n"
              "                  runs={'ort-1': 'onnx'}, summary='onnxruntime under another name')\n")
    with plugin_registered(monkeypatch, tmp_path, "again_plugin", source):
        r = invoke(runner, "verify", "--artifacts", exported_dir, "--backends", "ort-1", "--devices", "cpu", "--json")
        assert r.exit_code == 0, r.output
        assert [(row["backend"], row["status"]) for row in json.loads(r.stdout)["rows"]] == [("ort-1", "pass")]


# ---- torch.export (model.pt2) ----------------------------------------------------------------


def test_pt2_verifies_without_ever_calling_torch_export_load(exported_dir, runner, monkeypatch):
    import torch

    def must_not_unpickle(*args, **kwargs):
        raise AssertionError("torch.export.load unpickles: fcx must never call it")

    monkeypatch.setattr(torch.export, "load", must_not_unpickle)
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--backends", "pt2", "--devices", "cpu", "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)["rows"][0]
    assert (row["backend"], row["status"], row["source"]) == ("pt2", "pass", str(exported_dir / "model.pt2"))


def test_pt2_is_a_standard_torch_export_archive_with_a_dynamic_batch(exported_dir):
    """Where the file is trusted, torch.export.load reads it and computes what model.pt does, at any batch."""
    import torch

    from fcexport.registry import open_predictor

    program = torch.export.load(str(exported_dir / "model.pt2")).module()
    reference = open_predictor(exported_dir / "model.pt")
    for batch in (1, 5):
        x = np.random.default_rng(batch).random((batch, *reference.spec.input_shape), dtype=np.float32)
        np.testing.assert_allclose(program(torch.from_numpy(x)).detach().numpy(), reference(x), atol=1e-4, rtol=1e-4)


def _rewrite_record(path, suffix: str, change) -> None:
    """Change one record of a zip archive (in place), keeping the rest byte for byte."""
    source = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info)
            target.writestr(info, change(data) if info.filename.endswith(suffix) else data)
    path.write_bytes(out.getvalue())


def _refresh_manifest(folder, name: str) -> None:
    """What an attacker with write access does: make the manifest agree with the swapped file."""
    from fcexport.artifacts import record_in_manifest

    source = json.loads((folder / "manifest.json").read_text())["files"][name]["source_sha256"]
    record_in_manifest(folder, {name: source}, {}, "tampered")


def test_a_pt2_with_a_changed_weight_is_refused_everywhere(artifacts_copy, image_dir_pt2, runner):
    path = artifacts_copy / "model.pt2"
    _rewrite_record(path, "weights/weight_0", lambda data: bytes([data[0] ^ 0x40]) + data[1:])
    _refresh_manifest(artifacts_copy, "model.pt2")
    r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--backends", "pt2", "--devices", "cpu", "--json")
    row = json.loads(r.stdout)["rows"][0]
    assert r.exit_code == 1 and row["status"] == "fail" and "weights/weight_0" in " ".join(row["problems"])
    r = invoke(runner, "predict", image_dir_pt2, "--model", path)
    assert r.exit_code == 2 and "weights/weight_0" in r.stderr and "Traceback" not in r.output


def test_a_pt2_matches_a_fresh_export_whatever_its_example_tensors_storage_offsets(artifacts_copy, runner):
    """torch.export fills the storage offsets of example tensors differently from one export to the next (swin_t):
    they are not part of the comparison; every other field of a tensor value is."""
    path = artifacts_copy / "model.pt2"

    def offsets(data):
        graph = json.loads(data)
        for value in graph["graph_module"]["graph"]["tensor_values"].values():
            value["storage_offset"] = {"as_int": 2744}
        return json.dumps(graph).encode()

    def sizes(data):
        graph = json.loads(data)
        value = next(iter(graph["graph_module"]["graph"]["tensor_values"].values()))
        value["sizes"] = value["sizes"] + [{"as_int": 1}]
        return json.dumps(graph).encode()

    args = ("verify", "--artifacts", artifacts_copy, "--backends", "pt2", "--devices", "cpu", "--inputs", "8", "--json")
    _rewrite_record(path, "models/model.json", offsets)
    _refresh_manifest(artifacts_copy, "model.pt2")
    r = invoke(runner, *args)
    assert r.exit_code == 0 and json.loads(r.stdout)["rows"][0]["status"] == "pass", r.output
    _rewrite_record(path, "models/model.json", sizes)
    _refresh_manifest(artifacts_copy, "model.pt2")
    r = invoke(runner, *args)
    row = json.loads(r.stdout)["rows"][0]
    assert r.exit_code == 1 and row["status"] == "fail" and "models/model.json" in " ".join(row["problems"])


def test_a_pt2_graph_with_code_in_it_is_never_parsed(artifacts_copy, image_dir_pt2, runner):
    """torch's deserializer evaluates symbolic shape expressions: a file whose graph names code must not reach it."""
    path = artifacts_copy / "model.pt2"
    _rewrite_record(path, "models/model.json",
                    lambda data: data.replace(b"Symbol(", b"__import__('os').system('touch PWNED') or Symbol(", 1))
    _refresh_manifest(artifacts_copy, "model.pt2")
    r = invoke(runner, "predict", image_dir_pt2, "--model", path)
    assert r.exit_code == 2 and "models/model.json" in r.stderr
    assert not (artifacts_copy / "PWNED").exists() and not list(artifacts_copy.parent.rglob("PWNED"))


@pytest.fixture
def image_dir_pt2(tmp_path):
    from fcexport.data import load_dataset

    image = load_dataset("digits").test.images[0, 0].numpy()
    return save_png(tmp_path / "digit.png", (image * 255).round().astype(np.uint8))


def test_predict_runs_pt2_with_the_same_answers(exported_dir, image_dir_pt2, runner):
    answers = {}
    for name in ("model.pt2", "model.onnx"):
        r = invoke(runner, "predict", image_dir_pt2, "--model", exported_dir / name, "--json")
        assert r.exit_code == 0, r.output
        answers[name] = [(row["label"], round(row["probability"], 4)) for row in json.loads(r.stdout)]
    assert answers["model.pt2"] == answers["model.onnx"]


# ---- OpenVINO ----------------------------------------------------------------------------------


def test_openvino_verifies_the_same_model_onnx(exported_dir, runner):
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--backends", "onnxruntime,openvino", "--devices", "cpu,cuda", "--json")
    assert r.exit_code == 0, r.output
    rows = {(row["backend"], row["device"]): row for row in json.loads(r.stdout)["rows"]}
    assert rows[("openvino", "cpu")]["status"] == "pass" and rows[("openvino", "cpu")]["source"] == str(exported_dir / "model.onnx")
    assert rows[("openvino", "cuda")]["status"] == "skipped" and "cpu only" in rows[("openvino", "cuda")]["reason"]


def test_openvino_refuses_a_swapped_onnx_before_compiling_it(artifacts_copy, runner, monkeypatch):
    import onnx
    import openvino

    def must_not_compile(*args, **kwargs):
        raise AssertionError("a file that differs from a fresh export was compiled")

    monkeypatch.setattr(openvino.Core, "compile_model", must_not_compile)
    model = onnx.load(str(artifacts_copy / "model.onnx"))
    weight = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    (artifacts_copy / "model.onnx").write_bytes(model.SerializeToString())
    _refresh_manifest(artifacts_copy, "model.onnx")
    r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--backends", "openvino", "--devices", "cpu", "--json")
    row = json.loads(r.stdout)["rows"][0]
    assert r.exit_code == 1 and row["status"] == "fail" and "initializer" in " ".join(row["problems"])


def test_predict_takes_the_runtime_bench_measured_fastest_for_its_batch(exported_dir, image_dir_pt2, runner, tmp_path, monkeypatch):
    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path / "cache"))
    r = invoke(runner, "bench", "--artifacts", exported_dir, "--batch-sizes", "1,256", "--backends", "onnxruntime,openvino",
               "--warmup", "0", "--repeat", "2", "--json")
    assert r.exit_code == 0, r.output
    measured = {(row["backend"], row["batch_size"]): row["throughput"] for row in json.loads(r.stdout)}
    onnx_file = exported_dir / "model.onnx"
    for batch in (1, 256):
        fastest = max(("onnxruntime", "openvino"), key=lambda b: measured[(b, batch)])
        assert speeds.fastest_runtime(onnx_file, batch, "cpu") == registry.backend(fastest).runtime.name
    # Recorded the other way round, the choice follows the record.
    entries = json.loads(speeds.cache_file().read_text())
    for entry in entries:
        entry["throughput"] = 1.0 if entry["backend"] == "onnxruntime" else 2.0
    speeds.cache_file().write_text(json.dumps(entries))
    r = invoke(runner, "predict", image_dir_pt2, "--artifacts", exported_dir)
    assert r.exit_code == 0 and "(openvino" in r.stdout, r.output
    r = invoke(runner, "predict", image_dir_pt2, "--artifacts", exported_dir, "--runtime", "onnxruntime")
    assert r.exit_code == 0 and "(onnxruntime" in r.stdout, r.output


def test_a_runtime_that_cannot_run_the_file_is_a_clear_error(exported_dir, image_dir_pt2, runner):
    r = invoke(runner, "predict", image_dir_pt2, "--model", exported_dir / "model.onnx", "--runtime", "torchscript")
    assert r.exit_code == 2 and "onnxruntime, openvino" in r.stderr and "Traceback" not in r.output


def test_a_damaged_speed_record_is_ignored(exported_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path))
    (tmp_path / "speeds.json").write_text("{not json")
    assert speeds.fastest_runtime(exported_dir / "model.onnx", 1, "cpu") is None


# ---- hostile files for the new targets (found by an adversary run; each was a BAD before) ----------------------------


def _rewrite_archive(path, change) -> None:
    """Rewrite a zip archive record by record: change(info, data) -> [(ZipInfo, data, compress_type), ...]."""
    source = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            for new_info, data, compression in change(info, source.read(info)):
                target.writestr(new_info, data, compress_type=compression)
    path.write_bytes(out.getvalue())


@pytest.mark.parametrize("case", ["compressed record", "record outside the top folder", "class names changed"])
def test_a_hostile_pt2_is_refused_in_predict(artifacts_copy, image_dir_pt2, runner, case):
    path = artifacts_copy / "model.pt2"

    def change(info, data):
        if case == "compressed record" and info.filename.endswith("weights/weight_0"):
            return [(info, data, zipfile.ZIP_BZIP2)]
        if case == "record outside the top folder" and info.filename.endswith("weights/weight_0"):
            shadow = zipfile.ZipInfo("zzz/" + info.filename.split("/", 1)[1])
            return [(info, bytes(len(data)), zipfile.ZIP_STORED), (shadow, data, zipfile.ZIP_STORED)]
        if case == "class names changed" and info.filename.endswith("extra/metadata.json"):
            spec = json.loads(data)
            spec["class_names"] = [f"evil{i}" for i in range(len(spec["class_names"]))]
            return [(info, json.dumps(spec).encode(), zipfile.ZIP_STORED)]
        return [(info, data, zipfile.ZIP_STORED)]

    _rewrite_archive(path, change)
    _refresh_manifest(artifacts_copy, "model.pt2")
    r = invoke(runner, "predict", image_dir_pt2, "--model", path, "--json")
    expected = {"compressed record": "is compressed", "record outside the top folder": "outside one top folder",
                "class names changed": "model.pt2: it says otherwise than"}[case]
    assert r.exit_code == 2 and expected in r.stderr and "evil" not in r.stdout, r.output


def test_an_onnx_with_a_huge_fixed_batch_is_refused_before_any_runtime_sizes_it(artifacts_copy, image_dir_pt2, runner):
    import onnx

    model = onnx.load(str(artifacts_copy / "model.onnx"))
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    batch.Clear()
    batch.dim_value = 20_000_000
    (artifacts_copy / "model.onnx").write_bytes(model.SerializeToString())
    _refresh_manifest(artifacts_copy, "model.onnx")
    for runtime in ("openvino", "onnxruntime"):
        r = invoke(runner, "predict", image_dir_pt2, "--artifacts", artifacts_copy, "--runtime", runtime)
        assert r.exit_code == 2 and "batch is fixed at 20,000,000" in r.stderr, r.output


@pytest.mark.parametrize("content", ['[{"backend": ["x"], "sha256": [1]}]', "[" * 100_000 + "]" * 100_000, "fifo",
                                     " " * (3 << 20), "wrong runtime"])
def test_a_damaged_or_hostile_speed_cache_never_decides(exported_dir, image_dir_pt2, runner, tmp_path, monkeypatch, content):
    import os

    from fcexport.files import sha256_file

    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path))
    cache = tmp_path / "speeds.json"
    if content == "fifo":
        os.mkfifo(cache)  # a reader that opened it would wait for ever
    elif content == "wrong runtime":  # a record naming a backend that does not run model.onnx
        cache.write_text(json.dumps([{"sha256": sha256_file(exported_dir / "model.onnx"), "machine": speeds._machine(),
                                      "device": "cpu", "backend": "torchscript", "batch_size": 1, "throughput": 1e9}]))
    else:
        cache.write_text(content)
    r = invoke(runner, "predict", image_dir_pt2, "--artifacts", exported_dir)
    assert r.exit_code == 0 and ("(onnxruntime" in r.stdout or "(openvino" in r.stdout), r.output  # measured, not read


def test_predict_measures_the_runtimes_on_a_files_first_use_and_reads_the_record_after(exported_dir, image_dir_pt2, runner,
                                                                                      tmp_path, monkeypatch):
    """No fcx bench run: the first predict of a file times each exact runtime that runs it, records the speeds as
    bench does and runs with the fastest; the next predict reads the record and measures nothing."""
    from fcexport import timing

    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path))
    r = invoke(runner, "predict", image_dir_pt2, "--artifacts", exported_dir, "--json")
    assert r.exit_code == 0, r.output
    recorded = {e["backend"]: e["throughput"] for e in json.loads(speeds.cache_file().read_text())}
    assert set(recorded) == {"onnxruntime", "openvino"}
    chosen = max(recorded, key=recorded.get)
    assert f"({chosen}" in invoke(runner, "predict", image_dir_pt2, "--artifacts", exported_dir).stdout

    def must_not_measure(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(timing, "measure", must_not_measure)
    entries = json.loads(speeds.cache_file().read_text())
    for entry in entries:  # recorded the other way round, the choice follows the record
        entry["throughput"] = 2.0 if entry["backend"] != chosen else 1.0
    speeds.cache_file().write_text(json.dumps(entries))
    other = next(b for b in recorded if b != chosen)
    r = invoke(runner, "predict", image_dir_pt2, "--artifacts", exported_dir)
    assert r.exit_code == 0 and f"({other}" in r.stdout, r.output


def test_empty_choices_are_usage_errors(exported_dir, runner):
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--backends", ",")
    assert r.exit_code == 2 and "--backends" in r.stderr or "backends takes" in r.stderr, r.output
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--backends", "all", "--devices", "cpu", "--json")
    assert r.exit_code == 0 and len(json.loads(r.stdout)["rows"]) == len(registry.verified_by_default()) - 1  # all but the reference


# ---- fcx inspect ----------------------------------------------------------------------------------------------------


def test_inspect_shows_every_file_of_a_folder_without_running_it(artifacts_copy, runner, monkeypatch):
    import onnxruntime
    import torch

    def must_not_run(*args, **kwargs):
        raise AssertionError("inspect loaded a model to run it")

    monkeypatch.setattr(torch.jit, "load", must_not_run)
    monkeypatch.setattr(onnxruntime, "InferenceSession", must_not_run)
    (artifacts_copy / "model.ts").write_bytes((artifacts_copy / "model.ts").read_bytes()[:-1] + b"!")  # changed after export
    r = invoke(runner, "inspect", artifacts_copy, "--json")
    assert r.exit_code == 0, r.output
    files = {Path(f["file"]).name: f for f in json.loads(r.stdout)["files"]}
    assert set(files) == {"model.pt", "model.fused.pt", "model.ts", "model.onnx", "model.pt2", "reference.npz"}
    assert files["reference.npz"]["details"]["inputs"] == 256 and files["reference.npz"]["spec"]["input_shape"] == [1, 8, 8]
    assert files["model.onnx"]["manifest"] == "matches, made from this model.pt"
    assert files["model.onnx"]["details"]["inputs"] == {"pixels": ["batch", 1, 8, 8]}
    assert files["model.onnx"]["spec"]["provenance"]["fused"] is True and files["model.pt"]["details"]["parameters"] > 0
    assert "changed after it was written" in files["model.ts"]["manifest"]
    r = invoke(runner, "inspect", artifacts_copy / "model.pt2")
    assert r.exit_code == 0 and "torch.export" not in r.stderr and "pt2" in r.stdout


def test_inspect_of_an_unreadable_file_is_exit_2(tmp_path, runner):
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    r = invoke(runner, "inspect", tmp_path / "model.onnx")
    assert r.exit_code == 2 and "not a valid ONNX model" in r.stderr and "Traceback" not in r.output


def test_openvino_bf16_is_judged_as_approximate_and_never_picked_unasked(exported_dir, image_dir_pt2, runner, tmp_path, monkeypatch):
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--backends", "openvino-bf16", "--devices", "cpu", "--json")
    [row] = json.loads(r.stdout)["rows"]
    if row["status"] == "skipped":
        assert "cannot compute in bf16" in row["reason"] and r.exit_code == 1
    else:
        assert row["criterion"] == "agreement" and row["status"] == "pass" and r.exit_code == 0, r.output
    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path))
    from fcexport.files import sha256_file

    entries = [{"sha256": sha256_file(exported_dir / "model.onnx"), "machine": speeds._machine(), "device": "cpu",
                "backend": backend, "batch_size": 1, "throughput": speed} for backend, speed in (("openvino-bf16", 1e9), ("openvino", 2.0), ("onnxruntime", 1.0))]
    (tmp_path / "speeds.json").write_text(json.dumps(entries))
    assert speeds.fastest_runtime(exported_dir / "model.onnx", 1, "cpu") == "openvino"  # the fastest exact one


def test_a_new_exporter_with_files_in_a_sub_folder(artifacts_copy, runner, tmp_path, monkeypatch):
    """An exporter outside fcexport writing copies/model.onnx, and a runtime for it: exported, listed in the manifest
    by its relative path, verified, and caught when the file changes."""
    source = ("from fcexport.files import write_bytes_atomic\n"
              "from fcexport.onnx_checks import onnx_fingerprint\n"
              "from fcexport.targets import Exporter, Runtime\n"
              "from fcexport.targets import onnx, onnxruntime\n"
              "def write(program, spec, stage, settings):\n"
              "    write_bytes_atomic(stage / 'copies' / 'model.onnx', onnx.onnx_bytes(program, spec, settings.opset))\n"
              "EXPORTER = Exporter(name='copy', files=('copies/model.onnx',), format='onnx', write=write,\n"
              "                    fingerprint=onnx_fingerprint, summary='model.onnx in a sub-folder', by_default=False)\n"
              "RUNTIME = Runtime(name='ort-copy', format='onnx', devices=('cpu',), open=onnxruntime.open_onnx,\n"
              "                  runs={'ort-copy': 'copy'}, summary='onnxruntime on the copy')\n")
    with plugin_registered(monkeypatch, tmp_path, "copy_plugin", source):
        r = invoke(runner, "export", "--artifacts", artifacts_copy, "--format", "copy", "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["written"] == [str(artifacts_copy / "copies" / "model.onnx")], r.output
        entry = json.loads((artifacts_copy / "manifest.json").read_text())["files"]["copies/model.onnx"]
        assert entry["bytes"] == (artifacts_copy / "copies" / "model.onnx").stat().st_size
        r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--backends", "ort-copy", "--devices", "cpu", "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["rows"][0]["status"] == "pass", r.output
        copy = artifacts_copy / "copies" / "model.onnx"
        copy.write_bytes(copy.read_bytes() + b"\0")
        r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--backends", "ort-copy", "--devices", "cpu", "--json")
        row = json.loads(r.stdout)["rows"][0]
        assert r.exit_code == 1 and "copies/model.onnx changed after it was written" in " ".join(row["problems"])
