"""AOTInductor: the fused program compiled ahead of time, verified and benched like every other row; exact float32
on CUDA (TF32 off) for every torch runtime."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from helpers import invoke

from fcexport import registry
from fcexport.pipeline import open_backend
from fcexport.targets import exact_float32


@pytest.fixture(scope="module")
def aoti_dir(tmp_path_factory, exported_dir, runner):
    """exported_dir plus model.aoti.pt2 (compiled here for this CPU: about 30 s of gcc)."""
    out = shutil.copytree(exported_dir, tmp_path_factory.mktemp("aoti") / "artifacts")
    result = invoke(runner, "export", "--format", "all,aoti", "--artifacts", out, "--json")
    assert result.exit_code == 0, result.output
    assert "model.aoti.pt2" in " ".join(json.loads(result.stdout)["written"])
    return out


def test_aoti_verifies_on_cpu_and_answers_like_the_fused_model(aoti_dir, runner, tmp_path):
    r = invoke(runner, "verify", "--artifacts", aoti_dir, "--backends", "fused,aoti", "--devices", "cpu",
               "--json-file", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    rows = {row["backend"]: row for row in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert rows["aoti"]["status"] == "pass" and rows["aoti"]["precision"] == "float32"
    x = np.random.default_rng(0).random((7, 1, 8, 8), dtype=np.float32)  # a batch it was never compiled for
    np.testing.assert_allclose(open_backend("aoti", aoti_dir, "cpu")(x), open_backend("fused", aoti_dir, "cpu")(x),
                               rtol=1e-5, atol=1e-6)


def test_aoti_carries_its_spec_readable_without_loading_it(aoti_dir, runner):
    r = invoke(runner, "inspect", aoti_dir / "model.aoti.pt2", "--json")
    assert r.exit_code == 0, r.output
    file = json.loads(r.stdout)["files"][0]
    assert file["spec"]["input_shape"] == [1, 8, 8] and file["details"]["compiled for"] == "cpu"


def test_a_changed_aoti_package_is_never_loaded(aoti_dir, runner, tmp_path, monkeypatch):
    folder = shutil.copytree(aoti_dir, tmp_path / "a")
    package = folder / "model.aoti.pt2"
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 1
    package.write_bytes(bytes(data))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: pytest.fail("a changed package was loaded"))
    r = invoke(runner, "verify", "--artifacts", folder, "--backends", "aoti", "--devices", "cpu")
    assert r.exit_code == 1, r.output
    assert "manifest" in r.output


def test_an_aoti_package_compiled_for_another_machine_is_a_skip_not_a_crash(aoti_dir, tmp_path):
    """The package's metadata names the CPU instruction set it was compiled for; another is never loaded."""
    folder = shutil.copytree(aoti_dir, tmp_path / "a")
    from fcexport.targets import aoti

    with zipfile.ZipFile(folder / "model.aoti.pt2") as z:
        name = next(n for n in z.namelist() if n.endswith("wrapper_metadata.json"))
        metadata = json.loads(z.read(name))
    assert aoti.runs_here(metadata, "cpu") is None
    assert "another machine" in aoti.runs_here({**metadata, "AOTI_CPU_ISA": "NEON"}, "cpu")
    assert "compiled for cpu, not cuda" in aoti.runs_here(metadata, "cuda")


def test_aoti_cuda_is_a_skip_without_a_gpu(exported_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert registry.backend("aoti-cuda").devices == ("cuda",)
    assert registry.backend("aoti").devices == ("cpu",)


def test_exact_float32_turns_tf32_off_and_restores_the_callers_setting():
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with exact_float32():
        assert conv.fp32_precision == "ieee" and torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert conv.fp32_precision == before


def test_torchscript_never_bakes_tf32_into_its_convolutions(tmp_path):
    """A trace records each convolution's cuDNN flags as constants: traced with torch's defaults, model.ts ran its
    convolutions in TF32 on an H200 (3.4e-4 relative from the CPU) whatever the caller set."""
    from fcexport import export, import_model
    from fcexport.targets.torchscript import quiet_torchscript_deprecation

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 10))
    import_model(net.eval(), (3, 16, 16), artifacts=tmp_path)
    export(tmp_path / "model.pt", tmp_path, ["torchscript"], check=False)
    with quiet_torchscript_deprecation():
        graph = torch.jit.load(str(tmp_path / "model.ts")).inlined_graph
    convolutions = [n for n in graph.nodes() if n.kind() == "aten::_convolution"]
    assert convolutions
    assert all(list(n.inputs())[12].toIValue() is False for n in convolutions)  # allow_tf32
