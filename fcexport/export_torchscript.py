"""Exporter: a model -> frozen TorchScript (model.ts) with its spec in `_extra_files`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from fcexport.files import write_bytes_atomic
from fcexport.runtimes import METADATA_FILE, quiet_torchscript_deprecation
from fcexport.spec import ModelSpec


def export_torchscript(model: nn.Module, spec: ModelSpec, path: Path) -> Path:
    """Script, freeze (weights become constants, eval-only ops are removed) and save atomically."""
    buffer = io.BytesIO()  # serialised in memory: a full disk is then a Python OSError, never a C++ abort
    with quiet_torchscript_deprecation():
        frozen = torch.jit.freeze(torch.jit.script(model.eval()))
        torch.jit.save(frozen, buffer, _extra_files={METADATA_FILE: json.dumps(spec.to_dict())})
    write_bytes_atomic(path, buffer.getvalue())
    return path
