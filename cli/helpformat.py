"""Plain, stable `-h` text: `fcx import [OPTIONS] WEIGHTS`, `--artifacts PATH`, whatever typer's own style is this release.

typer 0.29 writes required arguments as `{WEIGHTS}` (braces read as a choice) and repeatable options as `<list[str]>`;
this command class renders names the way click and most CLIs do, and keeps typer's help text and defaults.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand

# the value's type as click (`integer`) or typer >= 0.29 (`<int>`, `<list[str]>`) names it -> the usual placeholder
PLACEHOLDERS = {"integer": "INT", "int": "INT", "str": "TEXT", "text": "TEXT", "float": "FLOAT", "path": "PATH"}


def is_argument(param: Any) -> bool:
    return param.param_type_name == "argument"


def join(opts: list[str]) -> str:
    """`-q, --quiet`: short spellings first, as click writes them."""
    return ", ".join(sorted(opts, key=lambda opt: len(opt) - len(opt.lstrip("-"))))


def type_name(param: Any, ctx: typer.Context) -> str:
    """`int`, `path`, `str` for one value of the option, in either typer's vocabulary."""
    click_type = getattr(param, "type", None)
    name = click_type.name if click_type is not None else param.display_type(ctx).strip("<>")
    return name.removeprefix("list[").removesuffix("]")


def placeholder(param: Any, ctx: typer.Context) -> str:
    """The word after an option (`--seconds FLOAT`) or an argument's name (`IMAGE...`)."""
    if is_argument(param):
        name = param.metavar or param.name.upper()
        name += "..." if param.nargs != 1 else ""
        return name if param.required else f"[{name}]"
    name = type_name(param, ctx)
    return param.metavar or PLACEHOLDERS.get(name, name.upper())


def option_names(param: Any, ctx: typer.Context) -> str:
    """`-q, --quiet`, `--check / --no-check`, `--artifacts PATH`."""
    names = join(param.opts)
    if param.secondary_opts:
        names += " / " + join(param.secondary_opts)
    if not (param.is_flag or param.count):
        names += " " + placeholder(param, ctx)
    return names


class PlainHelp(TyperCommand):
    """A typer command whose usage line and option list use plain placeholders."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        return [self.options_metavar or "[OPTIONS]"] + [placeholder(p, ctx) for p in self.get_params(ctx) if is_argument(p)]

    def format_options(self, ctx: typer.Context, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if is_argument(param):
                arguments.append((placeholder(param, ctx).strip("[]"), record[1]))
            else:
                options.append((option_names(param, ctx), record[1]))
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
