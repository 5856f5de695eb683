"""Rich rendering of library results: tables to stdout, progress to stderr (stdout stays clean for --json)."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def table(title: str, columns: list[str], rows: list[list], console: Console = out) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, justify="left" if c in columns[:1] else "right")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    console.print(t)


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e5 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def key_values(title: str, items: dict, console: Console = out) -> None:
    table(title, ["", "value"], [[k, v] for k, v in items.items()], console)


class training_progress:
    """Context manager yielding an on_epoch callback that drives a rich progress bar on stderr."""

    def __init__(self, epochs: int, folds: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.total = epochs * max(folds, 1)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=err,
        )

    def __enter__(self):
        self.progress.start()
        task = self.progress.add_task("train", total=self.total, status="")

        def on_epoch(record: dict) -> None:
            fold = f"fold {record['fold']} " if "fold" in record else ""
            val = record["val_accuracy"]
            status = (
                f"{fold}epoch {record['epoch']} loss {record['train_loss']:.4f} "
                + (f"val acc {val:.2%} " if val is not None else "")
                + f"{record['samples_per_second']:,.0f} samples/s"
            )
            self.progress.update(task, advance=1, status=status)

        return on_epoch

    def __exit__(self, *exc):
        self.progress.stop()
        return False


def train_summary(result: dict) -> None:
    m = result["metrics"]
    items = {
        "dataset": result["dataset"],
        "test accuracy": f"{m['test_accuracy']:.2%}",
        "best validation accuracy": f"{m['val_accuracy']:.2%}" if m["val_accuracy"] is not None else None,
        "best epoch": f"{m['best_epoch']} of {m['epochs_run']}",
        "training time": f"{m['train_seconds']:.1f} s on {m['device']}",
        "throughput": f"{m['samples_per_second']:,.0f} samples/s",
        "parameters": f"{m['parameters']:,}",
    }
    cv = m.get("cross_validation")
    if cv:
        items["cross-validation"] = (
            f"{cv['mean_val_accuracy']:.2%} ± {cv['std_val_accuracy']:.2%} over {cv['folds']} folds (kept fold {cv['kept_fold']})"
        )
    if m["interrupted"]:
        items["note"] = "interrupted: kept the best epoch so far"
    items["artifacts"] = result["artifacts"]
    key_values("fcx train", items)
