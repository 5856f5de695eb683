"""A newcomer's mistakes and expectations (issue: a newcomer's first day): progress on long steps, --quiet,
messages that name the fix, hints that keep the folder the user chose."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import bounded, invoke, save_png

from cli.main import app
from fcexport.spec import RANDOM_INPUTS

ROOT = Path(__file__).resolve().parents[1]


def _on_a_terminal(*args: str, cwd: Path) -> str:
    """What `fcx ARGS` prints on an 80-column terminal (a real pty, through script(1))."""
    fcx = f"{sys.executable} -c 'from cli.main import main; main()'"
    command = f"stty cols 80; {fcx} " + " ".join(f"'{a}'" for a in args)
    done = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=cwd, capture_output=True, text=True, preexec_fn=bounded(),
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done.stdout


@pytest.mark.skipif(shutil.which("script") is None, reason="needs script(1) for a pty")
def test_long_steps_show_progress_on_a_terminal_only(artifacts_copy, tmp_path):
    shown = _on_a_terminal("export", "--format", "onnx", "--artifacts", str(artifacts_copy), cwd=tmp_path)
    assert "exporting onnx" in shown and "checking onnxruntime" in shown
    quiet = _on_a_terminal("export", "--format", "onnx", "--json", "--artifacts", str(artifacts_copy), cwd=tmp_path)
    assert "exporting onnx" not in quiet and '"manifest_sha256"' in quiet


def test_quiet_prints_nothing_but_errors(artifacts_copy, runner):
    for args in (["verify", "--backends", "onnxruntime", "--devices", "cpu"], ["export", "--format", "onnx"],
                 ["bench", "--backends", "onnxruntime", "--batch-sizes", "1", "--seconds", "0.05"]):
        r = invoke(runner, *args, "-q", "--artifacts", artifacts_copy)
        assert r.exit_code == 0 and r.stdout == "", (args, r.output)
    r = invoke(runner, "verify", "-q", "--artifacts", artifacts_copy / "nothing")
    assert r.exit_code == 2 and "model.pt: file not found" in r.output


def test_fuse_bn_on_an_exported_file_says_to_pass_model_pt(exported_dir, runner):
    r = invoke(runner, "fuse-bn", exported_dir / "model.onnx")
    assert r.exit_code == 2 and "an exported model (onnx)" in r.output and "pass the model.pt" in r.output


def test_hints_keep_the_folder_the_user_gave(tmp_path, runner):
    r = invoke(runner, "verify", "--artifacts", tmp_path / "my models")
    assert r.exit_code == 2 and f"fcx train --artifacts '{tmp_path / 'my models'}'" in r.output


def test_bench_seconds_bound_the_warm_up_too():
    import time

    from fcexport.timing import measure

    calls = []

    def slow(x):
        calls.append(1)
        time.sleep(0.02)

    started = time.perf_counter()
    result = measure(slow, [0], warmup=1000, repeat=1000, max_seconds=0.4)
    assert time.perf_counter() - started < 0.6 and len(calls) < 25
    assert 1 <= result["warmup_calls"] <= 6 and result["warmup_calls"] + result["calls"] == len(calls)


def test_bench_says_when_its_warm_up_was_cut_short(exported_dir, runner):
    args = ("bench", "--backends", "onnxruntime", "--batch-sizes", "1", "--artifacts", exported_dir)
    r = invoke(runner, *args, "--warmup", "3", "--seconds", "0.2")
    assert r.exit_code == 0 and "cut them short" not in r.output, r.output
    r = invoke(runner, *args, "--warmup", "100000000", "--seconds", "0.05")
    shown = " ".join(r.output.split())
    assert r.exit_code == 0 and "where --seconds cut them short: onnxruntime b1 " in shown and "/100000000;" in shown


@pytest.mark.parametrize("command", ["export", "fuse-bn", "verify", "bench"])
def test_a_missing_model_is_said_before_torch_is_imported(command, tmp_path):
    """Importing torch takes seconds: a mistyped folder is answered without it."""
    code = (f"import sys; sys.argv = ['fcx', '{command}', '--artifacts', '{tmp_path / 'missing'}']\n"
            "from cli.main import main\ntry:\n    main()\nexcept SystemExit as exit:\n"
            "    print('torch' in sys.modules, exit.code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=bounded())
    assert done.stdout.split()[-2:] == ["False", "2"], done.stdout + done.stderr


@pytest.fixture
def label_last(tmp_path):
    """A CSV with the label written last (8x8 pixels, 3 classes), without and with a header."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        image = rng.integers(0, 40, 64)
        image[(i % 3) * 20 : (i % 3 + 1) * 20] += 200
        rows.append(",".join(map(str, image)) + f",{i % 3}")
    plain, named = tmp_path / "last.csv", tmp_path / "named.csv"
    plain.write_text("\n".join(rows) + "\n")
    named.write_text(",".join(f"p{i}" for i in range(64)) + ",label\n" + "\n".join(rows) + "\n")
    return plain, named


