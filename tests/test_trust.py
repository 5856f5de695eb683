"""Verification you can trust: tampered artifacts fail, sets stay consistent, writes fail cleanly, modes are usual.

Every tampered file is built here, the way an adversary would: with the manifest updated to match
where that makes the attack harder to see.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import invoke, save_png
from onnx import numpy_helper

from fcexport.artifacts import record_in_manifest
from fcexport.files import sha256_file
from fcexport.spec import RANDOM_INPUTS


def rewrite_onnx(folder: Path, change, refresh_manifest: bool = True) -> None:
    """Apply `change(model)` to model.onnx; with refresh_manifest the manifest is updated to match."""
    path = folder / "model.onnx"
    model = onnx.load(str(path))
    change(model)
    path.write_bytes(model.SerializeToString())
    if refresh_manifest:
        source = json.loads((folder / "manifest.json").read_text())["files"]["model.onnx"]["source_sha256"]
        record_in_manifest(folder, {"model.onnx": source}, {}, "tampered")


def verify_json(runner, folder: Path, tmp_path: Path, *extra):
    out = tmp_path / "report.json"
    r = invoke(runner, "verify", "--artifacts", folder, "--backends", "onnxruntime", "--devices", "cpu", "--json-file", out, *extra)
    return r, json.loads(out.read_text())["rows"][0]


def add_backdoor_unit(model: onnx.ModelProto) -> None:
    """One more first-layer unit that fires only on a checkerboard, and pushes class 3 when it does."""
    inits = {t.name: t for t in model.graph.initializer}
    w1, b1 = numpy_helper.to_array(inits["fc1.weight"]), numpy_helper.to_array(inits["fc1.bias"])
    head = numpy_helper.to_array(inits["head.weight"])
    trigger = (np.indices((8, 8)).sum(0) % 2).ravel().astype(np.float32)  # checkerboard on 8x8 pixels
    row = (trigger * 2 - 1) * 10.0  # +10 on the lit squares, -10 on the others
    bias = -(row @ trigger) + 1.0  # > 0 only when (nearly) exactly the trigger is shown
    column = np.zeros((head.shape[0], 1), np.float32)
    column[3] = 1000.0
    for name, value in (("fc1.weight", np.vstack([w1, row])), ("fc1.bias", np.append(b1, bias).astype(np.float32)),
                        ("head.weight", np.hstack([head, column]))):
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    del model.graph.value_info[:]  # the recorded intermediate shapes would give the extra unit away to ORT


def test_a_backdoor_unit_that_samples_never_trigger_fails_verification(artifacts_copy, runner, tmp_path):
    rewrite_onnx(artifacts_copy, add_backdoor_unit)
    from fcexport.registry import open_predictor

    predictor = open_predictor(artifacts_copy / "model.onnx")
    trigger = (np.indices((8, 8)).sum(0) % 2).astype(np.float32)[None, None]
    assert predictor(trigger).argmax() == 3  # the backdoor works ...
    r, row = verify_json(runner, artifacts_copy, tmp_path)
    assert r.exit_code == 1 and row["status"] == "fail"
    assert any("initializer 'fc1.weight' (float [32, 64])" in p and "is missing" in p for p in row["problems"]), row["problems"]
    assert any("initializer 'fc1.weight' (float [33, 64])" in p and "is extra" in p for p in row["problems"])
    assert any("fresh export of model.pt" in p for p in row["problems"])
    assert "FAIL onnxruntime on cpu" in r.stdout


def same_numbers(folder: Path, original: Path) -> bool:
    """The tampered model.onnx computes what the exported one does (so only the structure or spec check can
    catch it); verify itself never runs a file that fails those."""
    from fcexport.registry import open_predictor

    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    return np.allclose(open_predictor(folder / "model.onnx")(x), open_predictor(original / "model.onnx")(x), atol=1e-5)


def test_swapped_class_names_and_changed_object_fill_fail(artifacts_copy, exported_dir, runner, tmp_path):
    def swap(model):
        props = {p.key: p for p in model.metadata_props}
        names = json.loads(props["class_names"].value)
        names[3], names[5] = names[5], names[3]
        props["class_names"].value = json.dumps(names)
        pre = json.loads(props["preprocess"].value)
        pre["object_fill"] = 0.5
        props["preprocess"].value = json.dumps(pre)

    rewrite_onnx(artifacts_copy, swap)
    r, row = verify_json(runner, artifacts_copy, tmp_path)
    assert r.exit_code == 1 and row["status"] == "fail" and "not loaded" in row["reason"]
    assert same_numbers(artifacts_copy, exported_dir)  # the numbers agree: only the spec check can catch it
    assert "its class_names differs from model.pt's" in row["problems"] and "its preprocess differs from model.pt's" in row["problems"]


def test_an_export_made_where_fcexport_lives_elsewhere_verifies(artifacts_copy, exported_dir, runner, tmp_path, monkeypatch):
    """torch's exporter documents each node with the exporting source's path and line; fcexport leaves that out of
    its files, and out of the fingerprint, so a file exported by fcexport installed elsewhere, or by an older
    checkout whose lines sit elsewhere, is the honest file it is. A changed attribute beside it still fails."""
    assert b"fcexport/program.py" not in (exported_dir / "model.onnx").read_bytes()  # no install path in the file

    def documented_elsewhere(model):
        for i, node in enumerate(model.graph.node):
            node.metadata_props.add(key="pkg.torch.onnx.stack_trace", value=f'File "/elsewhere/fcexport/program.py", line {700 + i}')
            node.doc_string = "exported on another machine"
        model.graph.input[0].metadata_props.add(key="pkg.torch.onnx.original_node_name", value="x")

    monkeypatch.setenv("FCX_FRESH", "1")  # compared with an export made now, not a recorded fingerprint
    rewrite_onnx(artifacts_copy, documented_elsewhere)
    r, row = verify_json(runner, artifacts_copy, tmp_path)
    assert r.exit_code == 0 and row["status"] == "pass", row

    def scaled_gemm(model):
        gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
        gemm.attribute.append(onnx.helper.make_attribute("alpha", 1.001))

    rewrite_onnx(artifacts_copy, scaled_gemm)
    r, row = verify_json(runner, artifacts_copy, tmp_path)
    assert r.exit_code == 1 and row["status"] == "fail" and any("Gemm" in p for p in row["problems"]), row


def test_bytes_edited_after_export_fail_integrity(artifacts_copy, runner, tmp_path):
    rewrite_onnx(artifacts_copy, lambda m: setattr(m, "doc_string", "harmless looking edit"), refresh_manifest=False)
    r, row = verify_json(runner, artifacts_copy, tmp_path)
    assert r.exit_code == 1 and row["problems"] == ["model.onnx changed after it was written (its sha256 differs from manifest.json): not loaded"]
    image = save_png(tmp_path / "x.png", np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8))
    r = invoke(runner, "predict", image, "--artifacts", artifacts_copy)
    assert r.exit_code == 2 and "model.onnx changed after it was written" in r.stderr and "not loaded" in r.stderr
    assert "fcx export" in r.stderr and "Traceback" not in r.stderr


def test_an_artifact_missing_from_the_manifest_fails(artifacts_copy, runner, tmp_path):
    manifest = json.loads((artifacts_copy / "manifest.json").read_text())
    del manifest["files"]["model.onnx"]
    (artifacts_copy / "manifest.json").write_text(json.dumps(manifest))
    r, row = verify_json(runner, artifacts_copy, tmp_path)
    assert r.exit_code == 1 and "not listed in manifest.json" in row["problems"][0]


@pytest.mark.parametrize("code, expected", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")])
def test_export_write_errors_exit_2_and_keep_the_previous_set(artifacts_copy, runner, monkeypatch, code, expected):
    import fcexport.files

    before = {p.name: sha256_file(p) for p in artifacts_copy.iterdir() if p.is_file()}

    def failing_write(f, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcexport.files, "_write_all", failing_write)
    r = invoke(runner, "export", "--artifacts", artifacts_copy)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot write" in lines[0] and expected in lines[0], lines
    assert {p.name: sha256_file(p) for p in artifacts_copy.iterdir() if p.is_file()} == before
    assert not [p for p in artifacts_copy.iterdir() if p.name.startswith(".")]  # no temp files, no staging folder


def test_output_paths_that_are_files_or_folders_exit_2(artifacts_copy, runner, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = invoke(runner, "export", artifacts_copy / "model.pt", "--artifacts", blocker)
    assert r.exit_code == 2 and "a file is in the way" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = invoke(runner, "fuse-bn", artifacts_copy / "model.pt", "--out", tmp_path)
    assert r.exit_code == 2 and "a folder has that name" in r.stderr


def test_files_get_the_usual_mode_and_keep_it_on_reexport(artifacts_copy):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for umask, mode in ((0o027, 0o640), (0o022, 0o644)):
        subprocess.run([sys.executable, "-m", "cli.main", "export", "--artifacts", str(artifacts_copy), "--format", "onnx"],
                       check=True, env=env, capture_output=True, preexec_fn=lambda u=umask: os.umask(u))
        for name in ("model.onnx", "manifest.json"):
            assert (artifacts_copy / name).stat().st_mode & 0o777 == mode, (name, oct(umask))


def test_fuse_bn_refuses_to_overwrite_its_input(artifacts_copy, runner):
    before = sha256_file(artifacts_copy / "model.pt")
    r = invoke(runner, "fuse-bn", "--artifacts", artifacts_copy, "--out", artifacts_copy / "model.pt")
    assert r.exit_code == 2 and "would overwrite its own source" in r.stderr
    assert sha256_file(artifacts_copy / "model.pt") == before


@pytest.mark.parametrize("option, value", [("--atol", "inf"), ("--atol", "nan"), ("--rtol", "-1")])
def test_unbounded_tolerances_are_refused(exported_dir, runner, option, value):
    r = invoke(runner, "verify", "--artifacts", exported_dir, option, value)
    assert r.exit_code == 2 and "must be finite and >= 0" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_verify_on_an_absent_device_says_nothing_ran(exported_dir, runner):
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--devices", "cuda")
    assert r.exit_code == 1 and "nothing was verified: every candidate was skipped" in r.stderr
    assert "PASSED" not in r.stdout and "no CUDA device here" in r.stdout
    assert r.stdout.count("no CUDA device here") == 1  # one line for every backend it stops


def add_dormant_branch(model: onnx.ModelProto) -> None:
    """An int8 initializer turned into floats by Cast, and a Constant(value_floats), added to the logits as
    zeros: the numbers do not move, so only the structure check can see the extra weights."""
    graph = model.graph
    output = graph.output[0].name
    producer = next(n for n in graph.node if output in n.output)
    producer.output[list(producer.output).index(output)] = "honest_logits"
    graph.initializer.append(numpy_helper.from_array(np.zeros((1, 10), np.int8), "dormant_int8"))
    graph.node.extend([
        onnx.helper.make_node("Cast", ["dormant_int8"], ["dormant_float"], to=onnx.TensorProto.FLOAT),
        onnx.helper.make_node("Constant", [], ["dormant_scale"], value_floats=[0.0]),
        onnx.helper.make_node("Mul", ["dormant_float", "dormant_scale"], ["dormant"]),
        onnx.helper.make_node("Add", ["honest_logits", "dormant"], [output]),
    ])


def test_weights_of_any_dtype_behind_a_cast_fail_structure_while_numbers_pass(artifacts_copy, exported_dir, runner, tmp_path):
    rewrite_onnx(artifacts_copy, add_dormant_branch)
    r, row = verify_json(runner, artifacts_copy, tmp_path)
    assert r.exit_code == 1 and row["status"] == "fail"
    assert same_numbers(artifacts_copy, exported_dir)  # the numbers alone would pass, so it is not run at all
    problems = " ".join(row["problems"])
    assert "initializer 'dormant_int8' (int8 [1, 10])" in problems and "(Cast" in problems and "(Constant" in problems


def test_a_damaged_artifact_is_refused_before_it_is_loaded(artifacts_copy, runner, tmp_path, monkeypatch):
    import onnxruntime
    import torch

    def must_not_load(*args, **kwargs):
        raise AssertionError("a file that fails its integrity check was loaded")

    monkeypatch.setattr(torch.jit, "load", must_not_load)
    monkeypatch.setattr(onnxruntime, "InferenceSession", must_not_load)
    (artifacts_copy / "model.ts").write_bytes(b"PK\x03\x04junk")
    (artifacts_copy / "model.onnx").write_bytes((artifacts_copy / "model.onnx").read_bytes()[:100])
    out = tmp_path / "r.json"
    r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--backends", "torchscript,onnxruntime", "--devices", "cpu",
               "--json-file", out)
    assert r.exit_code == 1, r.output
    rows = json.loads(out.read_text())["rows"]
    assert [row["status"] for row in rows] == ["fail", "fail"]
    assert all("changed after it was written" in " ".join(row["problems"]) for row in rows)
    assert "not loaded" in r.stdout


def test_export_vouches_only_for_the_model_pt_bytes_it_loaded(tmp_path, trained_dir, runner, monkeypatch):
    """model.pt replaced while export runs: the manifest names the bytes that were exported, so the swap shows."""
    import shutil

    import fcexport
    import fcexport.checkpoint as checkpoint
    from torch import nn

    folder = Path(shutil.copytree(trained_dir, tmp_path / "a"))
    fcexport.import_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (1, 8, 8), artifacts=tmp_path / "other")
    exported_sha = sha256_file(folder / "model.pt")
    real = checkpoint.read_model

    def read_then_swap(path):
        stored = real(path)
        shutil.copy(tmp_path / "other" / "model.pt", path)  # another model.pt lands mid-export
        return stored

    monkeypatch.setattr(checkpoint, "read_model", read_then_swap)
    fcexport.export(folder / "model.pt", folder, formats=("onnx",))
    monkeypatch.undo()
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert files["model.onnx"]["source_sha256"] == exported_sha and files["model.pt"]["sha256"] == exported_sha
    image = save_png(tmp_path / "x.png", np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8))
    r = invoke(runner, "predict", image, "--artifacts", folder)
    assert r.exit_code == 2 and "model.onnx was made from another model.pt" in r.output, r.output


def test_a_torchscript_file_that_is_not_a_fresh_export_is_never_loaded(artifacts_copy, runner, monkeypatch):
    """TorchScript is code (forward, __setstate__): a model.ts with a loop, its manifest entry refreshed and the
    real spec copied in, is refused from its bytes alone; torch.jit.load is never called."""
    import zipfile

    class Loops(torch.nn.Module):
        def forward(self, x):
            while True:
                x = x + 1
            return x

    spec = zipfile.ZipFile(artifacts_copy / "model.ts").read("archive/extra/metadata.json").decode()
    with pytest.warns(FutureWarning):
        torch.jit.save(torch.jit.script(Loops()), str(artifacts_copy / "model.ts"), _extra_files={"metadata.json": spec})
    source = json.loads((artifacts_copy / "manifest.json").read_text())["files"]["model.ts"]["source_sha256"]
    record_in_manifest(artifacts_copy, {"model.ts": source}, {}, "tampered")

    def must_not_load(*args, **kwargs):
        raise AssertionError("a TorchScript file that differs from a fresh export was loaded")

    monkeypatch.setattr(torch.jit, "load", must_not_load)
    r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--backends", "torchscript", "--devices", "cpu", "--json")
    assert r.exit_code == 1, r.output
    row = json.loads(r.stdout)["rows"][0]
    assert row["status"] == "fail" and "not loaded" in row["reason"]
    assert any("record 'code/" in p for p in row["problems"]), row["problems"]


def test_a_model_onnx_of_another_model_is_a_clear_failure(artifacts_copy, tmp_path, runner):
    """Another model's model.onnx (28x28 input) with the manifest refreshed: exit 1 naming the spec, not exit 3."""
    import shutil

    import fcexport

    other = tmp_path / "other"
    fcexport.import_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), (1, 28, 28), artifacts=other)
    fcexport.export(other / "model.pt", other, formats=("onnx",))
    shutil.copy(other / "model.onnx", artifacts_copy / "model.onnx")
    source = json.loads((artifacts_copy / "manifest.json").read_text())["files"]["model.onnx"]["source_sha256"]
    record_in_manifest(artifacts_copy, {"model.onnx": source}, {}, "swapped")
    r, row = verify_json(runner, artifacts_copy, tmp_path)
    assert r.exit_code == 1 and "its input_shape differs from model.pt's" in row["problems"], r.output


