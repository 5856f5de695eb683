"""Checkpoints: a dict of tensors and plain types only, always loaded with `weights_only=True`.

Nothing is pickled beyond tensors, so a checkpoint from an untrusted source cannot run code, and
the dict describes itself (config, class names, input shape, normalisation, provenance).
"""

from __future__ import annotations

import datetime as _dt
import json
import pickle
from pathlib import Path

import torch
from torch import nn

import fcexport
from fcexport.errors import FcxError
from fcexport.files import atomic_path
from fcexport.models import build_model, validate_config

FORMAT = "fcexport.checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("config", "state_dict", "class_names", "input_shape")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_checkpoint(model: nn.Module, config: dict, class_names: list[str], **info) -> dict:
    """Bundle a model with everything needed to use it later; `info` adds dataset, metrics, provenance...

    Everything but the state dict goes through a JSON round trip, so only plain types are stored
    (e.g. torch.__version__ is a str subclass that weights_only loading would refuse).
    """
    described = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "class_names": list(class_names),
        "input_shape": list(config["input_shape"]),
        "normalization": info.pop("normalization", config.get("normalize")),
        "provenance": {"created": now_iso(), "torch": str(torch.__version__), "fcexport": fcexport.__version__}
        | info.pop("provenance", {}),
        **info,
    }
    plain = json.loads(json.dumps(described))
    plain["state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return plain


def save_checkpoint(checkpoint: dict, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load and fully validate a checkpoint (weights included); every way it can be wrong is one FcxError line."""
    return load_model(path)[1]


def _load_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FcxError(f"{path}: checkpoint not found; run `fcx train` first or pass the checkpoint's path")
    if path.stat().st_size == 0:
        raise FcxError(f"{path}: file is empty; retrain or copy the checkpoint again")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FcxError(
            f"{path}: refused: it holds pickled Python objects, which could run code "
            "(loaded with weights_only=True); only fcexport checkpoints are accepted"
        ) from exc
    except Exception as exc:  # zip/EOF/runtime errors all mean a damaged file
        raise FcxError(f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}); retrain or copy it again") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise FcxError(f"{path}: not an fcexport checkpoint (a bare state dict or another tool's file?); train one with `fcx train`")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise FcxError(f"{path}: checkpoint lacks {', '.join(missing)}; it was not written by this version of fcexport")
    try:
        validate_config(checkpoint["config"])
    except FcxError as exc:
        raise FcxError(f"{path}: {exc}") from exc
    return checkpoint


def model_from_checkpoint(checkpoint: dict, path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild the eval-mode model; mismatched or non-finite weights are refused, never half-loaded."""
    model = build_model(checkpoint["config"])
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise FcxError(f"{path}: weights do not match the model config ({first_line})") from exc
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FcxError(f"{path}: weight '{name}' holds NaN or Inf values; the model is unusable, retrain it")
    return model.eval()


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """The eval-mode model and its checkpoint dict."""
    checkpoint = _load_dict(path)
    return model_from_checkpoint(checkpoint, path), checkpoint


def artifact_metadata(checkpoint: dict) -> dict:
    """What an exported artifact carries so it can be used without the training code."""
    return {
        "class_names": checkpoint["class_names"],
        "input_shape": checkpoint["input_shape"],
        "input": "float32 pixels in [0, 1], shape (N, C, H, W); normalisation is folded into the model",
        "normalization": checkpoint.get("normalization"),
        "preprocess": checkpoint.get("preprocess"),
        "config": checkpoint["config"],
        "dataset": checkpoint.get("dataset"),
        "provenance": checkpoint.get("provenance", {}),
    }
