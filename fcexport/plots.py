"""Training plots (loss/accuracy curves, confusion matrix) rendered headless with matplotlib.

Figures are made with matplotlib's object API (`Figure`), never pyplot: no backend is switched and no global
figure state is touched, so a notebook that calls fcexport keeps its own plotting setup."""

from __future__ import annotations

from pathlib import Path

from fcexport.files import atomic_path


def save_curves(history: list[dict], path: Path, best_epoch: int | None = None, title: str = "training") -> None:
    """Loss and accuracy per epoch, train and validation side by side; the kept epoch is marked."""
    from matplotlib.ticker import MaxNLocator

    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for key, ax in (("loss", ax_loss), ("accuracy", ax_acc)):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], marker="." if len(epochs) < 30 else None, label="train")
        if history and history[0].get(f"val_{key}") is not None:
            ax.plot(epochs, [r[f"val_{key}"] for r in history], marker="." if len(epochs) < 30 else None, label="validation")
        if best_epoch:
            ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1, label=f"kept epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers: no 1.25, 1.5 ticks
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def save_confusion(labels, predictions, class_names: list[str], path: Path) -> None:
    """Test-split confusion matrix with class names and each class's recall; cell text shows counts, a colour bar
    the scale."""
    import numpy as np
    from matplotlib.figure import Figure

    n = len(class_names)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
    recall = np.diag(matrix) / np.maximum(matrix.sum(axis=1), 1)
    fig = Figure(figsize=(2.5 + 0.6 * n, 1.0 + 0.6 * n))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="images")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), [f"{name} ({r:.0%})" for name, r in zip(class_names, recall, strict=True)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (recall)")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax.set_title(f"test accuracy {np.trace(matrix) / max(matrix.sum(), 1):.2%}")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
