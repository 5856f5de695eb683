"""Error types the CLI maps to exit codes: user errors exit 2, failed verification exits 1."""


class FcxError(Exception):
    """A problem with the user's input (file, option, model): one clear line, exit code 2."""

    exit_code = 2


class VerificationFailed(FcxError):
    """A candidate artifact does not match the reference within tolerance: exit code 1."""

    exit_code = 1


def check_choices(option: str, given, allowed) -> None:
    """Raise FcxError unless `given` is a non-empty selection from `allowed` (e.g. --backends)."""
    bad = set(given) - set(allowed)
    if bad or not given:
        raise FcxError(f"{option} takes {', '.join(allowed)}; got {', '.join(sorted(bad)) or 'nothing'}")
