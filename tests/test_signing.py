"""Trust that leaves the folder: a signature (OpenSSF Model Signing) or a manifest digest kept elsewhere tells
whether a copied folder is exactly what was exported, and nothing in a folder that fails is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from helpers import invoke
from test_trust import add_backdoor_unit, add_dormant_branch, rewrite_onnx

from fcexport.artifacts import record_in_manifest


def write_key_pair(folder: Path, name: str = "key", kind: str = "ec") -> tuple[Path, Path]:
    """A private key (PEM, PKCS8) and its public key (PEM), as `openssl ecparam ... -genkey` makes them."""
    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    return write_key_pair(tmp_path)


@pytest.fixture
def signed_copy(artifacts_copy, keys, runner) -> Path:
    r = invoke(runner, "sign", "--key", keys[0], "--artifacts", artifacts_copy)
    assert r.exit_code == 0, r.output
    return artifacts_copy


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fail the test if verify reads model.pt or opens any artifact."""
    import fcexport.checkpoint as checkpoint
    import fcexport.pipeline as pipeline
    import fcexport.registry as registry

    def must_not_load(*args, **kwargs):
        raise AssertionError("something in a folder that failed its signature or digest check was loaded")

    for module, name in ((checkpoint, "read_model"), (registry, "open_predictor"), (registry, "open_backend"), (pipeline, "open_backend")):
        monkeypatch.setattr(module, name, must_not_load)


def verify_trust(runner, folder: Path, *extra):
    r = invoke(runner, "verify", "--artifacts", folder, "--backends", "onnxruntime", "--devices", "cpu", "--json", *extra)
    return r, json.loads(r.stdout)


def test_a_signed_folder_copied_elsewhere_verifies(signed_copy, keys, runner, tmp_path):
    moved = Path(shutil.copytree(signed_copy, tmp_path / "somewhere" / "else"))
    r, report = verify_trust(runner, moved, "--public-key", keys[1])
    assert r.exit_code == 0, r.output
    assert report["trust"][0] == {"check": "signature", "status": "pass", "detail": report["trust"][0]["detail"]}
    assert [(c["check"], c["status"]) for c in report["trust"][1:]] == [("reference.npz", "pass")]  # checked with model.pt
    assert report["passed"] and report["rows"][0]["status"] == "pass"


@pytest.mark.parametrize("attack", ["backdoor_unit", "dormant_cast_branch", "extra_file", "removed_file", "other_key"])
def test_any_change_after_signing_fails_before_anything_is_loaded(attack, signed_copy, keys, runner, tmp_path, nothing_loaded):
    """The backdoors the structure check also catches, with the manifest refreshed to match, fail here first."""
    public = keys[1]
    if attack == "backdoor_unit":
        rewrite_onnx(signed_copy, add_backdoor_unit)
    elif attack == "dormant_cast_branch":
        rewrite_onnx(signed_copy, add_dormant_branch)
    elif attack == "extra_file":
        (signed_copy / "notes.txt").write_text("added after signing")
    elif attack == "removed_file":
        (signed_copy / "model.ts").unlink()
        record_in_manifest(signed_copy, {}, {}, "tampered")
    else:
        public = write_key_pair(tmp_path, "other")[1]
    r, report = verify_trust(runner, signed_copy, "--public-key", public)
    assert r.exit_code == 1, r.output
    assert report["trust"][0]["status"] == "fail" and not report["passed"] and report["rows"] == []
    detail = report["trust"][0]["detail"]
    expected = {"backdoor_unit": "model.onnx", "dormant_cast_branch": "manifest.json", "extra_file": "notes.txt",
                "removed_file": "model.ts", "other_key": "signature does not match"}[attack]
    assert expected in detail, detail
    assert "nothing in it was loaded" in r.stderr and "Traceback" not in r.output


def test_the_table_says_what_failed(signed_copy, keys, runner):
    (signed_copy / "notes.txt").write_text("added")
    r = invoke(runner, "verify", "--artifacts", signed_copy, "--public-key", keys[1])
    assert r.exit_code == 1 and "FAIL" in r.stdout and "notes.txt" in r.stdout and "FAILED" in r.stdout


