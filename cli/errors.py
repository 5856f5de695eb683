"""Maps library exceptions to exit codes and one-line messages (tracebacks only with --debug)."""

from __future__ import annotations

import functools
import sys
import traceback

import typer

from cli.render import shown
from fcexport.errors import FcxError

DEBUG = {"enabled": False}
INTERNAL_ERROR = 3  # a bug in fcx, not in the user's input
# errors.HINTS step -> what to run; only the CLI knows commands and flag names.
HINTS = {
    "train-or-import": "run `fcx train`, or `fcx import WEIGHTS --model-def FILE.py:NAME --input-shape C,H,W` for your own model",
    "import": "run `fcx import WEIGHTS --model-def FILE.py:NAME --input-shape C,H,W` (see `fcx import --help`)",
    "fuse": "run `fcx fuse-bn`",
    "export": "run `fcx export`",
    "export-int8": "run `fcx export --int8`",
    "cpu": "use --device cpu",
    "data-root": "pass --data-root DIR (or set FCX_DATA_ROOT) where that folder lives",
    "lower-lr": "try a lower --lr (e.g. a tenth) or --weight-decay",
    "offline-data": "or pass --data-root DIR, or train offline with --data digits (bundled), --data FILE.csv or --data DIR",
}


def command_for(hint: str | None) -> str | None:
    """The command line that takes the step `hint` names (errors.HINTS, or export-NAME for an opt-in exporter)."""
    if hint in HINTS:
        return HINTS[hint]
    if hint and hint.startswith("export-"):
        return f"run `fcx export --format all,{hint.removeprefix('export-')}`"
    return None


def with_hint(message: str, hint: str | None) -> str:
    command = command_for(hint)
    return f"{message}; {command}" if command else message


def resolve_hints(rows: list[dict]) -> list[dict]:
    """Replace each row's hint key (from the library) with the command that fixes it, for tables and JSON."""
    for row in rows:
        if command_for(row.get("hint")):
            row["hint"] = command_for(row["hint"])
    return rows


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {shown(message)}", err=True)
    raise typer.Exit(code)


def handle_errors(command):
    """User errors exit 2, failed verification 1, Ctrl-C 130, bugs 3. --debug also prints the traceback
    first; the exit code stays the same, so scripts see the same result either way."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _traceback_if_debug()
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            _traceback_if_debug()
            if isinstance(exc, FcxError):
                fail(with_hint(str(exc), exc.hint), exc.exit_code)
            if isinstance(exc, MemoryError):
                fail("out of memory; use fewer or smaller inputs", 2)
            fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug and report it)", INTERNAL_ERROR)

    return wrapper


def _traceback_if_debug() -> None:
    if DEBUG["enabled"]:
        traceback.print_exc(file=sys.stderr)