def test_verify_reads_each_artifact_once_and_checks_the_bytes_it_loads(exported_dir, monkeypatch):
    """No window between checking a file and loading it: the manifest check hashes the very bytes the runtime
    loads, and no file is read twice (model.pt once for the whole command)."""
    from collections import Counter

    import fcexport.artifacts as artifacts
    import fcexport.checkpoint as checkpoint
    import fcexport.targets as targets
    from fcexport.pipeline import verify

    reads, hashed = Counter(), []
    real_read, real_file = targets.read_bytes, checkpoint.read_file
    monkeypatch.setattr(targets, "read_bytes", lambda path, *limit: reads.update([Path(path).name]) or real_read(path, *limit))
    monkeypatch.setattr(checkpoint, "read_file", lambda path: reads.update([Path(path).name]) or real_file(path))
    monkeypatch.setattr(artifacts, "sha256_file", lambda path: hashed.append(Path(path).name))
    report = verify(exported_dir, backends=("fused", "torchscript", "pt2", "onnxruntime", "openvino"), devices=("cpu",))
    assert report.passed and not hashed
    assert reads == {"manifest.json": 1, "model.pt": 1, "model.fused.pt": 1, "model.ts": 1, "model.pt2": 1,
                     "model.onnx": 2, "reference.npz": 1}  # two runtimes; the reference checked against model.pt


