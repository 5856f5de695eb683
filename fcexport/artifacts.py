"""An artifacts folder: which file each backend reads, the manifest, and which files are stale.

Backends are named for what they run: `eager` the model as stored (model.pt), `fused` its
BatchNorm-folded copy, `torchscript`, `onnxruntime` and `onnxruntime-int8` the exported files.
"""

from __future__ import annotations

from pathlib import Path

from fcexport.errors import FcxError
from fcexport.files import sha256_file, write_json_atomic

MODEL = "model.pt"
FUSED = "model.fused.pt"
MANIFEST = "manifest.json"
BACKEND_FILES = {
    "eager": MODEL,
    "fused": FUSED,
    "torchscript": "model.ts",
    "onnxruntime": "model.onnx",
    "onnxruntime-int8": "model.int8.onnx",  # opt-in, approximate: see fcexport.export_onnx.export_int8_onnx
}
BACKENDS = tuple(BACKEND_FILES)
# The step that writes each backend's file (an errors.HINTS key).
BACKEND_MADE_BY = {"eager": "train-or-import", "fused": "fuse", "torchscript": "export", "onnxruntime": "export",
                   "onnxruntime-int8": "export-int8"}
APPROXIMATE_BACKENDS = ("onnxruntime-int8",)  # judged by top-1 agreement and accuracy, not float tolerances
DEFAULT_ORDER = ("model.onnx", "model.ts", FUSED, MODEL)  # what predict uses when not told


def find_default_model(artifacts: Path) -> Path:
    """The best artifact present: ONNX, then TorchScript, then fused model, then model."""
    for name in DEFAULT_ORDER:
        if (artifacts / name).is_file():
            return artifacts / name
    raise FcxError(f"{artifacts}: no model found ({', '.join(DEFAULT_ORDER)})", hint="train-or-import")


def write_manifest(folder: Path, versions: dict, created: str) -> Path:
    """manifest.json: every model file in the folder with its sha256 and size, plus tool versions."""
    files = {
        name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for name in (*BACKEND_FILES.values(),)
        if (folder / name).is_file()
    }
    path = folder / MANIFEST
    write_json_atomic(path, {"created": created, "versions": versions, "files": files})
    return path


def made_from_other_model(spec_provenance: dict, model_sha256: str) -> str | None:
    """A note when an artifact records another source model.pt than this one: the usual stale export."""
    source = spec_provenance.get("source_sha256")
    if source and source != model_sha256:
        return f"made from another model.pt than this one (source sha256 {source[:12]}); export it again?"
    return None
