"""Every exporter and runtime fcx knows, and the backends they make: one runtime on one artifact's files.

A new target is one module (in fcexport/targets) declaring EXPORTER and/or RUNTIME (or EXPORTERS / RUNTIMES, several
variants of one target), and its name in PLUGINS.
Everything else (export's formats, verify's and bench's backends, predict's choices, the CLI's help) is
built from here.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, replace
from pathlib import Path

from fcexport.errors import FcxError
from fcexport.targets import DEVICES, Checks, DeviceUnavailable, Exporter, Predictor, Runtime

# Modules that declare EXPORTER and/or RUNTIME, in the order verify and bench list them (another package's module
# can be named here too).
PLUGINS = tuple(f"fcexport.targets.{name}" for name in ("program", "torchscript", "onnx", "int8", "int8_static", "pt2", "aoti", "triton", "reference", "onnxruntime", "openvino"))
MODEL, FUSED = "model.pt", "model.fused.pt"
# Artifacts that no exporter writes: the model as stored, and its BatchNorm-folded copy (fcx fuse-bn).
STORED_ARTIFACTS = {"model": (MODEL,), "fused": (FUSED,)}
STORED_MADE_BY = {"model": "train-or-import", "fused": "fuse"}


@dataclass(frozen=True)
class Backend:
    """One runtime on one artifact: a row of verify, bench and predict."""

    name: str
    runtime: Runtime
    artifact: str
    files: tuple[str, ...]
    devices: tuple[str, ...]
    approximate: bool
    made_by: str  # the errors.HINTS step that writes its files


@functools.cache
def _plugins() -> tuple:
    return tuple(importlib.import_module(name) for name in PLUGINS)


@functools.cache
def exporters() -> dict[str, Exporter]:
    """Exporters by name, in the order they run (one that builds on another comes after it)."""
    declared = [e for p in _plugins() for e in ((p.EXPORTER,) if hasattr(p, "EXPORTER") else ()) + tuple(getattr(p, "EXPORTERS", ()))]
    return {e.name: e for e in declared}


@functools.cache
def runtimes() -> dict[str, Runtime]:
    declared = [r for p in _plugins() for r in ((p.RUNTIME,) if hasattr(p, "RUNTIME") else ()) + tuple(getattr(p, "RUNTIMES", ()))]
    return {r.name: r for r in declared}


@functools.cache
def artifacts() -> dict[str, tuple[str, ...]]:
    """Artifact name -> the files it is made of (relative paths)."""
    return {**STORED_ARTIFACTS, **{e.name: e.files for e in exporters().values()}}


@functools.cache
def backends() -> dict[str, Backend]:
    """Backend name -> Backend, in the order verify and bench list them."""
    found = {}
    for runtime in runtimes().values():
        for name, artifact in runtime.runs.items():
            exporter = exporters().get(artifact)
            made_by = STORED_MADE_BY.get(artifact) or ("export" if exporter.by_default else f"export-{artifact}")
            devices = tuple(d for d in runtime.devices if exporter is None or d in exporter.devices)
            approximate = runtime.approximate or bool(exporter and exporter.approximate)
            found[name] = Backend(name, runtime, artifact, artifacts()[artifact], devices, approximate, made_by)
    return found


def backend(name: str) -> Backend:
    if name not in backends():
        raise FcxError(f"unknown backend '{name}'; backends are {', '.join(backends())}")
    return backends()[name]


def verified_by_default() -> tuple[str, ...]:
    """The backends fcx verify judges unless named: all but runtime variants that compute in a lower precision than the
    file was exported for (openvino-bf16 reads model.onnx: nobody exported for it)."""
    return tuple(name for name, b in backends().items() if not b.runtime.approximate)


def default_exporters() -> tuple[str, ...]:
    return tuple(name for name, e in exporters().items() if e.by_default)


def open_backend(name: str, folder: Path, device: str, checks: Checks = Checks()) -> Predictor:
    """A backend's files from `folder`, opened on `device`; DeviceUnavailable when it cannot run here (a device it
    does not use, a runtime not installed, files not made yet)."""
    chosen = backend(name)
    paths = tuple(Path(folder) / f for f in chosen.files)
    return _open(chosen, paths, device, checks)


def open_predictor(path: Path, device: str = "cpu", checks: Checks = Checks(), runtime: str | None = None) -> Predictor:
    """Any one model file, by its name (model.int8.onnx) or else its suffix (.onnx, .ts, .pt, .pt2), with the
    first runtime registered for it, or `runtime`."""
    path = Path(path)
    if not path.is_file():
        raise FcxError(f"{path}: model file not found; pass an existing {', '.join(sorted(suffixes()))} file")
    artifact = artifact_of(path)
    choices = [b for b in backends().values() if b.artifact == artifact]
    if runtime is not None:
        choices = [b for b in choices if b.runtime.name == runtime]
        if not choices:
            able = ", ".join(sorted({b.runtime.name for b in backends().values() if b.artifact == artifact}))
            raise FcxError(f"{path}: runtime '{runtime}' does not run this file; these do: {able}")
    return _open(choices[0], (path,), device, checks)


def artifact_of(path: Path) -> str:
    """The artifact a file is: by its exact name first, then by its suffix."""
    for artifact, files in artifacts().items():
        if files == (path.name,):
            return artifact
    suffix = path.suffix.lower()
    if suffix in suffixes():
        return suffixes()[suffix]
    raise FcxError(f"{path}: unknown model format '{suffix}'; expected {', '.join(sorted(suffixes()))}")


@functools.cache
def suffixes() -> dict[str, str]:
    """File suffix -> the first artifact whose single file has it (.onnx -> onnx, not int8)."""
    found = {}
    for artifact, files in artifacts().items():
        if len(files) == 1 and not files[0].endswith("/"):  # a folder (a Triton repository) is not one model file
            found.setdefault(Path(files[0]).suffix.lower(), artifact)
    return found


def _open(chosen: Backend, paths: tuple[Path, ...], device: str, checks: Checks) -> Predictor:
    if device not in DEVICES:
        raise FcxError(f"device must be {' or '.join(DEVICES)}, got {device}")
    if device not in chosen.devices:
        raise DeviceUnavailable(f"{chosen.name} runs on {', '.join(chosen.devices)} only",  # the fix: the device it runs on
                                hint="cpu" if "cpu" in chosen.devices else None)
    if why := chosen.runtime.missing():
        raise DeviceUnavailable(why)
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise DeviceUnavailable(f"{absent[0]} not found", hint=chosen.made_by)
    predictor = replace(chosen.runtime.open(paths, device, checks, chosen.name), noise_scale=chosen.runtime.noise_scale)
    return replace(predictor, approximate=chosen.approximate) if chosen.approximate else predictor
