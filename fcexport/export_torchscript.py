"""Exporter: a model -> frozen TorchScript (model.ts) with its spec in `_extra_files`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from fcexport.files import atomic_path
from fcexport.runtimes import METADATA_FILE, quiet_torchscript_deprecation
from fcexport.spec import ModelSpec


def export_torchscript(model: nn.Module, spec: ModelSpec, path: Path) -> Path:
    """Script, freeze (weights become constants, eval-only ops are removed) and save atomically."""
    with quiet_torchscript_deprecation():
        frozen = torch.jit.freeze(torch.jit.script(model.eval()))
        with atomic_path(path) as tmp:
            torch.jit.save(frozen, str(tmp), _extra_files={METADATA_FILE: json.dumps(spec.to_dict())})
    return path
