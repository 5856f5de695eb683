"""Benchmarks that cannot rot: every name a script in benchmarks/ imports from fcexport (at the top or inside a
function, where a plain import of the script would not see it) still exists, and each script's --help parses.
Their runs take minutes and time things, so they stay out of the tests."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import bounded

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
