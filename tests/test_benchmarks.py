"""Benchmarks that cannot rot: every name a script in benchmarks/ imports from fcexport (at the top or inside a
function, where a plain import of the script would not see it) still exists, each script's --help parses, and each
runs end to end in its quick mode (seconds, small sizes, stand-in data; nothing is timed or asserted about speed)."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, bounded, invoke

BENCHMARKS = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.py"))


def fcexport_imports(path: Path) -> list[tuple[str, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fcexport":
            found += [(node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_every_fcexport_name_a_benchmark_imports_exists(path):
    missing = []
    for module, name in fcexport_imports(path):
        owner = importlib.import_module(module)
        if not hasattr(owner, name):
            try:
                importlib.import_module(f"{module}.{name}")  # a submodule
            except ModuleNotFoundError:
                missing.append(f"{module}.{name}")
    assert not missing, f"{path.name} imports names fcexport no longer has: {missing}"


def test_the_rot_check_sees_imports_inside_functions(tmp_path):
    script = tmp_path / "old.py"
    script.write_text("def run():\n    from fcexport.training import build_for\n")
    assert fcexport_imports(script) == [("fcexport.training", "build_for")]
    assert not hasattr(importlib.import_module("fcexport.training"), "build_for")  # the rot this catches


@pytest.mark.parametrize("path", [p for p in BENCHMARKS if p.name != "zoo.py"], ids=lambda p: p.name)
def test_each_benchmark_parses_its_options(path):
    r = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, preexec_fn=bounded(60),
                       cwd=path.parent)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stderr[-500:]


# each script's quick run; {data}: a stand-in Fashion-MNIST folder, {trained}: a tiny model trained on it
QUICK = {
    "bench_inference.py": ["--quick"],
    "bench_pipeline.py": ["--quick"],
    "bench_photos.py": ["--quick", "--data-root", "{data}", "--artifacts", "{trained}"],
    "bench_serve.py": ["--quick"],
    "bench_threads.py": ["--quick"],
    "bench_train.py": ["--quick", "--data-root", "{data}"],
    "bench_verify.py": ["--quick"],
    "gpu_check.py": None,  # its --dry-run is tests/test_gpu_check.py
    "graph_size.py": ["--quick"],
    "onnx_quality.py": ["--quick"],
    "openvino_precision.py": ["--quick"],
    "own_draws.py": ["--quick"],
    "verify_rule.py": ["--quick"],
    "zoo.py": ["--quick"],
}


def test_every_benchmark_has_a_quick_run():
    assert sorted(QUICK) == [p.name for p in BENCHMARKS], "a new script in benchmarks/ needs its quick run here"


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory, runner, idx_root) -> Path:
    out = tmp_path_factory.mktemp("fashion")
    result = invoke(runner, "train", "--data-root", idx_root, *TINY, "--artifacts", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("name", [n for n, args in QUICK.items() if args], ids=str)
def test_each_benchmark_runs_its_quick_mode(name, idx_root, fashion_dir):
    if name == "bench_serve.py" and not os.environ.get("FCX_REQUIRE_SERVER"):
        from fcexport.errors import FcxError
        from fcexport.serve import find_server_env

        try:
            find_server_env()
        except FcxError as exc:
            pytest.skip(f"no server environment ({exc}); make serve-env")
    args = [a.format(data=idx_root, trained=fashion_dir) for a in QUICK[name]]
    path = Path(__file__).parents[1] / "benchmarks" / name
    r = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, preexec_fn=bounded(300),
                       cwd=path.parents[1])
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    assert "|" in r.stdout or "samples/s" in r.stdout, r.stdout[-2000:]  # its table or its lines
