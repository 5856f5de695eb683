"""Maps library exceptions to exit codes and one-line messages (tracebacks only with --debug)."""

from __future__ import annotations

import functools
import sys
import traceback

import typer

from cli.hints import with_hint
from cli.lines import shown
from fcexport.errors import FcxError

DEBUG = {"enabled": False}
INTERNAL_ERROR = 3  # a bug in fcx, not in the user's input


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
        except BrokenPipeError:  # `fcx ... | head`: the reader has what it wanted; Python's advice: no traceback
            import os
            import sys

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except KeyboardInterrupt:
            _traceback_if_debug()
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            _traceback_if_debug()
            if isinstance(exc, FcxError):
                fail(with_hint(str(exc), exc.hint, kwargs.get("artifacts")), exc.exit_code)
            if isinstance(exc, MemoryError):
                fail("out of memory; use fewer or smaller inputs", 2)
            fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug and report it)", INTERNAL_ERROR)

    return wrapper


def _traceback_if_debug() -> None:
    if DEBUG["enabled"]:
        traceback.print_exc(file=sys.stderr)
