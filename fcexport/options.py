"""`fcx train` options with their defaults, in a torch-free module so the CLI can show them without importing torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from fcexport.errors import FcxError

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam", "adamw")
# Defaults that depend on the model, measured on the Fashion-MNIST subset on 2 CPU cores (README):
# the MLP trains 60 epochs at batch 256; the CNN, ~6x the work per image, 20 epochs at batch 128 (which
# reached 90.8-91.6% over seeds within the 120 s budget) with a small head after its conv stages.
ARCH_DEFAULTS = {
    "mlp": {"hidden": [784, 256], "epochs": 60, "batch_size": 256},
    "softmax": {"hidden": [], "epochs": 60, "batch_size": 256},
    "cnn": {"hidden": [128], "epochs": 20, "batch_size": 128},
}


@dataclass
class TrainOptions:
    """Every training option (one `fcx train` flag each); defaults are the measured best for Fashion-MNIST on 2 CPU cores."""

    data: str = "fashion-mnist"
    data_root: str | None = None
    test_data: str | None = None  # CSV or folder data: its own test set instead of a held-out 20%
    class_names: list[str] | None = None  # CSV or folder data: names of classes 0..N-1
    label_column: str | None = None  # CSV data: the label column's 1-based number or header name [default: the first]
    arch: str = "mlp"
    hidden: list[int] | None = None  # None: ARCH_DEFAULTS[arch]
    channels: list[int] = field(default_factory=lambda: [32, 64])  # cnn only
    batchnorm: bool = True
    dropout: float = 0.0
    activation: str = "relu"
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float = 5e-4
    epochs: int | None = None  # None: ARCH_DEFAULTS[arch]
    batch_size: int | None = None  # None: ARCH_DEFAULTS[arch]
    label_smoothing: float = 0.1
    flip: bool | None = None  # None: on for fashion-mnist only (digits and letters are not mirror-symmetric)
    shift: int = 1
    val_split: float = 0.1
    folds: int = 0
    seed: int = 0
    device: str = "auto"
    artifacts: str = "artifacts"

    def with_arch_defaults(self) -> "TrainOptions":
        """A copy with the options left at None filled in for this architecture."""
        defaults = ARCH_DEFAULTS.get(self.arch, ARCH_DEFAULTS["mlp"])
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return replace(self, **filled)

    def validate(self) -> None:
        if self.arch not in ARCH_DEFAULTS:
            raise FcxError(f"model must be one of {', '.join(ARCH_DEFAULTS)}, got {self.arch}")
        if self.epochs is None or self.batch_size is None or self.hidden is None:
            return self.with_arch_defaults().validate()
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"lr must be > 0, got {self.lr}"),
            (0 <= self.weight_decay < 1, f"weight decay must be in [0, 1), got {self.weight_decay}"),
            (self.lr is None or self.lr <= 10, f"lr must be at most 10, got {self.lr}"),
            (not (self.batchnorm and self.arch != "softmax" and self.batch_size < 2),
             "batch size 1 cannot train BatchNorm: it normalises each batch by that batch's own mean and variance, "
             "which one image does not have; use a batch size of 2 or more, or no BatchNorm"),
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
