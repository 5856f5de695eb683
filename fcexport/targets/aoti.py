"""Exporter and runtime: the fused program compiled ahead of time by AOTInductor (dynamic batch), one package per device.

`torch._inductor.aoti_compile_and_package` turns torch.export's program into a shared library of generated C++ (CPU)
or CUDA kernels, packaged as a .pt2 zip; the spec rides in the library's metadata, which the package also keeps as a
JSON record, so it is read without loading anything. Loading a package runs compiled code: fcx loads one only after
its bytes match the manifest of a folder exported from this model.pt (`Checks.read`), and its structure cannot be
compared with a fresh export (compiling again gives other bytes): verify judges it by its numbers. A package runs
only where it was compiled for: the same CPU instruction set, or the same CUDA compute capability.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from fcexport.errors import FcxError
from fcexport.spec import ModelSpec
from fcexport.targets import (Checks, DeviceUnavailable, Exporter, ExportSettings, Predictor, Runtime, Unsupported,
                              exact_float32, quiet_loggers, quiet_warnings, torch_device, torch_precision, torch_runner)

QUIET = "torch.utils.cpp_extension"  # warns "No CUDA runtime is found" on every CPU machine when inductor loads

FILES = {"cpu": "model.aoti.pt2", "cuda": "model.aoti-cuda.pt2"}
METADATA_KEY = "fcexport"  # the spec, as JSON, in the library's AOTI metadata
MAX_RECORDS = 1_000


def compile_package(program, spec: ModelSpec, device: str) -> bytes:
    """The program exported with a symbolic batch on `device` and compiled there (TF32 off on CUDA: the package is
    an exact artifact), as the package's bytes."""
    import tempfile

    import torch

    from fcexport.targets.pt2 import exported_program

    dev = torch_device(device)
    exported = exported_program(program, spec, dev)
    metadata = {"aot_inductor.metadata": {METADATA_KEY: json.dumps(spec.to_dict())}}
    with tempfile.TemporaryDirectory(prefix="fcx-aoti-") as folder, quiet_warnings(), quiet_loggers(QUIET), exact_float32():
        path = Path(folder) / "model.pt2"
        try:
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path), inductor_configs=metadata)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise FcxError(f"AOTInductor cannot compile this model for {device} ({type(exc).__name__}: {first})") from exc
        return path.read_bytes()


def writer(device: str):
    def write(program, spec: ModelSpec, stage: Path, settings: ExportSettings) -> None:
        from fcexport.files import write_bytes_atomic

        write_bytes_atomic(stage / FILES[device], compile_package(program, spec, device))

    return write


def package_metadata(data: bytes, path: Path) -> tuple[ModelSpec, dict[str, str]]:
    """(spec, AOTI metadata) of a package from its bytes, without loading it: the `*wrapper_metadata.json` record."""
    import zipfile

    from fcexport.files import read_record, stored_zip_records

    records = stored_zip_records(data, path, MAX_RECORDS, deflated=True)
    found = [r for r in records if r.filename.endswith("wrapper_metadata.json")]
    if len(found) != 1:
        raise FcxError(f"{path}: not an AOTInductor package ({len(found)} metadata records)", hint="export")
    try:
        metadata = json.loads(read_record(zipfile.ZipFile(io.BytesIO(data)), found[0], path).decode("utf-8"))
        spec = ModelSpec.from_dict(json.loads(metadata[METADATA_KEY]), str(path))
    except FcxError:
        raise
    except Exception as exc:  # JSON, UTF-8, a missing key
        raise FcxError(f"{path}: not an fcexport AOTInductor package ({type(exc).__name__}: {str(exc)[:100]})",
                       hint="export") from exc
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FcxError(f"{path}: its AOTInductor metadata is not a table of strings", hint="export")
    return spec, metadata


def describe(data: bytes, path: Path) -> tuple[ModelSpec, dict]:
    spec, metadata = package_metadata(data, path)
    return spec, {"compiled for": metadata.get("AOTI_DEVICE_KEY"), "cpu isa": metadata.get("AOTI_CPU_ISA"),
                  "compute capability": metadata.get("AOTI_COMPUTE_CAPABILITY") or None}


def runs_here(metadata: dict[str, str], device: str) -> str | None:
    """Why a package compiled for `metadata`'s machine cannot run on this one's `device`, or None."""
    import torch

    with quiet_loggers(QUIET):
        from torch._inductor.codecache import get_device_information
    if metadata.get("AOTI_DEVICE_KEY") != device:
        return f"it is compiled for {metadata.get('AOTI_DEVICE_KEY')}, not {device}"
    here = get_device_information(device)
    keys = ("AOTI_PLATFORM", "AOTI_MACHINE") + (("AOTI_CPU_ISA",) if device == "cpu" else ("AOTI_COMPUTE_CAPABILITY",))
    differ = [f"{k[5:].lower()} {metadata.get(k)} (here {here[k]})" for k in keys if metadata.get(k) != here[k]]
    if differ:
        return f"it is compiled for another machine: {', '.join(differ)}; export it here (torch {torch.__version__})"
    return None


def open_aoti(files: tuple[Path, ...], device: str, checks: Checks, backend: str) -> Predictor:
    """Vet the package (manifest, spec, the machine it was compiled for), then load it from the very bytes checked."""
    path = files[0]
    dev = torch_device(device)
    data = checks.read(path)
    spec, metadata = package_metadata(data, path)
    checks.vet(path, backend, spec, None)  # its spec against model.pt's; compiled code has no fresh export to match
    if why := runs_here(metadata, device):
        raise DeviceUnavailable(f"{path.name}: {why}", hint=f"export-{backend}")
    try:
        loaded = load_bytes(data)
    except Exception as exc:
        raise Unsupported(f"AOTInductor cannot load {path.name} ({type(exc).__name__}: {str(exc).strip()[:160]})") from exc
    return Predictor(backend, device, path, torch_runner(loaded, dev), spec, precision=torch_precision(device))


def load_bytes(data: bytes):
    """AOTInductor's loader on exactly these bytes: written to a private folder (0700, removed after; the loader
    extracts what it needs), since its loader reads a path (a file object segfaulted with torch 2.11 on CUDA)."""
    import shutil
    import tempfile

    import torch

    folder = Path(tempfile.mkdtemp(prefix="fcx-aoti-"))
    try:
        (folder / "model.pt2").write_bytes(data)
        with quiet_warnings():
            return torch._inductor.aoti_load_package(str(folder / "model.pt2"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _exporter(device: str) -> Exporter:
    name = "aoti" if device == "cpu" else "aoti-cuda"
    return Exporter(name=name, files=(FILES[device],), format=name, write=writer(device), by_default=False,
                    devices=(device,), describe=describe,
                    summary=f"AOTInductor: the fused program compiled to {'C++' if device == 'cpu' else 'CUDA'} "
                            f"for this machine's {device} (dynamic batch)")


EXPORTERS = (_exporter("cpu"), _exporter("cuda"))
RUNTIMES = tuple(Runtime(name=e.name, format=e.name, devices=e.devices, open=open_aoti, runs={e.name: e.name},
                         summary=f"AOTInductor's package loader ({e.devices[0]})") for e in EXPORTERS)
