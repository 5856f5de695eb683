"""Plain lines on stdout and stderr, without rich: what `fcx predict`, JSON output and warnings need, so predict and
`fcx --help` start without loading rich (cli.render, the tables, costs about 45 ms to import)."""

from __future__ import annotations

import json
import logging
import os
import sys

# ANSI styles for a terminal; rich's names
STYLES = {"bold": "1", "red": "31", "yellow": "33"}


def shown(text) -> str:
    """Text safe for a terminal: control and other unprintable characters (ESC, newlines, bidi overrides) are
    shown escaped, as `ls` does, so a file or class name cannot clear the screen or forge a row. JSON stays exact."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def line(text: str, style: str = "", stream=None) -> None:
    """One line as it is (a terminal wraps it; grep and wc -l see one line), styled only on a colour terminal."""
    stream = stream or sys.stdout
    if style and stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb":
        text = f"\x1b[{STYLES[style]}m{text}\x1b[0m"
    stream.write(text + "\n")


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def save_json(obj, path) -> None:
    """--json-file PATH: the same JSON that --json prints, written atomically."""
    from fcexport.files import write_json_atomic

    write_json_atomic(path, obj)


def warning(message: str) -> None:
    line(f"warning: {shown(message)}", "yellow", sys.stderr)


class _WarningLines(logging.Handler):
    """The library's warnings (the "fcexport" logger) as one yellow line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        warning(record.getMessage())


def show_library_warnings() -> None:
    logger = logging.getLogger("fcexport")
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):
        logger.addHandler(_WarningLines(logging.WARNING))
        logger.propagate = False


def stream_predictions(predictor, rows, mode: str, wide: bool = False, json_file=None) -> list[dict]:
    """Print each row as it comes (mode: table, json or jsonl); return the error rows.

    Tables stream as aligned lines with the file name last, so no row waits for the widest name;
    --json prints one JSON array, written as it goes."""
    labels = {name: shown(name) for name in predictor.spec.class_names}
    names_width = max(len("class"), *(len(n) for n in labels.values()))
    errors, saved = [], [] if json_file is not None else None
    dense = predictor.spec.dense  # a segmentation model: the class covering most pixels, its share, the mask written
    if mode == "table":
        line(f"model: {shown(predictor.source)} ({predictor.backend}, {predictor.device})")
        line(f"{'class':<{names_width}}  {'share' if dense else 'prob':>6}  file" + (" -> mask" if dense else "")
             + ("  (runners-up)" if wide else ""), "bold")
    elif mode == "json":
        line(f"model: {shown(predictor.source)} ({predictor.backend}, {predictor.device})", stream=sys.stderr)
        sys.stdout.write("[")
    for number, row in enumerate(rows):
        if saved is not None:
            saved.append(row)
        if "error" in row:
            errors.append(row)
        if mode == "jsonl":
            print(json.dumps(row), flush=True)
        elif mode == "json":
            sys.stdout.write(("," if number else "") + "\n  " + json.dumps(row))
        elif "error" in row:  # one line per file, however long its name: grep and wc -l keep working
            line(f"{'-':<{names_width}}  {'error':>6}  {shown(row['error'])}", "red")
        elif dense:
            extra = "  (" + ", ".join(f"{shown(t['label'])} {t['share']:.1%}" for t in row["shares"][1:]) + ")" if wide else ""
            line(f"{shown(row['label']):<{names_width}}  {row['share']:>6.1%}  {shown(row['file'])} -> {shown(row['mask'])}{extra}")
        else:
            extra = "  (" + ", ".join(f"{labels[t['label']]} {t['probability']:.1%}" for t in row["top"][1:]) + ")" if wide else ""
            line(f"{labels[row['label']]:<{names_width}}  {row['probability']:>6.1%}  {shown(row['file'])}{extra}")
        if mode == "table":
            sys.stdout.flush()  # each batch's rows as it finishes, piped too
    if mode == "json":
        sys.stdout.write("\n]\n")
        sys.stdout.flush()
    if saved is not None:
        save_json(saved, json_file)
    return errors
