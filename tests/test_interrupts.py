"""Killing or interrupting `fcx` never leaves a broken artifact that loads; Ctrl-C keeps the best epoch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import bounded

from fcexport.checkpoint import load_model
from fcexport.files import atomic_path

FCX = [sys.executable, "-m", "cli.main"]
ROOT = Path(__file__).resolve().parents[1]


def start(*args: str) -> subprocess.Popen:
    """`fcx ARGS` under a CPU-time limit (helpers.bounded): every wait on it below ends, however busy the machine."""
    limit = bounded()

    def child():  # a pytest-xdist worker may ignore SIGINT, and a child inherits that: Ctrl-C must reach fcx
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        limit()

    return subprocess.Popen([*FCX, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=child)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until `proc` writes `path` (it cannot run forever: its CPU time is bounded)."""
    while not path.exists():
        assert proc.poll() is None, f"{path} never appeared: {proc.stderr.read()}"
        time.sleep(0.05)


def test_ctrl_c_stops_training_cleanly_and_keeps_the_best_epoch(tmp_path):
    proc = start("train", "--data", "digits", "--hidden", "16", "--epochs", "100000", "--artifacts", tmp_path, "-q")
    wait_for(tmp_path / "history.csv", proc)  # written after every epoch: at least one is done
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    _, spec = load_model(tmp_path / "model.pt")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["interrupted"] is True and 1 <= metrics["epochs_run"] < 100000
    assert spec.metrics["best_epoch"] == metrics["best_epoch"]


def test_sigkill_during_training_keeps_the_previous_run(tmp_path, exported_dir):
    shutil.copy(exported_dir / "model.pt", tmp_path / "model.pt")
    old = (tmp_path / "model.pt").read_bytes()
    proc = start("train", "--data", "digits", "--hidden", "16", "--epochs", "100000", "--artifacts", tmp_path, "-q")
    wait_for(tmp_path / "history.csv", proc)
    proc.kill()
    proc.wait()
    assert (tmp_path / "model.pt").read_bytes() == old  # the new run never finished: the old model stands
    load_model(tmp_path / "model.pt")
    assert (tmp_path / "history.csv").read_text().startswith("epoch,")  # whole, never half-written


def _staging(folder: Path) -> list[Path]:
    return [p for p in folder.glob(".staging.*") if p.is_dir()]


EXPORT_MOMENTS = {  # what has happened when the kill lands, seen from outside
    "staging folder made": lambda folder: bool(_staging(folder)),
    "a file finished in the stage": lambda folder: any(
        f.suffix != ".tmp" for stage in _staging(folder) for f in stage.iterdir() if not f.name.startswith(".")),
}


@pytest.mark.parametrize("moment", list(EXPORT_MOMENTS))
def test_sigkill_during_export_leaves_a_consistent_set(artifacts_copy, moment):
    """Export, and kill it at the moment named (polled every 2 ms): every file loads, and every file agrees with
    the manifest (the previous set stays whole until the new one is complete)."""
    from fcexport.artifacts import check_against_manifest, find_default_model, read_manifest
    from fcexport.files import sha256_file
    from fcexport.registry import open_predictor

    before = {p.name: sha256_file(p) for p in artifacts_copy.iterdir() if p.is_file()}
    proc = start("export", "--artifacts", artifacts_copy)
    while not EXPORT_MOMENTS[moment](artifacts_copy):
        assert proc.poll() is None, f"export ended before: {moment}"
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert {p.name: sha256_file(p) for p in artifacts_copy.iterdir() if p.is_file()} == before  # not one file touched
    for name in ("model.onnx", "model.ts", "model.pt"):
        open_predictor(artifacts_copy / name)  # raises if a half-written file were left in place
    manifest, model_sha = read_manifest(artifacts_copy), sha256_file(artifacts_copy / "model.pt")
    mixed = [check_against_manifest(artifacts_copy / n, manifest, model_sha) for n in ("model.onnx", "model.ts", "model.fused.pt")]
    assert not any(mixed), mixed
    # a kill can leave a hidden staging folder or temp file behind, never under a name anything loads ...
    assert find_default_model(artifacts_copy).name == "model.onnx"
    assert all(p.name.endswith(".tmp") or p.name.startswith(".staging.") for p in artifacts_copy.iterdir() if p.name.startswith("."))
    # ... and the next export removes it
    again = start("export", "--artifacts", artifacts_copy, "--format", "onnx")
    assert again.wait() == 0, again.stderr.read()
    assert not [p.name for p in artifacts_copy.iterdir() if p.name.startswith(".")]


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.onnx"]


def test_temp_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "model.onnx"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that has just exited: nobody is writing with it
    orphan = tmp_path / f".model.onnx.{dead.pid}.abc123.tmp"
    alive = tmp_path / f".model.onnx.{os.getpid()}.def456.tmp"  # a writer still running (this process)
    other = tmp_path / f".model.ts.{dead.pid}.ghi789.tmp"  # another target's: left to that target's next write
    for p in (orphan, alive, other):
        p.write_bytes(b"half")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert not orphan.exists() and alive.exists() and other.exists()
