"""Bounds that hold (issue 30): Triton configs judged against what export wrote, size caps before every read,
deadlines on every remote call and on the command, and -q messages that point only at what was printed."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import invoke


def test_quiet_verify_says_what_failed_instead_of_pointing_above(artifacts_copy, exported_dir, runner):
    model = artifacts_copy / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    for flag in ("-q", "--json"):
        r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--backends", "onnxruntime", "--devices", "cpu", flag)
        assert r.exit_code == 1 and "above" not in r.stderr, r.stderr
        assert "onnxruntime on cpu: model.onnx changed after it was written" in r.stderr, r.stderr
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--devices", "cuda", "-q")
    if r.exit_code == 0:
        pytest.skip("CUDA is here: nothing is skipped")
    assert r.exit_code == 1 and "above" not in r.stderr and "no CUDA device here" in r.stderr, r.stderr
    r = invoke(runner, "verify", "--artifacts", artifacts_copy, "--backends", "onnxruntime", "--devices", "cpu")
    assert r.exit_code == 1 and "see the table above" in r.stderr and "FAILED" in r.stdout