def test_a_csv_with_the_label_last_is_refused_and_label_column_reads_it(label_last, tmp_path, runner):
    import json

    plain, named = label_last
    for path in (plain, named):
        r = invoke(runner, "train", "--data", path, "--epochs", "1", "-q", "--artifacts", tmp_path / "x")
        assert r.exit_code == 2 and "--label-column" in r.output and "first column" in r.output, r.output
    for path, column in ((plain, "65"), (named, "label")):
        out = tmp_path / f"ok-{column}"
        r = invoke(runner, "train", "--data", path, "--label-column", column, "--epochs", "2", "-q", "--artifacts", out)
        assert r.exit_code == 0, r.output
        from fcexport.checkpoint import read_model

        assert read_model(out / "model.pt").spec.class_names == ("0", "1", "2")
        assert json.loads((out / "metrics.json").read_text())["test_accuracy"] > 0.5  # it learned from the labels
    r = invoke(runner, "train", "--data", named, "--label-column", "lbl", "-q", "--artifacts", tmp_path / "y")
    assert r.exit_code == 2 and "no column named 'lbl'" in r.output
    r = invoke(runner, "train", "--data", "digits", "--label-column", "2", "-q", "--artifacts", tmp_path / "y")
    assert r.exit_code == 2


def test_verify_wide_fits_80_columns_without_cutting_a_number(exported_dir, monkeypatch, runner):
    import re

    from cli import render

    monkeypatch.setattr(render.out, "_width", 80)
    r = invoke(runner, "verify", "--wide", "--backends", "fused,onnxruntime,onnxruntime-int8", "--artifacts", exported_dir)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in r.stdout
    assert "the other errors (--wide)" in r.stdout and re.search(r"onnxruntime +cpu +\d\.\de-\d\d +\d\.\de-\d\d +\d\.\de-\d\d", r.stdout)
    first = next(i for i, line in enumerate(lines) if line.startswith("skipped"))
    summary = " ".join(" ".join(lines[first : next(i for i, line in enumerate(lines) if line.startswith("inputs:"))]).split())
    assert sum(line.startswith("skipped") for line in lines) == 1  # one summary of every skip
    assert "onnxruntime-int8 on cpu" in summary and "everything on cuda" in summary
    assert "fcx export --int8 --artifacts" in summary  # the hint keeps the folder the user gave


def test_a_label_column_that_is_not_the_named_one_is_refused(label_last, tmp_path, runner):
    _, named = label_last
    r = invoke(runner, "train", "--data", named, "--label-column", "p3", "-q", "--artifacts", tmp_path / "x")
    assert r.exit_code == 2 and "column 65 is named 'label'" in r.output
    r = invoke(runner, "train", "--data", named, "--label-column", "Label", "-q", "--artifacts", tmp_path / "x")
    assert r.exit_code == 2 and "did you mean 'label', column 65?" in r.output


def test_retraining_keeps_the_old_history_with_its_model(trained_dir, tmp_path, runner):
    folder = Path(shutil.copytree(trained_dir, tmp_path / "a"))
    old = (folder / "history.csv").read_text()
    r = invoke(runner, "train", "--data", "digits", "--hidden", "16", "--epochs", "1", "-q", "--artifacts", folder)
    assert r.exit_code == 0, r.output
    (retired,) = (folder / "superseded").iterdir()
    assert (retired / "history.csv").read_text() == old and (folder / "history.csv").read_text() != old


