"""The `fcx` command line: a thin Typer layer over the `fcexport` library."""
