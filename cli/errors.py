"""Maps library exceptions to exit codes and one-line messages (tracebacks only with --debug)."""

from __future__ import annotations

import functools

import typer

from fcexport.errors import FcxError

DEBUG = {"enabled": False}
INTERNAL_ERROR = 3  # a bug in fcx, not in the user's input


def fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(command):
    """User errors exit 2, failed verification 1, Ctrl-C 130, bugs 3; --debug re-raises for the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as exc:
            if DEBUG["enabled"]:
                raise
            if isinstance(exc, FcxError):
                fail(str(exc), exc.exit_code)
            if isinstance(exc, MemoryError):
                fail("out of memory; use a smaller --batch-size or fewer inputs", 2)
            fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug and report it)", INTERNAL_ERROR)
        except KeyboardInterrupt:
            if DEBUG["enabled"]:
                raise
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper
