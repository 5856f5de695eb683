"""An artifacts folder: which file each backend reads, the manifest, and which files are stale.

Backends are named for what they run: `eager` the model as stored (model.pt), `fused` its
BatchNorm-folded copy, `torchscript`, `onnxruntime` and `onnxruntime-int8` the exported files.
"""

from __future__ import annotations

import json
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


def read_manifest(folder: Path) -> dict | None:
    """manifest.json as a dict, None when there is none; a damaged one is an error."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FcxError(f"{path}: unreadable manifest ({type(exc).__name__})", hint="export") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise FcxError(f"{path}: not an fcexport manifest (no 'files')", hint="export")
    return manifest


def record_in_manifest(folder: Path, sources: dict[str, str], versions: dict, created: str, model_sha256: str | None = None) -> Path:
    """Add or refresh the entries of the files in `sources` (name -> sha256 of the model.pt each was made
    from) with their own sha256 and size; keep the other entries whose files are still there, and
    always describe the current model.pt. Written last, atomically: it is what readers trust."""
    folder = Path(folder)
    previous = (read_manifest(folder) or {}).get("files", {})
    files = {}
    for name in BACKEND_FILES.values():
        path = folder / name
        if not path.is_file():
            continue
        if name == MODEL and model_sha256 is not None:  # the hash of the bytes the caller loaded, not a re-read
            files[name] = {"sha256": model_sha256, "bytes": path.stat().st_size}
        elif name == MODEL or name in sources:
            files[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
            if name in sources:
                files[name]["source_sha256"] = sources[name]
        elif name in previous:
            files[name] = previous[name]
    path = folder / MANIFEST
    write_json_atomic(path, {"created": created, "versions": versions, "files": files})
    return path


def check_against_manifest(path: Path, manifest: dict | None, model_sha256: str | None) -> str | None:
    """Why the artifact at `path` cannot be trusted, or None: not listed in the manifest, changed since it
    was written, or made from another model.pt than the folder's current one."""
    name = path.name
    if manifest is None:
        return f"{name}: no {MANIFEST} next to it, so where it came from cannot be checked"
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict):
        return f"{name} is not listed in {MANIFEST} (an interrupted export, or copied in from elsewhere)"
    if entry.get("bytes") != path.stat().st_size or entry.get("sha256") != sha256_file(path):
        return f"{name} changed after it was written (its sha256 differs from {MANIFEST})"
    source = entry.get("source_sha256")
    if model_sha256 is not None and source is not None and source != model_sha256:
        return f"{name} was made from another model.pt than this one (source sha256 {source[:12]}); it is stale"
    return None
