"""CUDA paths: run for real on a GPU machine (`pytest -m cuda`); skipped where torch sees no CUDA."""

import json

import numpy as np
import pytest
import torch
from helpers import invoke

from fcexport.pipeline import open_backend

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_train_on_cuda(tmp_path, runner):
    r = invoke(runner, "train", "--data", "digits", "--epochs", "10", "--device", "cuda", "--artifacts", tmp_path, "--json")
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


@pytest.fixture(scope="module")
def conv_dir(tmp_path_factory):
    """A conv net with BatchNorm at 3x64x64 (cuDNN convolutions: TF32 by default on Ampere and later), exported."""
    from fcexport import export, import_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                              torch.nn.Conv2d(64, 64, 3), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    out = tmp_path_factory.mktemp("conv")
    import_model(net, (3, 64, 64), artifacts=out)
    export(out / "model.pt", out, ["onnx", "torchscript", "pt2", "aoti-cuda"])
    return out


def test_exact_cuda_rows_compute_in_true_float32_and_say_so(conv_dir, tmp_path, runner):
    """With TF32 (cuDNN's default) a 64-channel conv differs from the CPU by ~1e-3 relative; the exact rows turn it off."""
    x = np.random.default_rng(1).random((16, 3, 64, 64), dtype=np.float32)
    for backend in ("eager", "fused", "torchscript", "pt2"):
        gpu = open_backend(backend, conv_dir, "cuda")
        assert gpu.precision == "float32 (TF32 off)"
        np.testing.assert_allclose(gpu(x), open_backend(backend, conv_dir, "cpu")(x), rtol=1e-5, atol=1e-5, err_msg=backend)
    r = invoke(runner, "verify", "--artifacts", conv_dir, "--devices", "cuda", "--json-file", tmp_path / "r.json")
    rows = [row for row in json.loads((tmp_path / "r.json").read_text())["rows"] if row["status"] != "skipped"]
    assert r.exit_code == 0, r.output
    assert {row["backend"] for row in rows} >= {"eager", "fused", "torchscript", "pt2", "aoti-cuda"}
    assert all(row["precision"] == "float32 (TF32 off)" for row in rows), rows
    assert "float32 (TF32 off)" in r.output


def test_aoti_cuda_package_is_compiled_for_this_gpu(conv_dir):
    from fcexport.targets import aoti

    spec, metadata = aoti.package_metadata((conv_dir / "model.aoti-cuda.pt2").read_bytes(), conv_dir / "model.aoti-cuda.pt2")
    assert metadata["AOTI_DEVICE_KEY"] == "cuda" and list(spec.input_shape) == [3, 64, 64]
    assert aoti.runs_here(metadata, "cuda") is None


def test_bench_on_cuda_says_what_it_computed_in(conv_dir, runner):
    r = invoke(runner, "bench", "--artifacts", conv_dir, "--device", "cuda", "--batch-sizes", "1,256", "--seconds", "0.5", "--json")
    assert r.exit_code == 0, r.output
    rows = [row for row in json.loads(r.stdout) if row["status"] == "ok"]
    assert {row["backend"] for row in rows} >= {"fused", "pt2", "aoti-cuda"}
    assert all(row["precision"] == "float32 (TF32 off)" for row in rows if row["device"] == "cuda")
