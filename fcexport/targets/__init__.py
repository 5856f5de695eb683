"""What a target is. An exporter turns a program into files; a runtime turns files into a Predictor.

Each target is one module in this package that declares `EXPORTER = Exporter(...)` and/or
`RUNTIME = Runtime(...)`, plus one line in `fcexport.registry.PLUGINS`. Plugins import nothing heavy
at module level (torch, onnxruntime, openvino are imported when used), so listing them is free and
`fcx predict` on an ONNX model never imports torch.

Vocabulary: an *artifact* is a named set of files (`model`, `fused`, or an exporter's name such as
`onnx`); its *format* says which runtimes can read it; a *backend* is one runtime on one artifact
(`onnxruntime` on model.onnx, `openvino` on the same file), the name verify, bench and predict rows use.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fcexport.errors import FcxError
from fcexport.spec import ModelSpec

DEVICES = ("cpu", "cuda")
METADATA_FILE = "metadata.json"  # the archive record (TorchScript extra file, pt2 extra file) holding the spec
MAX_ARTIFACT_BYTES = 4 << 30  # the largest exported file read (model.pt's own limit): a 60M-parameter model is ~240 MB


class DeviceUnavailable(FcxError):
    """This runtime/device pair cannot run here (no CUDA, no ORT CUDA provider, a runtime not installed).

    verify and bench list it as skipped; elsewhere (predict on cuda) it is a user error.
    """


class Unsupported(FcxError):
    """This runtime cannot compile or run a file that passed every check (an op it lacks, say): verify and bench list it
    as a row that says so, and the other runtimes still judge the file; elsewhere (predict) it is a user error."""


class Refused(FcxError):
    """An artifact turned away before it was loaded (its bytes are not what the manifest lists, or `admit` found it
    differs from a fresh export), with the reasons; `summary` says which in a few words."""

    def __init__(self, path: Path, problems: list[str], summary: str | None = None, hint: str | None = None):
        super().__init__(f"{path}: not loaded: {summary or '; '.join(problems)}", hint=hint)
        self.problems, self.summary = problems, summary or "it differs from model.pt"


# admit(backend, spec, fingerprint) -> problems: a check on an artifact's bytes that runs before it is loaded
Admit = Callable[[str, ModelSpec, dict], list]
# source(spec) -> the checked program an artifact says it was exported from (for runtimes that rebuild from it)
Source = Callable[[ModelSpec], object]
# vouch(path, data) -> why these bytes are not the ones the folder's manifest lists, or None
Vouch = Callable[[Path, bytes], "str | None"]


@dataclass(frozen=True)
class Checks:
    """What the caller lets a runtime lean on. A runtime reads each file with `read` (once: the bytes it hashes are
    the bytes it loads, checked by `vouch` against the manifest), lets `vet` see its spec and fingerprint before
    loading (`admit`: fcx verify's comparison with a fresh export), and asks `source` for the checked program it
    was exported from when it rebuilds rather than unpickles (pt2)."""

    admit: Admit | None = None
    source: Source | None = None
    vouch: Vouch | None = None

    def read(self, path: Path, limit: int = MAX_ARTIFACT_BYTES) -> bytes:
        data = read_bytes(path, limit)
        problem = self.vouch(Path(path), data) if self.vouch else None
        if problem:
            raise Refused(path, [f"{problem}: not loaded"], problem, hint="export")
        return data

    def vet(self, path: Path, backend: str, spec: ModelSpec, fingerprint: dict) -> None:
        problems = self.admit(backend, spec, fingerprint) if self.admit else []
        if problems:
            raise Refused(path, problems)


@dataclass(frozen=True)
class Predictor:
    """Runs a model: float32 pixels (N, C, H, W) in [0, 1] -> logits (N, *spec.output_shape), in batches of at most `batch`. (What an
    artifact computes with is checked before it becomes one: see `Checks`.) `run` returns one array, or for a model with
    other outputs (fcexport.program.Program.extras) a tuple of every output, the predicted one first."""

    backend: str
    device: str
    source: Path | str  # the file it runs, or where it is served (a URL and model name)
    run: Callable[[np.ndarray], "np.ndarray | tuple[np.ndarray, ...]"]
    spec: ModelSpec
    batch: int | None = None  # images per call; None: chunk_size(the spec's input shape and peak bytes)
    approximate: bool = False  # judged by top-1 agreement and accuracy, not float tolerances (int8)
    logits_only: bool = False  # asked for the logits alone (a served model): its other outputs are not compared
    precision: str = "float32"  # what it computes in, said in verify's and bench's rows
    noise_scale: float = 1.0  # the exact rule's factor is multiplied by this (a runtime with its own float32 kernels)
    # where a runtime can show its intermediate values: (the checked program it computes, layers(x) -> {layer: (type,
    # float32 output)}), so a failing row names the first layer that leaves its noise band
    layers: tuple | None = None
    # an approximate file's () -> {layer: run(x) of the file remade with that layer left exact}: what carries its error
    left_float: Callable[[], dict] | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Every output for `x` (the logits first), the logits checked against the spec's shape."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        batch = self.batch or chunk_size(self.spec.input_shape, self.spec.peak_bytes)
        parts = [self.run(x[i : i + batch]) for i in range(0, len(x), batch)] if len(x) else [self.run(x)]
        parts = [part if isinstance(part, tuple) else (part,) for part in parts]
        if len({len(part) for part in parts}) != 1:
            raise FcxError(f"{self.source}: the model returned a different number of outputs from one batch to the next")
        found = tuple(group[0] if len(group) == 1 else np.concatenate(group) for group in zip(*parts))
        logits = found[0]
        expected = (len(x), *self.spec.output_shape)
        if getattr(logits, "shape", None) != expected:
            raise FcxError(f"{self.source}: the model returned shape {getattr(logits, 'shape', type(logits).__name__)} "
                           f"for {len(x)} images, but its spec names {expected[1]} classes: expected {expected}")
        return found


CHUNK_BYTES = 8 << 20
CALL_BYTES = 256 << 20  # the values a call keeps alive at once, in all: 224-px classifiers keep 5-11 MiB an image


def chunk_size(input_shape, peak_bytes: int = 0, itemsize: int = 4) -> int:
    """Images per runtime call: the largest power of two from 1 to 256 whose input fits CHUNK_BYTES, so a chunk's
    activations stay near the caches, and whose live values (`peak_bytes` an image in float32, spec.peak_bytes) fit
    CALL_BYTES, so a model small at its input but large inside cannot make a batch take gigabytes; `itemsize` 8 for
    a float64 run. Measured on resnet50 at 224 px (2 cores): torch runtimes 36 ms an image at 8 a call against 76 at
    128 and 175 at 256; onnxruntime and OpenVINO 24-28 either way. A 28-px MLP keeps 256."""
    scale = itemsize / 4
    fits = min(256, int(CHUNK_BYTES // (itemsize * math.prod(input_shape))), int(CALL_BYTES // max(1, peak_bytes * scale)))
    fits = max(1, fits)
    return 1 << (fits.bit_length() - 1)


MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")  # a Triton model name: a folder name, a URL path part
MAX_SERVED_BATCH = 4096
MAX_INSTANCES = 64


@dataclass(frozen=True)
class TritonSettings:
    """A Triton model repository's choices: the model's name, the largest batch it accepts (the dynamic batcher
    merges requests up to it), how many copies run side by side, and whether they run on GPUs."""

    name: str = "classifier"
    max_batch_size: int = 64
    instances: int = 1
    gpu: bool = False

    def __post_init__(self):
        if not isinstance(self.name, str) or not MODEL_NAME.fullmatch(self.name) or self.name.endswith("_torchscript"):
            raise FcxError(f"Triton model name must be 1-100 letters, digits, '_', '.' or '-' (not starting with '.' or '-', "
                           f"not ending in _torchscript), got {str(self.name)[:100]!r}")
        if not isinstance(self.max_batch_size, int) or not 1 <= self.max_batch_size <= MAX_SERVED_BATCH:
            raise FcxError(f"max batch size must be from 1 to {MAX_SERVED_BATCH}, got {self.max_batch_size}")
        if not isinstance(self.instances, int) or not 1 <= self.instances <= MAX_INSTANCES:
            raise FcxError(f"instances must be from 1 to {MAX_INSTANCES}, got {self.instances}")


RANDOM_CALIBRATION = "seeded random inputs (the structure only: verify's fresh export)"


@dataclass(frozen=True)
class ExportSettings:
    """What the user chose for an export; each exporter reads what applies to it."""

    opset: int = 18
    triton: TritonSettings = TritonSettings()
    calibration: str | None = None  # int8-static: a folder of images, else the model's own dataset (or RANDOM_CALIBRATION)

    def __post_init__(self):
        if not isinstance(self.opset, int) or not 17 <= self.opset <= 30:
            raise FcxError(f"ONNX opset must be from 17 to 30 (18 is the exporter's own), got {self.opset}")


@dataclass(frozen=True)
class Exporter:
    """Writes `files` (paths relative to the folder; one ending in '/' is a folder the exporter owns whole) into a
    staging folder from a program and its spec. `fingerprint(data)` says what a written file computes with (the
    runtime reports the same for a file it opens, so verify can compare an artifact with a fresh export); `check`
    says what is wrong with the written files as a set, read from a folder. `builds_on` names an exporter whose
    files this one reads from the staging folder."""

    name: str
    files: tuple[str, ...]
    format: str
    write: Callable[[object, ModelSpec, Path, ExportSettings], None]
    summary: str
    fingerprint: Callable[[bytes], dict] | None = None
    check: Callable[[Path, Callable[[Path], bytes]], list[str]] | None = None  # (folder, read) -> problems
    builds_on: str | None = None
    from_source: bool = False  # written from model.pt's own program, not the folded one (reference: model.pt's answers)
    by_default: bool = True
    approximate: bool = False
    devices: tuple[str, ...] = DEVICES  # where its files can run at all (int8: CPU kernels only)
    # (spec, details), read but never run: from a file's bytes, or for a folder artifact through read(path) -> bytes
    describe: Callable[[bytes | Callable[[Path], bytes], Path], tuple[ModelSpec, dict]] | None = None


@dataclass(frozen=True)
class Runtime:
    """Opens an artifact of `format` on one of `devices`: `open(files, device, checks) -> Predictor`. `runs` maps
    each backend it provides to the artifact it reads; `missing()` says why it cannot run here (not installed)."""

    name: str
    format: str
    devices: tuple[str, ...]
    open: Callable[[tuple[Path, ...], str, Checks, str], Predictor]
    runs: dict[str, str]
    summary: str
    missing: Callable[[], str | None] = field(default=lambda: None)
    approximate: bool = False  # computes in lower precision than float32 (judged like int8, never picked unasked)
    noise_scale: float = 1.0  # see Predictor.noise_scale; above 1 only where calibration showed it (said in its rows)


# ---- helpers the plugins share ------------------------------------------------------------


def read_bytes(path: Path, limit: int = MAX_ARTIFACT_BYTES) -> bytes:
    """The whole file, refused before reading when it is larger than `limit` or not a regular file."""
    import stat

    try:
        info = Path(path).stat()
        if not stat.S_ISREG(info.st_mode):
            raise FcxError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise FcxError(f"{path}: {info.st_size:,} bytes is larger than fcexport reads ({limit:,})")
        with open(path, "rb") as f:
            data = f.read(info.st_size + 1)  # one more, to see growth since stat (read(n) reserves n bytes)
    except OSError as exc:
        raise FcxError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(data) != info.st_size:
        raise FcxError(f"{path}: changed while it was read (is something writing it?); try again")
    return data


def torch_device(device: str):
    import torch

    if device not in DEVICES:
        raise FcxError(f"device must be {' or '.join(DEVICES)}, got {device}")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("no CUDA device here: torch.cuda.is_available() is False", hint="cpu")
    return torch.device(device)


EXACT_CUDA = "float32 (TF32 off)"  # the precision of every exact torch row on CUDA


def torch_precision(device: str) -> str:
    """What a torch runtime computes in on `device`: true float32 everywhere (exact_float32 turns CUDA's TF32 off)."""
    return EXACT_CUDA if device == "cuda" else "float32"


@contextlib.contextmanager
def exact_float32():
    """True float32 for this block on CUDA: cuDNN convolutions and cuBLAS matmuls default to TF32 on Ampere and
    later (about 1e-3 relative error), which an exact row must not hide. Restores the caller's settings after, so
    the library leaves no process-wide change behind (training may keep TF32)."""
    import torch

    backends = torch.backends
    if hasattr(backends.cudnn, "conv") and hasattr(backends.cudnn.conv, "fp32_precision"):  # torch >= 2.9
        knobs = [(backends.cudnn.conv, "fp32_precision", "ieee"), (backends.cuda.matmul, "fp32_precision", "ieee")]
    else:
        knobs = [(backends.cudnn, "allow_tf32", False), (backends.cuda.matmul, "allow_tf32", False)]
    saved = [getattr(owner, name) for owner, name, _ in knobs]
    try:
        for owner, name, value in knobs:
            setattr(owner, name, value)
        yield
    finally:
        for (owner, name, _), value in zip(knobs, saved):
            setattr(owner, name, value)


def torch_runner(module, dev):
    """run(x) for a torch callable on `dev`: numpy in, float32 numpy out, no autograd, true float32 on CUDA (the
    copy back to the host synchronises, so a timed call includes the GPU's work)."""
    import torch

    def run(x: np.ndarray):
        with torch.inference_mode(), exact_float32():
            found = module(torch.from_numpy(x).to(dev))
            if isinstance(found, (tuple, list)):
                return tuple(value.float().cpu().numpy() for value in found)
            return found.float().cpu().numpy()

    return run


def module_predictor(module, backend: str, device: str, source: Path, spec: ModelSpec, batch: int | None = None,
                     layers: tuple | None = None) -> Predictor:
    """Wrap an nn.Module or ScriptModule that the predictor owns (made for it: it is moved to `device` and put in
    eval mode)."""
    dev = torch_device(device)
    return Predictor(backend, device, source, torch_runner(module.to(dev).eval(), dev), spec, batch,
                     precision=torch_precision(device), layers=layers)


def tapped_layers(program, spec: ModelSpec, run_tap) -> tuple:
    """A Predictor's `layers` for a runtime of exported files: (the checked program, layers(x)), where layers(x) calls
    `run_tap(x)` (the program's fcexport.program.LayerTap copy, exported and run as the runtime runs its artifact)
    and splits that (N, values) answer into each layer's output."""
    import torch

    from fcexport.program import ProgramModule, layer_values

    def layers(x: np.ndarray) -> dict:
        x = np.ascontiguousarray(x, dtype=np.float32)
        shapes = {name: (kind, value.shape) for name, (kind, value) in layer_values(ProgramModule(program), torch.from_numpy(x)).items()}
        flat = run_tap(x)
        found, at = {}, math.prod(spec.output_shape)
        for name, (kind, shape) in shapes.items():
            size = int(np.prod(shape[1:]))
            found[name] = (kind, flat[:, at : at + size].reshape(shape))
            at += size
        return found

    return program, layers


MAX_ARCHIVE_RECORDS = 100_000
TORCH_MANGLE = re.compile(rb"___torch_mangle_\d+")


def archive_fingerprint(data: bytes, path: Path | str, metadata: str, ignored=lambda name: False,
                        canonical=lambda name, body: body) -> tuple[ModelSpec, dict[str, str]]:
    """(spec, fingerprint) of a torch zip archive (TorchScript, pt2) from its bytes, without loading it: every
    record by its sha256, but the one named `metadata` (the spec, compared on its own) and those `ignored`
    (per-save ids); `canonical(name, body)` drops what varies from one export to the next. torch's per-process
    class-name counters (`___torch_mangle_N`) are normalised, so two exports of one program match and any other
    change does not."""
    import zipfile

    from fcexport.files import read_record, stored_zip_records

    records = stored_zip_records(data, path, MAX_ARCHIVE_RECORDS, deflated=True)
    folders = {r.filename.split("/", 1)[0] for r in records}
    if len(folders) > 1 or any("/" not in r.filename for r in records):
        raise FcxError(f"{path}: records outside one top folder ({', '.join(sorted(folders))[:100]}): not a torch archive", hint="export")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        items, spec = {}, None
        for record in records:
            name = TORCH_MANGLE.sub(b"___torch_mangle_N", record.filename.split("/", 1)[-1].encode()).decode()
            if ignored(name):
                continue
            body = read_record(archive, record, path)
            if name == metadata:
                spec = ModelSpec.from_dict(json.loads(body.decode("utf-8")), str(path))
                continue
            body = TORCH_MANGLE.sub(b"___torch_mangle_N", canonical(name, body))
            items[f"record '{name}'"] = hashlib.sha256(body).hexdigest()
    except FcxError:
        raise
    except Exception as exc:  # BadZipFile, JSON, UTF-8
        raise FcxError(f"{path}: not a valid fcexport archive ({type(exc).__name__}: {str(exc)[:100]})", hint="export") from exc
    if spec is None:
        raise FcxError(f"{path}: not a valid fcexport archive (no fcexport metadata)", hint="export")
    return spec, items


def archive_description(fingerprint):
    """An Exporter.describe for torch archives: the spec and record count from `fingerprint(data, path)`."""

    def describe(data: bytes, path: Path) -> tuple[ModelSpec, dict]:
        spec, records = fingerprint(data, path)
        return spec, {"records": len(records)}

    return describe


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Loggers that narrate every call (torch.onnx's opset notes, onnxscript's converter), at ERROR for this block."""
    import logging

    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def quiet_warnings(*categories):
    """Warnings torch and its exporters print on every call (fcx reports results itself), kept to this block."""
    with warnings.catch_warnings():
        for category in categories or (Warning,):
            warnings.simplefilter("ignore", category)
        yield
