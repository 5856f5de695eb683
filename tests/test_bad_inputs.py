"""Every command, every bad input: exit 2 (1 only for failed verification), one line naming the file, no traceback.

Each case builds its bad file in a fresh folder next to a good artifacts folder, runs the CLI, and checks
the exit code, that stderr is a single line mentioning what it should, and that nothing good was damaged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke, save_png


def copy(path: Path, folder: Path) -> Path:
    """The file, copied into a folder without a manifest (a file of the user's own)."""
    return Path(shutil.copy(path, folder / path.name))


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_nan_checkpoint(folder: Path) -> Path:
    checkpoint = torch.load(folder / "model.pt", weights_only=True)
    checkpoint["tensors"]["fc1.weight"][0, 0] = float("nan")
    path = folder / "nan.pt"
    torch.save(checkpoint, path)
    return path


def make_other_architecture(folder: Path) -> Path:
    checkpoint = torch.load(folder / "model.pt", weights_only=True)
    program = json.loads(checkpoint["program"])
    program["tensors"]["fc1.weight"]["shape"] = [64, 64]  # the weights are (32, 64)
    checkpoint["program"] = json.dumps(program)
    path = folder / "other.pt"
    torch.save(checkpoint, path)
    return path


def make_bare_state_dict(folder: Path) -> Path:
    path = folder / "bare.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    return path


def make_pickle_payload(folder: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    path = folder / "evil.pt"
    torch.save({"format": "fcexport.checkpoint", "x": Payload()}, path)
    return path


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def foreign_onnx(folder: Path) -> Path:
    """A valid ONNX model from elsewhere: no fcexport metadata."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])])
    path = folder / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


# (case id, make(artifacts, scratch) -> argv list, text expected in the one error line)
CASES = [
    ("train: missing csv", lambda a, s: ["train", "--data", s / "none.csv", "--artifacts", a], "none.csv: file not found"),
    ("train: empty csv", lambda a, s: ["train", "--data", write(s, "e.csv", b""), "--artifacts", a], "e.csv: the file is empty"),
    ("train: csv bad row", lambda a, s: ["train", "--data", write(s, "b.csv", b"1,0,0,0,0\n2,0,0,0,0\n1,0,x,0,0\n"), "--artifacts", a], "b.csv: line 3"),
    ("train: csv column count", lambda a, s: ["train", "--data", write(s, "c.csv", b"1,0,0,0,0\n2,0,0\n"), "--artifacts", a], "c.csv: line 2 has 3 columns"),
    ("train: binary csv", lambda a, s: ["train", "--data", write(s, "bin.csv", bytes(range(256)) * 4), "--artifacts", a], "bin.csv"),
    ("train: unknown dataset", lambda a, s: ["train", "--data", "cifar", "--artifacts", a], "unknown dataset 'cifar'"),
    ("train: negative epochs", lambda a, s: ["train", "--data", "digits", "--epochs", "-3", "--artifacts", a], "epochs must be >= 1"),
    ("train: zero batch size", lambda a, s: ["train", "--data", "digits", "--batch-size", "0", "--artifacts", a], "batch size must be >= 1"),
    ("train: bad hidden", lambda a, s: ["train", "--data", "digits", "--hidden", "12,x", "--artifacts", a], "--hidden"),
    ("train: empty folder", lambda a, s: ["train", "--data", s, "--artifacts", a], "expected at least 2 class sub-folders"),
    ("fuse-bn: missing checkpoint", lambda a, s: ["fuse-bn", s / "nope.pt", "--out", s / "f.pt"], "nope.pt: file not found"),
    ("fuse-bn: empty checkpoint", lambda a, s: ["fuse-bn", write(s, "empty.pt", b""), "--out", s / "f.pt"], "empty.pt: file is empty"),
    ("fuse-bn: truncated checkpoint", lambda a, s: ["fuse-bn", truncate(Path(shutil.copy(a / "model.pt", s / "t.pt"))), "--out", s / "f.pt"], "t.pt: corrupt or truncated"),
    ("fuse-bn: text as checkpoint", lambda a, s: ["fuse-bn", write(s, "notes.pt", b"hello world"), "--out", s / "f.pt"], "notes.pt: corrupt or truncated"),
    ("fuse-bn: pickle payload", lambda a, s: ["fuse-bn", make_pickle_payload(s), "--out", s / "f.pt"], "evil.pt: refused"),
    ("fuse-bn: other architecture", lambda a, s: ["fuse-bn", make_other_architecture(s if False else a), "--out", s / "f.pt"], "other.pt: tensor 'fc1.weight' is float32 [32, 64] but the program declares"),
    ("fuse-bn: another tool's file", lambda a, s: ["fuse-bn", make_bare_state_dict(s), "--out", s / "f.pt"], "bare.pt: not an fcexport model"),
    ("fuse-bn: NaN weights", lambda a, s: ["fuse-bn", make_nan_checkpoint(a), "--out", s / "f.pt"], "nan.pt: tensor 'fc1.weight' holds NaN"),
    ("fuse-bn: negative tolerance", lambda a, s: ["fuse-bn", a / "model.pt", "--out", s / "f.pt", "--verify", "--atol", "-1"], "atol and rtol must be finite and >= 0"),
    ("export: NaN weights", lambda a, s: ["export", make_nan_checkpoint(a), "--artifacts", s], "nan.pt: tensor 'fc1.weight' holds NaN"),
    ("export: bad format", lambda a, s: ["export", "--artifacts", a, "--format", "tflite"], "formats are torchscript, onnx, int8, int8-static, pt2"),
    ("export: opset too low", lambda a, s: ["export", a / "model.pt", "--artifacts", s, "--format", "pt2", "--opset", "16"], "opset must be from 17"),
    ("export: missing checkpoint", lambda a, s: ["export", "--artifacts", s], "model.pt: file not found"),
    ("verify: folder without model.pt", lambda a, s: ["verify", "--artifacts", s], "model.pt: file not found"),
    ("verify: negative tolerance", lambda a, s: ["verify", "--artifacts", a, "--rtol", "-0.1"], "atol and rtol must be finite and >= 0"),
    ("verify: int8 agreement above 1", lambda a, s: ["verify", "--artifacts", a, "--int8-agreement", "99"], "int8 agreement and max drop must be in [0, 1]"),
    ("verify: unknown backend", lambda a, s: ["verify", "--artifacts", a, "--backends", "tensorrt"], "backends takes"),
    ("verify: data of another shape", lambda a, s: ["verify", "--artifacts", a, "--data", write(s, "x.csv", b"1," + b",".join([b"0"] * 16) + b"\n0," + b",".join([b"9"] * 16) + b"\n")], "the model expects [1, 8, 8]"),
    ("predict: missing image", lambda a, s: ["predict", s / "cat.png", "--artifacts", a], "cat.png: file not found"),
    ("predict: text named .png", lambda a, s: ["predict", write(s, "fake.png", b"not an image"), "--artifacts", a], "fake.png: not a readable image"),
    ("predict: 1x1 image", lambda a, s: ["predict", save_png(s / "dot.png", np.zeros((1, 1), np.uint8)), "--artifacts", a], "dot.png: 1x1 pixels is too small"),
    ("predict: 10000x10000 image", lambda a, s: ["predict", huge_png(s), "--artifacts", a], "huge.png: 10000x10000 pixels is too large"),
    ("predict: truncated onnx in its folder", lambda a, s: ["predict", a / "samples", "--model", truncate(a / "model.onnx")],
     "not loaded: model.onnx changed after it was written (its sha256 differs from manifest.json); run `fcx export`"),
    ("predict: truncated onnx of one's own", lambda a, s: ["predict", a / "samples", "--model", truncate(copy(a / "model.onnx", s))],
     "model.onnx: not a valid ONNX model"),
    ("predict: onnx from elsewhere", lambda a, s: ["predict", a / "samples", "--model", foreign_onnx(s)], "foreign.onnx: ONNX model lacks fcexport metadata"),
    ("predict: unknown model format", lambda a, s: ["predict", a / "samples", "--model", write(s, "m.h5", b"x")], "m.h5: unknown model format"),
    ("predict: empty artifacts", lambda a, s: ["predict", a / "samples", "--artifacts", s], "no model found"),
    ("predict: folder without images", lambda a, s: ["predict", s, "--artifacts", a], "folder holds no images"),
    ("predict: top-k zero", lambda a, s: ["predict", a / "samples", "--artifacts", a, "--top-k", "0"], "--top-k must be >= 1"),
    ("predict: bad invert", lambda a, s: ["predict", a / "samples", "--artifacts", a, "--invert", "maybe"], "invert must be one of"),
    ("predict: cuda without GPU", lambda a, s: ["predict", a / "samples", "--artifacts", a, "--device", "cuda"] if not torch.cuda.is_available() else [], "CUDA"),
    ("bench: empty folder", lambda a, s: ["bench", "--artifacts", s], "no model found"),
    ("bench: zero batch", lambda a, s: ["bench", "--artifacts", a, "--batch-sizes", "0"], "batch sizes must be integers from 1"),
    ("bench: unknown backend", lambda a, s: ["bench", "--artifacts", a, "--backends", "tvm"], "backends takes"),
]


def huge_png(folder: Path) -> Path:
    from PIL import Image

    path = folder / "huge.png"
    Image.new("L", (10000, 10000)).save(path)  # compresses to ~100 KB; decoding it would need 100 MB
    return path


@pytest.fixture
def folders(artifacts_copy, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    save_png(artifacts_copy / "samples" / "one.png", np.full((8, 8), 200, np.uint8))
    return artifacts_copy, scratch


@pytest.mark.parametrize("case, make, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_line_and_exit_2(runner, folders, case, make, expected):
    artifacts, scratch = folders
    argv = make(artifacts, scratch)
    if not argv:
        pytest.skip("case does not apply on this machine")
    before = {p.name: p.read_bytes() for p in artifacts.glob("model.*") if p.is_file()}
    result = invoke(runner, *argv)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output and "payload ran" not in result.output
    if case.startswith(("train", "export", "fuse-bn", "bench", "predict: missing")):  # nothing written over good files
        assert {p.name: p.read_bytes() for p in artifacts.glob("model.*") if p.is_file()} == before


def test_debug_shows_the_traceback(runner, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["--debug", "fuse-bn", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2  # the same code as without --debug
    assert "Traceback" in result.stderr and "FcxError: " in result.stderr and "missing.pt: file not found" in result.stderr


@pytest.mark.parametrize("command, bad_name, expected", [("train", "bad.csv", "line 2 has 2 columns"), ("predict", "bad.png", "not a readable image")])
def test_real_process_prints_exactly_one_line(tmp_path, exported_dir, command, bad_name, expected):
    """Outside CliRunner too (progress bar, warnings, logging): stderr holds the one error line and nothing else."""
    import subprocess
    import sys

    bad = tmp_path / bad_name
    bad.write_text("1,0,0\n2,0\n")
    argv = {"train": ["train", "--data", bad, "--artifacts", tmp_path / "out"], "predict": ["predict", bad, "--artifacts", exported_dir]}[command]
    proc = subprocess.run([sys.executable, "-m", "cli.main", *map(str, argv)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    if command == "train":
        assert proc.stdout == "" and proc.stderr.startswith(f"error: {bad}: ")
    else:  # predict: the bad file is an error row on stdout, and the run ends with one line saying so
        assert f"{bad}: not a readable image" in proc.stdout
        assert proc.stderr.startswith(f"error: 1 file(s) could not be classified (first: {bad}: ")