def test_verify_recalls_what_export_wrote_and_exports_afresh_on_any_change(artifacts_copy, monkeypatch):
    """Export records its files' fingerprints as the fresh export they are (fcexport.machine_cache): verify then
    exports nothing again, and still refuses a changed file; another fcexport, or FCX_FRESH=1, exports afresh."""
    import fcexport
    from fcexport import machine_cache, pipeline

    fcexport.export(artifacts_copy / "model.pt", artifacts_copy)
    made = []
    real = pipeline._fresh_fingerprint
    monkeypatch.setattr(pipeline, "_fresh_fingerprint", lambda *a: made.append(a[1]) or real(*a))
    backends = ("onnxruntime", "torchscript", "pt2")
    assert fcexport.verify(artifacts_copy, backends, ("cpu",), inputs=64).passed and made == []

    rewrite_onnx(artifacts_copy, add_backdoor_unit)
    row = fcexport.verify(artifacts_copy, ("onnxruntime",), ("cpu",), inputs=64).to_json()["rows"][0]
    assert row["status"] == "fail" and any("fresh export of model.pt" in p for p in row["problems"]) and made == []

    monkeypatch.setenv("FCX_FRESH", "1")
    assert fcexport.verify(artifacts_copy, ("torchscript",), ("cpu",), inputs=64).passed and made == ["torchscript"]
    monkeypatch.delenv("FCX_FRESH")
    monkeypatch.setattr(machine_cache, "_source_digest", lambda: "an edited fcexport")
    assert fcexport.verify(artifacts_copy, ("pt2",), ("cpu",), inputs=64).passed and made == ["torchscript", "pt2"]


