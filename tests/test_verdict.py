"""A verdict you can bet on: the same inputs whatever the machine's load, approximate results judged on decisive
inputs, a runtime that cannot run an honest file said in its row, runtimes with float32 kernels of their own judged
by their own calibrated factor, bf16 only when asked for."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import invoke

from fcexport import compare
from fcexport.compare import Tolerance


def _rows(path):
    return {(r["backend"], r["device"]): r for r in json.loads(path.read_text())["rows"]}


def test_inputs_and_errors_are_the_same_with_the_machine_busy(exported_dir, runner, tmp_path):
    args = ("verify", "--artifacts", exported_dir, "--backends", "fused,onnxruntime", "--devices", "cpu")
    assert invoke(runner, *args, "--json-file", tmp_path / "quiet.json").exit_code == 0
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        assert invoke(runner, *args, "--json-file", tmp_path / "busy.json").exit_code == 0
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    quiet, busy = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("quiet", "busy"))
    assert quiet["input_count"] == busy["input_count"] >= 256 and quiet["inputs"] == busy["inputs"]
    assert [r["max_abs"] for r in quiet["rows"]] == [r["max_abs"] for r in busy["rows"]]
    assert "256 random inputs" in quiet["inputs"] and quiet["weak"] is None


def test_fewer_inputs_than_a_verdict_needs_is_said(exported_dir, runner, tmp_path):
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--backends", "fused", "--devices", "cpu", "--inputs", "40",
               "--json-file", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["input_count"] == 40 and report["weak"].startswith("weak: 40 inputs")
    assert "weak: 40 inputs" in r.stderr


def test_bf16_is_verified_only_when_named(exported_dir, runner, tmp_path):
    invoke(runner, "verify", "--artifacts", exported_dir, "--devices", "cpu", "--json-file", tmp_path / "all.json")
    assert not [b for b, _ in _rows(tmp_path / "all.json") if b == "openvino-bf16"]
    invoke(runner, "verify", "--artifacts", exported_dir, "--backends", "openvino-bf16", "--devices", "cpu",
           "--json-file", tmp_path / "named.json")
    assert ("openvino-bf16", "cpu") in _rows(tmp_path / "named.json")


def test_a_runtime_that_cannot_compile_an_honest_file_is_a_row_and_the_others_are_judged(exported_dir, runner, tmp_path, monkeypatch):
    openvino = pytest.importorskip("openvino")

    def refuse(*args, **kwargs):  # what OpenVINO 2026.4 says of transformers' EfficientNet pooler
        raise RuntimeError("Check 'false' failed at src/frontends/common_translators/src/unconverted_ops_report.cpp:151:\n"
                           "FrontEnd API failed with OpConversionFailure:\nConversion is failed for: AveragePool-18\n")

    monkeypatch.setattr(openvino.Core, "compile_model", refuse)
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--backends", "fused,onnxruntime,openvino", "--devices", "cpu",
               "--json-file", tmp_path / "r.json")
    rows = _rows(tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert rows[("openvino", "cpu")]["status"] == "skipped"
    assert "cannot compile model.onnx: Conversion is failed for: AveragePool-18" in rows[("openvino", "cpu")]["reason"]
    assert rows[("onnxruntime", "cpu")]["status"] == rows[("fused", "cpu")]["status"] == "pass"


def test_openvino_rows_carry_their_own_factor(exported_dir, runner, tmp_path):
    pytest.importorskip("openvino")
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--backends", "onnxruntime,openvino", "--devices", "cpu",
               "--json-file", tmp_path / "r.json")
    rows = _rows(tmp_path / "r.json")
    assert rows[("openvino", "cpu")]["noise_factor"] == 8 and rows[("onnxruntime", "cpu")]["noise_factor"] == 4
    assert "openvino <= 8 x" in r.stdout


def _logits(margins: np.ndarray) -> np.ndarray:
    """Rows of 10 logits whose top-1 leads the runner-up by `margins` (the largest logit is 1)."""
    rows = np.zeros((len(margins), 10))
    rows[:, 0], rows[:, 1] = 1.0, 1.0 - margins
    return rows


def test_near_ties_flipped_by_rounding_are_not_failures():
    reference = _logits(np.r_[np.full(100, 0.5), np.full(10, 1e-4)])  # 100 decisive rows, 10 near-ties
    candidate = reference.copy()
    candidate[100:, 1] += 2e-4  # every near-tie flips (10 of 110: 91% agreement over all rows)
    row = compare.compare(candidate, reference, 1e-7, None, Tolerance(), approximate=True)
    assert row["top1_agreement"] < 0.99 and row["decisive_inputs"] == 100 and row["decisive_agreement"] == 1.0
    assert row["passed"]


def test_a_flip_on_a_decisive_input_fails():
    reference = _logits(np.full(100, 0.5))
    candidate = reference.copy()
    candidate[:2, 1] += 1.0  # two decisive rows answer another class
    assert not compare.compare(candidate, reference, 1e-7, None, Tolerance(), approximate=True)["passed"]


def test_too_few_decisive_inputs_is_no_verdict():
    reference = _logits(np.full(100, 1e-4))  # random weights: every row a near-tie
    row = compare.compare(reference.copy(), reference, 1e-7, None, Tolerance(), approximate=True)
    assert not row["passed"] and row["decisive_inputs"] == 0 and "not enough decisive inputs" in row["undecided"]
