"""Every `fcx` command in the README parses as written, and the ones that need only a model run as written."""

import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
from helpers import invoke
from typer.main import get_command

try:  # typer >= 0.20 ships its own copy of click
    from typer import _click as click
except ImportError:  # pragma: no cover
    import click

from cli.main import app

README = Path(__file__).parents[1] / "README.md"


def readme_commands() -> list[str]:
    """`fcx ...` lines of the README's code blocks (continuation lines joined, comments dropped)."""
    commands, blocks = [], re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            code = line.split("  #")[0].strip()
            if code.startswith("fcx ") and "->" not in code and "|" not in code:
                commands.append(code)
    return commands


COMMANDS = list(dict.fromkeys(readme_commands()))  # each distinct command once, however often the README shows it


def test_the_readme_has_commands():
    assert len(COMMANDS) > 25 and any(c.startswith("fcx import") for c in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    """Unknown options, values of the wrong type and stray arguments are usage errors here."""
    group = get_command(app)
    args = shlex.split(command)[1:]
    ctx = group.make_context("fcx", list(args), resilient_parsing=False) if args[0].startswith("-") else None
    if ctx is None:
        name, *rest = args
        sub = group.get_command(click.Context(group), name)
        assert sub is not None, f"unknown command in README: {command}"
        sub.make_context(name, rest)


# Commands that need nothing but a trained model in ./artifacts, or the folder they name (run in a copy of one, as written).
# (Those that need a server, --url, run in tests/test_serve.py against a real one.)
RUNNABLE = [c for c in COMMANDS if c.split()[1] in ("fuse-bn", "export", "sign", "verify", "bench") and "../shared" not in c
            and "other.pt" not in c and "--url" not in c]


@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(command, exported_dir, tmp_path, monkeypatch, runner):
    import hashlib

    from test_signing import write_key_pair

    words = shlex.split(command)
    folder = words[words.index("--artifacts") + 1] if "--artifacts" in words else "artifacts"  # the folder it names
    shutil.copytree(exported_dir, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    keys = tmp_path / ".config" / "fcx"
    keys.mkdir(parents=True)
    write_key_pair(keys)  # ~/.config/fcx/key.pem and key.pub, as the README's openssl lines make them
    Path("key.pub").write_bytes((keys / "key.pub").read_bytes())
    args = [os.path.expanduser(a) for a in shlex.split(command)[1:]]  # what the shell does with ~
    if "key.pub" in args:  # the README signs before it verifies
        assert invoke(runner, "sign", "--key", keys / "key.pem").exit_code == 0
    if "--expect-digest" in args:  # the README's digest stands for the one fcx export printed
        args[args.index("--expect-digest") + 1] = hashlib.sha256(Path("artifacts/manifest.json").read_bytes()).hexdigest()
    if args[0] == "bench":
        args += ["--seconds", "0.05", "--warmup", "1"]
    r = invoke(runner, *args)
    assert r.exit_code == 0, (command, r.output)


def test_readme_fuse_example_with_its_tolerances_passes(exported_dir, tmp_path, runner):
    command = next(c for c in COMMANDS if "other.pt" in c)
    shutil.copy(exported_dir / "model.pt", tmp_path / "other.pt")
    args = [a.replace("other.", str(tmp_path / "other.")) for a in shlex.split(command)[1:]]
    r = invoke(runner, *args)
    assert r.exit_code == 0, r.output
