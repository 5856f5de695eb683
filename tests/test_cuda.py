"""CUDA paths: run for real on a GPU machine (`pytest -m cuda`); skipped where torch sees no CUDA."""

import json

import numpy as np
import pytest
import torch
from helpers import invoke

from fcexport.pipeline import open_backend

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_train_on_cuda(tmp_path, runner):
    r = invoke(runner, "train", "--data", "digits", "--hidden", "32", "--epochs", "3", "--device", "cuda", "--artifacts", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)
    assert metrics["device"].startswith("cuda") and metrics["test_accuracy"] > 0.5
    torch.load(tmp_path / "model.pt", weights_only=True)  # saved from GPU, loads anywhere


@pytest.mark.parametrize("backend", ["eager", "fused", "torchscript", "pt2"])
def test_torch_backends_match_cpu_on_cuda(exported_dir, backend):
    x = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    cpu = open_backend(backend, exported_dir, "cpu")(x)
    gpu = open_backend(backend, exported_dir, "cuda")(x)
    np.testing.assert_allclose(gpu, cpu, atol=1e-5, rtol=1e-4)


def test_verify_runs_the_cuda_rows(exported_dir, runner, tmp_path):
    r = invoke(runner, "verify", "--artifacts", exported_dir, "--json-file", tmp_path / "r.json")
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    cuda = {row["backend"]: row for row in rows if row["device"] == "cuda"}
    assert all(cuda[b]["status"] == "pass" for b in ("eager", "fused", "torchscript", "pt2")), cuda
    assert r.exit_code == 0, r.output


def test_fuse_bn_verify_on_cuda_leaves_nothing_on_the_gpu(trained_dir, runner, tmp_path):
    r = invoke(runner, "fuse-bn", trained_dir / "model.pt", "--out", tmp_path / "f.pt", "--verify", "--device", "cuda", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["verification"]["passed"] and result["latency_ms"]["device"] == "cuda"
