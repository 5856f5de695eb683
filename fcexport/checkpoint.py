"""model.pt: a model as data (spec + graph + tensors), loaded with `weights_only=True`.

Every way in (`fcx train`, `fcx import`, `import_model`) ends in this one format, and every later
step reads it the same way: nothing is unpickled beyond tensors and plain values, and the module is
rebuilt by `fcexport.graph` from allow-listed layers, so a checkpoint from anywhere cannot run code.
"""

from __future__ import annotations

import datetime as _dt
import io
import pickle
import zipfile
from pathlib import Path

import torch
from torch import fx, nn

import fcexport
from fcexport import graph
from fcexport.errors import FcxError
from fcexport.files import write_bytes_atomic
from fcexport.spec import ModelSpec

FORMAT = "fcexport.checkpoint"
FORMAT_VERSION = 2


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def save_model(model: nn.Module, spec: ModelSpec, path: str | Path) -> Path:
    """Trace `model` (any fx-traceable module of allow-listed layers) and write it with its spec, atomically."""
    gm = model if isinstance(model, fx.GraphModule) else graph.trace(model)
    spec.provenance = {"created": now_iso(), "torch": str(torch.__version__), "fcexport": fcexport.__version__} | spec.provenance
    checkpoint = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "graph": graph.to_data(gm),
        "state_dict": {k: v.detach().cpu().clone() for k, v in gm.state_dict().items()},
    }
    buffer = io.BytesIO()  # serialised in memory: a full disk is then a Python OSError, never a C++ abort
    torch.save(checkpoint, buffer)
    write_bytes_atomic(path, buffer.getvalue())
    return Path(path)


def load_model(path: str | Path) -> tuple[fx.GraphModule, ModelSpec]:
    """The eval-mode model and its spec; every way the file can be wrong is one FcxError line."""
    path = Path(path)
    checkpoint = _load_dict(path)
    spec = ModelSpec.from_dict(checkpoint.get("spec"), str(path))
    model = graph.from_data(checkpoint.get("graph"), checkpoint.get("state_dict"), str(path))
    return model, spec


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zips with code/ and constants.pkl next to data.pkl."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_weights_file(path: Path) -> object:
    """torch.load with weights_only=True, with TorchScript and pickled whole models refused by name."""
    if not path.is_file():
        raise FcxError(f"{path}: file not found", hint="train-or-import")
    if path.stat().st_size == 0:
        raise FcxError(f"{path}: file is empty")
    if path.suffix.lower() == ".pt2":
        raise FcxError(f"{path}: a torch.export program is compiled code, not weights; save model.state_dict() "
                       "with torch.save and import it with the model's code", hint="import")
    if is_torchscript(path):
        raise FcxError(f"{path}: a TorchScript file is code, not weights, and is not loaded; save model.state_dict() "
                       "with torch.save and import it with the model's code", hint="import")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FcxError(
            f"{path}: refused: it holds pickled Python objects (a whole model saved with torch.save(model)?), which "
            "could run code; save model.state_dict() instead and import it with the model's code", hint="import"
        ) from exc
    except Exception as exc:  # zip/EOF/runtime errors all mean a damaged file
        raise FcxError(f"{path}: corrupt or truncated file ({type(exc).__name__}); copy or save it again") from exc


def _load_dict(path: Path) -> dict:
    checkpoint = load_weights_file(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise FcxError(f"{path}: not an fcexport model (a bare state dict or another tool's file?)", hint="import")
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise FcxError(f"{path}: written by another version of fcexport (format {checkpoint.get('format_version')!r}, "
                       f"this one reads {FORMAT_VERSION})", hint="train-or-import")
    return checkpoint