def test_verify_reuses_the_float64_answers_fuse_bn_verify_computed(artifacts_copy, monkeypatch, tmp_path):
    """The same inputs and the same model.pt give the same float64 answers: computed once on this machine, whatever
    command asks (the rows still run, and their errors are the same as with nothing recorded)."""
    import fcexport
    from fcexport.targets import program

    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path / "cache"))
    computed = []
    real = program.float64_logits
    monkeypatch.setattr(program, "float64_logits", lambda p, x, *a: computed.append(len(x)) or real(p, x, *a))
    first = fcexport.fuse(artifacts_copy / "model.pt", artifacts_copy / "model.fused.pt", verify=True, inputs=96)
    assert first.written and computed and sum(computed) >= 96
    fcexport.export(artifacts_copy / "model.pt", artifacts_copy, ["onnx", "reference"], check=False)  # its inputs: verify's
    computed.clear()
    recalled = fcexport.verify(artifacts_copy, ("onnxruntime",), ("cpu",), inputs=96).to_json()
    assert computed == []
    monkeypatch.setenv("FCX_FRESH", "1")
    fresh = fcexport.verify(artifacts_copy, ("onnxruntime",), ("cpu",), inputs=96).to_json()
    assert computed and recalled["rows"][0]["max_abs"] == fresh["rows"][0]["max_abs"]
    assert recalled["own_float32_error"] == pytest.approx(fresh["own_float32_error"], rel=0.5)