def test_a_training_run_that_fails_gives_the_model_its_history_back(trained_dir, tmp_path, monkeypatch):
    from fcexport import pipeline, training
    from fcexport.options import TrainOptions

    folder = Path(shutil.copytree(trained_dir, tmp_path / "a"))
    old_model, old_history = (folder / "model.pt").read_bytes(), (folder / "history.csv").read_text()

    def fit_that_fails(model, train, val, opts, on_epoch):
        on_epoch({"epoch": 1, "train_loss": 9.0})  # the run's own history.csv is written, then it fails
        assert (folder / "history.csv").read_text() != old_history
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(training, "fit", fit_that_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        pipeline.train(TrainOptions(data="digits", epochs=1, hidden=[16], artifacts=str(folder)))
    assert (folder / "model.pt").read_bytes() == old_model and (folder / "history.csv").read_text() == old_history
    assert not (folder / ".history.previous.csv").exists() and not (folder / "superseded").exists()


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a shell for the pipe")
def test_a_closed_pipe_is_no_failure(exported_dir, tmp_path):
    for args in (f"verify --backends onnxruntime --devices cpu --json --artifacts {exported_dir}", f"inspect {exported_dir}"):
        command = f"{sys.executable} -c 'from cli.main import main; main()' {args} | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}"
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, preexec_fn=bounded(), env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.stdout.strip() == "0" and "Traceback" not in done.stderr, (args, done.stdout, done.stderr)


@pytest.mark.parametrize("command", ["train", "import", "fuse-bn", "export", "sign", "verify", "predict", "bench", "inspect", "serve"])
def test_help_uses_plain_placeholders_within_80_columns(command, runner):
    r = runner.invoke(app, [command, "-h"], prog_name="fcx", terminal_width=80)
    assert r.exit_code == 0, r.output
    usage, options = r.output.splitlines()[0], r.output.split("Options:")[1].split("Examples:")[0]
    assert usage.startswith(f"Usage: fcx {command} [OPTIONS]") and "{" not in usage, usage
    assert not re.search(r"<[a-z\[\]]+>", options), options  # typer 0.29 writes <list[str]>, <path>
    assert "--artifacts PATH" in options or command == "inspect"
    assert all(len(line) <= 80 for line in r.output.splitlines()), r.output
    if command == "import":
        assert usage == "Usage: fcx import [OPTIONS] WEIGHTS" and "--key TEXT" in options
    if command == "predict":
        assert usage == "Usage: fcx predict [OPTIONS] IMAGE..." and "--top-k INT" in options and "--url URL" in options


def test_inputs_fixes_what_verify_and_fuse_bn_compare_on(exported_dir, runner, tmp_path):
    import json

    reports = []
    for _ in range(2):
        r = invoke(runner, "verify", "--backends", "onnxruntime", "--devices", "cpu", "--inputs", "40", "--json",
                   "--artifacts", exported_dir)
        assert r.exit_code == 0, r.output
        reports.append(json.loads(r.stdout))
    assert reports[0]["input_count"] == 40 and reports[0]["inputs"] == reports[1]["inputs"]
    assert reports[0]["rows"][0]["max_abs"] == reports[1]["rows"][0]["max_abs"]
    r = invoke(runner, "fuse-bn", "--verify", "--inputs", "24", "--json", "--out", tmp_path / "f.pt", "--artifacts", exported_dir)
    assert r.exit_code == 0 and json.loads(r.stdout)["verification"]["input_count"] == 24, r.output
    for command in (["verify"], ["fuse-bn", "--verify"]):  # refused before any file is read
        r = invoke(runner, *command, "--inputs", "5", "--artifacts", tmp_path / "none")
        assert r.exit_code == 2 and "--inputs must be between 8 and 4096, got 5" in r.output, r.output


def test_every_table_fits_80_columns_without_cutting(int8_dir, tmp_path, monkeypatch, runner):
    """Each command's tables on an 80-column terminal: nothing past column 80 and nothing cut to an ellipsis."""
    from cli import render

    monkeypatch.setattr(render.out, "_width", 80)
    folder = Path(shutil.copytree(int8_dir, tmp_path / "a"))
    monkeypatch.chdir(tmp_path)  # short, relative names in the rows that show files
    save_png(tmp_path / "one.png", np.full((28, 28), 40, np.uint8))
    commands = [
        ("train", "--data", "digits", "--hidden", "16", "--epochs", "2", "--artifacts", "b"),
        ("fuse-bn", "--verify", "--wide", "--out", "f.pt", "--inputs", "16", "--artifacts", "a"),
        ("export", "--format", "onnx", "--artifacts", "a"),
        ("verify", "--inputs", "16", "--artifacts", "a"), ("verify", "--inputs", "16", "--wide", "--artifacts", "a"),
        ("predict", "one.png", "--wide", "--artifacts", "a"),
        ("bench", "--batch-sizes", "1,64", "--seconds", "0.05", "--artifacts", "a"),
        ("inspect", "a"), ("inspect", "a/model.onnx"), ("inspect", "a/model.pt"),
    ]
    for args in commands:
        r = invoke(runner, *args)
        assert r.exit_code == 0, (args, r.output)
        assert r.stdout.strip() and max(len(line) for line in r.stdout.splitlines()) <= 80, (args, r.stdout)
        assert "…" not in r.stdout, (args, r.stdout)
    assert folder.is_dir()


def test_the_command_list_is_not_cut_at_80_columns(runner):
    r = runner.invoke(app, ["-h"], prog_name="fcx", terminal_width=80)
    commands = r.output.split("Commands:")[1].split("\n\n")[0].splitlines()
    assert len(commands) >= 10 and not any(line.rstrip().endswith("...") for line in commands), r.output


def test_options_are_named_as_typed_in_messages(exported_dir, runner):
    r = invoke(runner, "bench", "--seconds", "0", "--artifacts", exported_dir)
    assert r.exit_code == 2 and "--seconds more than 0" in r.output and "got --warmup 20, --repeat 200, --seconds 0" in r.output
    r = invoke(runner, "predict", exported_dir / "nothing.png", "--top-k", "0", "--artifacts", exported_dir)
    assert r.exit_code == 2 and "--top-k must be >= 1" in r.output and "model:" not in r.output  # before any row


def test_the_default_input_budget_is_the_same_on_every_machine():
    """No clock decides how much is proven: every real test image up to 2,000, 256 random inputs and the probes."""
    import inspect

    from fcexport import parity, verification

    assert (parity.REAL_INPUTS, RANDOM_INPUTS, parity.PROBE_INPUTS) == (2000, 256, 256)
    assert "perf_counter" not in inspect.getsource(verification.numbers) and not hasattr(parity, "input_budget")


def test_a_help_page_in_a_hint_takes_no_folder():
    from cli.hints import with_hint

    said = with_hint("no model", "import", "m2")
    assert "--input-shape C,H,W --artifacts m2`" in said and "`fcx import --help`" in said


def test_one_parameter_count_and_opset_only_for_onnx_files(exported_dir, runner, tmp_path):
    """fcx train, fuse-bn and inspect count the same parameters (BatchNorm statistics are not learned); the ONNX
    opset is said for ONNX files only."""
    import json

    from fcexport.checkpoint import read_model

    trained = read_model(exported_dir / "model.pt").spec.metrics["parameters"]
    r = invoke(runner, "inspect", exported_dir)
    assert r.exit_code == 0, r.output
    blocks = {block.split()[0]: block for block in re.split(r"\n(?=\S)", r.stdout)}
    counted = re.search(r"parameters\s+([\d,]+)", blocks[str(exported_dir / "model.pt")]).group(1)
    assert int(counted.replace(",", "")) == trained
    fused = invoke(runner, "fuse-bn", exported_dir / "model.pt", "--out", tmp_path / "f.pt", "--json")
    assert json.loads(fused.stdout)["report"]["parameters_before"] == trained
    made = {file: "opset" in block for file, block in blocks.items() if "made from" in block}
    assert made and all(said == file.endswith(".onnx") for file, said in made.items()), made


def test_fuse_bn_leaves_out_a_latency_it_could_not_time_fairly(exported_dir, runner, tmp_path, monkeypatch):
    import json

    from fcexport import timing

    monkeypatch.setattr(timing, "measure", lambda predictor, x: {"p50_ms": 40.0, "calls": 3})
    r = invoke(runner, "fuse-bn", exported_dir / "model.pt", "--out", tmp_path / "f.pt")
    assert r.exit_code == 0 and "left out: too slow to time fairly" in " ".join(r.stdout.split()) and "40" not in r.stdout
    r = invoke(runner, "fuse-bn", exported_dir / "model.pt", "--out", tmp_path / "f.pt", "--json")
    assert json.loads(r.stdout)["latency_ms"]["before"] is None