def test_exporting_again_signs_again_or_removes_the_old_signature(signed_copy, keys, runner):
    r = invoke(runner, "export", "--artifacts", signed_copy, "--format", "onnx", "--sign-key", keys[0], "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["signature"].endswith("model.sig")
    assert verify_trust(runner, signed_copy, "--public-key", keys[1])[0].exit_code == 0
    r = invoke(runner, "export", "--artifacts", signed_copy, "--format", "onnx", "--json")
    assert r.exit_code == 0 and not (signed_copy / "model.sig").exists()  # it vouched for the previous set
    assert str(signed_copy / "model.sig") in json.loads(r.stdout)["removed"]
    r, report = verify_trust(runner, signed_copy, "--public-key", keys[1])
    assert r.exit_code == 1 and "no signature" in report["trust"][0]["detail"]


def test_a_folder_with_a_signature_says_it_was_not_checked_without_a_key(signed_copy, runner):
    r, report = verify_trust(runner, signed_copy)
    assert r.exit_code == 0 and report["trust"][0]["status"] == "skipped" and "no public key" in report["trust"][0]["detail"]


def test_sign_refuses_a_folder_that_does_not_match_its_manifest(artifacts_copy, keys, runner):
    rewrite_onnx(artifacts_copy, add_backdoor_unit, refresh_manifest=False)
    r = invoke(runner, "sign", "--key", keys[0], "--artifacts", artifacts_copy)
    assert r.exit_code == 2 and "model.onnx differs from its entry" in r.stderr and not (artifacts_copy / "model.sig").exists()


@pytest.mark.parametrize("key", ["missing", "garbage", "rsa", "public"])
def test_keys_that_cannot_sign_are_one_line_and_nothing_is_written(key, artifacts_copy, runner, tmp_path):
    before = {p.name: p.read_bytes() for p in artifacts_copy.iterdir()}
    path = {"missing": tmp_path / "absent.pem", "garbage": tmp_path / "g.pem",
            "rsa": write_key_pair(tmp_path, "rsa", "rsa")[0], "public": write_key_pair(tmp_path, "ec")[1]}[key]
    if key == "garbage":
        path.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    r = invoke(runner, "export", "--artifacts", artifacts_copy, "--sign-key", path)
    assert r.exit_code == 2, r.output
    assert str(path) in r.stderr and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in artifacts_copy.iterdir()} == before


def test_the_digest_printed_by_export_checks_a_copy(artifacts_copy, runner, tmp_path):
    r = invoke(runner, "export", "--artifacts", artifacts_copy, "--format", "onnx")
    assert r.exit_code == 0 and "manifest sha256 " in r.stdout
    digest = r.stdout.split("manifest sha256 ")[1].split()[0]
    r, report = verify_trust(runner, artifacts_copy, "--expect-digest", digest.upper())
    assert r.exit_code == 0 and report["trust"][0]["status"] == "pass"


@pytest.mark.parametrize("attack", ["refreshed_manifest", "listed_file_removed", "listed_file_changed"])
def test_a_digest_mismatch_fails_before_anything_is_loaded(attack, artifacts_copy, runner, nothing_loaded):
    import hashlib

    digest = hashlib.sha256((artifacts_copy / "manifest.json").read_bytes()).hexdigest()
    if attack == "refreshed_manifest":
        rewrite_onnx(artifacts_copy, add_backdoor_unit)
    elif attack == "listed_file_removed":
        (artifacts_copy / "model.ts").unlink()
    else:
        with open(artifacts_copy / "model.fused.pt", "ab") as f:
            f.write(b"\0")
    r, report = verify_trust(runner, artifacts_copy, "--expect-digest", digest)
    assert r.exit_code == 1 and report["trust"][0]["status"] == "fail", r.output
    expected = {"refreshed_manifest": "not the expected", "listed_file_removed": "model.ts is listed",
                "listed_file_changed": "model.fused.pt differs"}[attack]
    assert expected in report["trust"][0]["detail"]


def test_a_digest_that_is_not_a_sha256_is_refused(artifacts_copy, runner):
    r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--expect-digest", "abc")
    assert r.exit_code == 2 and "64 hex digits" in r.stderr


def test_the_int8_model_is_compared_with_a_fresh_int8_export(int8_dir, runner, tmp_path):
    """The same dormant branch in model.int8.onnx, manifest refreshed: its structure check fails the row."""
    folder = Path(shutil.copytree(int8_dir, tmp_path / "int8"))
    path = folder / "model.int8.onnx"
    model = onnx.load(str(path))
    add_dormant_branch(model)
    path.write_bytes(model.SerializeToString())
    source = json.loads((folder / "manifest.json").read_text())["files"]["model.int8.onnx"]["source_sha256"]
    record_in_manifest(folder, {"model.int8.onnx": source}, {}, "tampered")
    r = invoke(runner, "verify", "--artifacts", folder, "--backends", "onnxruntime-int8", "--devices", "cpu", "--json")
    assert r.exit_code == 1, r.output
    row = json.loads(r.stdout)["rows"][0]
    assert row["status"] == "fail" and "dormant_int8" in " ".join(row["problems"])


def test_signing_with_a_key_inside_a_git_work_tree_warns(artifacts_copy, tmp_path, runner):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    key, _ = write_key_pair(project)
    r = invoke(runner, "sign", "--key", key, "--artifacts", artifacts_copy)
    assert r.exit_code == 0, r.output
    assert "inside the git work tree" in r.stderr and str(project) in r.stderr and "~/.config/fcx/" in r.stderr
    outside, _ = write_key_pair(tmp_path, "outside")
    r = invoke(runner, "sign", "--key", outside, "--artifacts", artifacts_copy)
    assert r.exit_code == 0 and "warning" not in r.stderr


def test_the_repository_ignores_keys_and_artifacts():
    ignored = (Path(__file__).parents[1] / ".gitignore").read_text().split()
    assert {"*.pem", "*.key", "artifacts/"} <= set(ignored)
