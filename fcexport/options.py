"""`fcx train` options with their defaults, in a torch-free module so the CLI can show them without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fcexport.errors import FcxError

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam", "adamw")
# Hidden widths of the classifier head when not given: the MLP's measured default, and a small head
# after the CNN's conv stages (which already extract the features).
DEFAULT_HIDDEN = {"mlp": [784, 256], "softmax": [], "cnn": [128]}


@dataclass
class TrainOptions:
    """Every training option (one `fcx train` flag each); defaults are the measured best for Fashion-MNIST on 2 CPU cores."""

    data: str = "fashion-mnist"
    data_root: str | None = None
    test_data: str | None = None  # CSV or folder data: its own test set instead of a held-out 20%
    class_names: list[str] | None = None  # CSV or folder data: names of classes 0..N-1
    arch: str = "mlp"
    hidden: list[int] | None = None  # None: DEFAULT_HIDDEN[arch]
    channels: list[int] = field(default_factory=lambda: [32, 64])  # cnn only
    batchnorm: bool = True
    dropout: float = 0.0
    activation: str = "relu"
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float = 5e-4
    epochs: int = 60
    batch_size: int = 256
    label_smoothing: float = 0.1
    flip: bool | None = None  # None: on for fashion-mnist only (digits and letters are not mirror-symmetric)
    shift: int = 1
    val_split: float = 0.1
    folds: int = 0
    seed: int = 0
    device: str = "auto"
    artifacts: str = "artifacts"

    def hidden_widths(self) -> list[int]:
        return list(self.hidden) if self.hidden is not None else list(DEFAULT_HIDDEN.get(self.arch, []))

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.val_split < 1, f"val split must be in [0, 1), got {self.val_split}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (0 <= self.shift <= 8, f"shift must be in 0..8 pixels, got {self.shift}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.folds == 0 or self.folds >= 2, f"folds must be 0 (off) or >= 2, got {self.folds}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FcxError(message)
