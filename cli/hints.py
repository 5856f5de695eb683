"""The command that fixes each problem the library names (fcexport.errors.HINTS): only the CLI knows commands and flags."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

HINTS = {
    "train-or-import": "run `fcx train`, or `fcx import WEIGHTS --model-def FILE.py:NAME --input-shape C,H,W` for your own model",
    "import": "run `fcx import WEIGHTS --model-def FILE.py:NAME --input-shape C,H,W` (see `fcx import --help`)",
    "fuse": "run `fcx fuse-bn`",
    "export": "run `fcx export`",
    "export-int8": "run `fcx export --int8`",
    "label-column": "pass --label-column NAME_OR_NUMBER (1 = the first column)",
    "stale": "run `fcx export` (and `fcx fuse-bn`) again, or pass --allow-stale to use it anyway",
    "export-triton": "run `fcx export --triton`",
    "serve-env": ("make the server's environment: `make serve-env` in the fcexport checkout, or `python3 -m venv DIR && "
                  "DIR/bin/pip install 'numpy<2' onnxruntime nvidia-pytriton`, then pass --server-env DIR (or set FCX_TRITON_ENV)"),
    "cpu": "use --device cpu",
    "data-root": "pass --data-root DIR (or set FCX_DATA_ROOT) where that folder lives",
    "lower-lr": "try a lower --lr (e.g. a tenth) or --weight-decay",
    "timeout": "pass a longer --timeout (seconds for the whole command) if the server is just slow",
    "offline-data": "or pass --data-root DIR, or train offline with --data digits (bundled), --data FILE.csv or --data DIR",
}


def command_for(hint: str | None) -> str | None:
    """The command line that takes the step `hint` names (errors.HINTS, or export-NAME for an opt-in exporter)."""
    if hint in HINTS:
        return HINTS[hint]
    if hint and hint.startswith("export-"):
        return f"run `fcx export --format all,{hint.removeprefix('export-')}`"
    return None


def with_hint(message: str, hint: str | None, artifacts=None) -> str:
    """The message and the command that fixes it; a folder the user chose (`artifacts`) goes into that command."""
    command = command_for(hint)
    if command and artifacts is not None and Path(artifacts) != Path("artifacts"):
        command = re.sub(r"`(fcx (?![^`]*--help)[^`]*)`",  # (a help page takes no folder)
                         lambda m: f"`{m.group(1)} --artifacts {shlex.quote(str(artifacts))}`", command)
    return f"{message}; {command}" if command else message


def json_with_commands(data):
    """A copy of JSON data (from a result's to_json) whose "hint" keys name the command instead of the step."""
    if isinstance(data, dict):
        return {k: (command_for(v) or v) if k == "hint" else json_with_commands(v) for k, v in data.items()}
    if isinstance(data, list):
        return [json_with_commands(v) for v in data]
    return data
