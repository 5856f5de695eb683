"""Error types the CLI maps to exit codes: user errors exit 2, failed verification exits 1.

The library says what went wrong in its own terms; `hint` names the step that fixes it (one of
HINTS), and only the CLI turns that into a command line (`fcx export`, `--model-def`, ...).
"""

# Steps a user can take to fix an error; cli/errors.py has the command for each. "export-NAME" asks for an
# exporter that is not on by default (fcexport.registry).
HINTS = ("train-or-import", "import", "fuse", "export", "cpu", "data-root", "offline-data", "lower-lr", "stale", "serve-env", "label-column",
         "timeout")


class FcxError(Exception):
    """A problem with the user's input (file, option, model): one clear line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        assert hint is None or hint in HINTS or hint.startswith("export-"), hint
        self.hint = hint


def check_choices(option: str, given, allowed) -> None:
    """Raise FcxError unless `given` is a non-empty selection from `allowed` (e.g. --backends)."""
    bad = set(given) - set(allowed)
    if bad or not given:
        raise FcxError(f"{option} takes {', '.join(allowed)}; got {', '.join(sorted(bad)) or 'nothing'}")