def test_export_writes_the_reference_from_the_answers_fuse_bn_verify_recorded(artifacts_copy, monkeypatch, tmp_path):
    """reference.npz's inputs are verify's random ones: after fuse-bn --verify, export recalls model.pt's float64
    answers on them instead of computing them again; with nothing recorded it computes the same numbers (model.pt's,
    not the folded program's: those differ by the float32 rounding of the folded weights)."""
    import fcexport
    from fcexport import parity
    from fcexport.targets import program, reference

    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path / "cache"))
    assert fcexport.fuse(artifacts_copy / "model.pt", artifacts_copy / "model.fused.pt", verify=True).written
    computed = []
    real = program.float64_logits
    monkeypatch.setattr(program, "float64_logits", lambda p, x, *a: computed.append(len(x)) or real(p, x, *a))
    fcexport.export(artifacts_copy / "model.pt", artifacts_copy, ["onnx", "reference"], check=False)
    assert RANDOM_INPUTS not in computed, computed
    recalled = np.load(artifacts_copy / reference.FILE)
    monkeypatch.setenv("FCX_FRESH", "1")
    fcexport.export(artifacts_copy / "model.pt", artifacts_copy, ["onnx", "reference"], check=False)
    assert RANDOM_INPUTS in computed
    fresh = np.load(artifacts_copy / reference.FILE)
    np.testing.assert_allclose(recalled["logits"], fresh["logits"], rtol=0, atol=1e-12)
    assert recalled["own_error"] == pytest.approx(fresh["own_error"], rel=1e-6)


def test_damaged_records_are_misses(tmp_path, monkeypatch):
    from fcexport import machine_cache

    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path))
    machine_cache.store_fingerprint("k", {"node 0": "abc"})
    assert machine_cache.load_fingerprint("k") == {"node 0": "abc"}
    for damaged in (b"[1, 2]", b'{"a": 1}', b"{not json", b"\xff" * 10):
        (machine_cache.folder("fingerprints") / "k.json").write_bytes(damaged)
        assert machine_cache.load_fingerprint("k") is None
    assert machine_cache.load_fingerprint("missing") is None
    x = np.random.default_rng(0).random((5, 3), dtype=np.float32)
    compute = lambda part: (part.astype(np.float64) * 2, np.full(len(part), 1e-7))  # noqa: E731
    first = machine_cache.answers("sha", (3,), x, compute)
    (entry,) = machine_cache.folder("answers").iterdir()
    assert np.array_equal(machine_cache.answers("sha", (3,), x[::-1], lambda part: 1 / 0)[0], first[0][::-1])  # all recalled
    for damaged in (b"PK\x03\x04junk", b"", b"\x93NUMPY"):
        entry.write_bytes(damaged)
        assert np.array_equal(machine_cache.answers("sha", (3,), x, compute)[0], first[0])
    import hashlib

    rows = np.frombuffer(b"".join(hashlib.sha256(r.tobytes()).digest() for r in x), dtype="S32")
    for logits, own in ((first[0][:, :2], first[1]), (first[0] * np.nan, first[1]), (first[0], first[1] * -1),
                        (first[0], first[1] * np.nan)):  # well-formed lies: another class count, NaN, a negative error
        with entry.open("wb") as f:
            np.savez(f, digests=rows, logits=logits, own=own)
        again = machine_cache.answers("sha", (3,), x, compute)  # a miss: computed again
        assert np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[1])

    monkeypatch.setenv("FCX_CACHE_DIR", str(tmp_path / "a file" / "cache"))
    (tmp_path / "a file").write_text("not a folder")
    machine_cache.store_fingerprint("k", {"node 0": "abc"})  # a cache that cannot be written is only slower
    assert machine_cache.answers("sha", (3,), x, compute)[0].shape == (5, 3)
