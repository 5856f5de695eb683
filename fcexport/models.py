"""`fcx train`'s model builders from a plain config dict (stored in the spec as the architecture).

Config keys: arch ("mlp" | "softmax" | "cnn"), input_shape [C, H, W], num_classes, channels (conv
widths, cnn only), hidden (list of widths), batchnorm (bool), dropout (float), activation,
normalize ({"mean", "std"} or None).
Layers get stable names (fc1, bn1, act1, drop1, ..., head), which the stored graph keeps.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from fcexport.errors import FcxError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
ARCHS = ("mlp", "softmax", "cnn")


class Normalize(nn.Module):
    """(x - mean) / std with fixed statistics, one value or one per channel of (N, C, ...) input, so
    every model takes raw [0, 1] pixels. It is an affine map like BatchNorm: `fcexport.folding` folds it
    into the next layer where that is exact.
    """

    def __init__(self, mean: float | list[float], std: float | list[float]):
        super().__init__()
        mean_t, std_t = (torch.tensor(v, dtype=torch.float32).flatten() for v in (mean, std))
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise ValueError(f"mean and std need the same number of values, got {mean_t.numel()} and {std_t.numel()}")
        # one value: a scalar that broadcasts anywhere; per channel: (C, 1, 1) against (N, C, H, W)
        shape = () if mean_t.numel() == 1 else (-1, 1, 1)
        self.register_buffer("mean", mean_t.reshape(shape))
        self.register_buffer("std", std_t.reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def model_config(
    input_shape: list[int],
    num_classes: int,
    hidden: list[int] | None = None,
    batchnorm: bool = True,
    dropout: float = 0.0,
    activation: str = "relu",
    normalize: dict | None = None,
    arch: str = "mlp",
    channels: list[int] | None = None,
) -> dict:
    """A validated model config. `mlp`: hidden Linear layers; `softmax`: one Linear layer (softmax
    regression); `cnn`: Conv3x3 -> BN -> act -> MaxPool2d per entry of `channels`, then the MLP head."""
    config = {
        "arch": arch,
        "input_shape": [int(v) for v in input_shape],
        "num_classes": int(num_classes),
        "channels": [int(c) for c in (channels or [])] if arch == "cnn" else [],
        "hidden": [int(h) for h in (hidden or [])] if arch != "softmax" else [],
        "batchnorm": bool(batchnorm) and arch != "softmax",
        "dropout": float(dropout) if arch != "softmax" else 0.0,
        "activation": activation,
        "normalize": normalize,
    }
    validate_config(config)
    return config


def validate_config(config: dict) -> None:
    """Raise FcxError for a config this version cannot build."""
    try:
        arch, activation = config["arch"], config["activation"]
        dims = [*config["input_shape"], config["num_classes"], *config["hidden"], *config.get("channels", [])]
        dropout = float(config["dropout"])
        normalize = config["normalize"]
    except (KeyError, TypeError) as exc:
        raise FcxError(f"model config is incomplete or malformed (missing {exc})") from exc
    if arch not in ARCHS:
        raise FcxError(f"unknown model arch '{arch}' (expected one of {', '.join(ARCHS)})")
    if activation not in ACTIVATIONS:
        raise FcxError(f"unknown activation '{activation}' (expected one of {', '.join(ACTIVATIONS)})")
    if len(config["input_shape"]) != 3 or any(int(d) <= 0 for d in dims):
        raise FcxError(f"model sizes must be positive and input_shape [C, H, W]: {config}")
    if arch == "cnn":
        stages = len(config["channels"])
        if not stages or min(config["input_shape"][1:]) >> stages < 1:
            raise FcxError(f"a cnn needs 1 or more conv stages, each halving the image: {stages} stages on "
                           f"{config['input_shape'][1]}x{config['input_shape'][2]} images")
    if not 0.0 <= dropout < 1.0:
        raise FcxError(f"dropout must be in [0, 1), got {dropout}")
    if normalize is not None and not (float(normalize["std"]) > 0 and math.isfinite(float(normalize["mean"]))):
        raise FcxError(f"normalize needs a finite mean and a positive std, got {normalize}")


def build_model(config: dict) -> nn.Sequential:
    """mlp/softmax: Flatten -> [Normalize] -> (fc -> [bn] -> act -> [dropout]) * len(hidden) -> head.
    cnn: [Normalize] -> (conv -> [bn] -> act -> pool) * len(channels) -> Flatten -> the same head."""
    validate_config(config)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels, height, width = config["input_shape"]
    normalize = Normalize(config["normalize"]["mean"], config["normalize"]["std"]) if config["normalize"] else None
    if config["arch"] == "cnn":
        if normalize is not None:
            layers["normalize"] = normalize  # before a padded Conv it stays explicit: folding is exact only without padding
        for i, out in enumerate(config["channels"], start=1):
            layers[f"conv{i}"] = nn.Conv2d(channels, out, 3, padding=1)
            if config["batchnorm"]:
                layers[f"conv_bn{i}"] = nn.BatchNorm2d(out)
            layers[f"conv_act{i}"] = ACTIVATIONS[config["activation"]]()
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            channels, height, width = out, height // 2, width // 2
        layers["flatten"] = nn.Flatten()
    else:
        layers["flatten"] = nn.Flatten()
        if normalize is not None:
            layers["normalize"] = normalize
    features = channels * height * width
    for i, out in enumerate(config["hidden"], start=1):
        layers[f"fc{i}"] = nn.Linear(features, out)
        if config["batchnorm"]:
            layers[f"bn{i}"] = nn.BatchNorm1d(out)
        layers[f"act{i}"] = ACTIVATIONS[config["activation"]]()
        if config["dropout"] > 0:
            layers[f"drop{i}"] = nn.Dropout(config["dropout"])
        features = out
    layers["head"] = nn.Linear(features, config["num_classes"])
    return nn.Sequential(layers)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_for(dataset, opts) -> tuple[nn.Module, dict]:
    """A fresh model for `dataset` as `opts` describe it (seeded by opts.seed), with its config; the input
    normalisation is measured on the training images."""
    from fcexport.data import normalization_stats

    mean, std = normalization_stats(dataset.train.images)
    config = model_config(
        dataset.input_shape,
        len(dataset.class_names),
        hidden=opts.hidden,
        channels=opts.channels,
        batchnorm=opts.batchnorm,
        dropout=opts.dropout,
        activation=opts.activation,
        normalize={"mean": mean, "std": std},
        arch=opts.arch,
    )
    torch.manual_seed(opts.seed)
    return build_model(config), config
