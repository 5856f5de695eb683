"""What this machine computed before for verification, remembered so no command computes it twice.

Three kinds of entries, each keyed by everything that decides its value plus the versions of the packages it depends
on and a digest of fcexport's own source (an edited fcexport is a miss, never a wrong answer):
- fresh-export fingerprints (verify's structure check): keyed by the program's own fingerprint (every op and tensor),
  the spec, the artifact and its opset; `fcx export` records what it just wrote, verify what it had to export;
- model.pt's float64 answers and its own float32 error, per input: keyed by model.pt's sha256, each input by the
  sha256 of its bytes (fuse-bn --verify computes the inputs verify uses; verify then reuses them);
- ONNX files that passed fcexport.onnx_checks (keyed by their sha256 and onnx's version): predict opens a file it
  checked before without importing onnx or running shape inference again (most of its start-up on a real model).
Kept in the user's cache folder beside speeds.json (fcexport.speeds); FCX_FRESH=1 ignores what is recorded.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import io
import json
import os
import stat
from pathlib import Path

import numpy as np

MAX_ENTRY_BYTES = 256 << 20  # a fingerprint is a digest per node and tensor; answers are at most MAX_ANSWERS rows
MAX_ENTRIES = 256  # per kind, oldest removed first
MAX_ANSWERS = 8192  # rows of float64 answers kept per model.pt


def folder(kind: str) -> Path:
    from fcexport.speeds import cache_file

    return cache_file().parent / kind


def enabled() -> bool:
    return os.environ.get("FCX_FRESH") != "1"


@functools.cache
def _source_digest() -> str:
    """fcexport's own code."""
    digest = hashlib.sha256()
    root = Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def key(**parts) -> str:
    from fcexport.artifacts import versions

    described = {**parts, "versions": versions(), "fcexport": _source_digest()}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _read(path: Path) -> bytes | None:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_ENTRY_BYTES:
            return None
        with open(path, "rb") as f:
            return f.read(MAX_ENTRY_BYTES + 1)
    except OSError:
        return None


def _write(kind: str, name: str, data: bytes) -> None:
    """A cache that cannot be written (a read-only home) is only slower."""
    from fcexport.errors import FcxError
    from fcexport.files import write_bytes_atomic

    try:
        folder(kind).mkdir(mode=0o700, parents=True, exist_ok=True)  # the user's own: whoever writes it vouches
        write_bytes_atomic(folder(kind) / name, data)
        for old in sorted(folder(kind).iterdir(), key=lambda p: p.stat().st_mtime)[:-MAX_ENTRIES]:
            old.unlink(missing_ok=True)
    except (OSError, FcxError):
        pass


# ---- fresh-export fingerprints --------------------------------------------------------------

def load_fingerprint(entry: str) -> dict[str, str] | None:
    """The fingerprint recorded under `entry`, or None (missing, damaged, oversized, not a regular file)."""
    data = _read(folder("fingerprints") / f"{entry}.json") if enabled() else None
    try:
        found = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):
        return None
    if not (isinstance(found, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in found.items())):
        return None
    return found


def fresh_export_key(program_fingerprint: dict[str, str], spec, artifact: str, opset: int) -> str:
    """The entry of a fresh export of a program (fcexport.program.fingerprint) with this spec, artifact and opset."""
    return key(kind="fresh export", program=program_fingerprint, spec=spec.to_dict(), artifact=artifact, opset=opset)


def store_fingerprint(entry: str, fingerprint: dict[str, str]) -> None:
    _write("fingerprints", f"{entry}.json", json.dumps(fingerprint).encode())


# ---- ONNX files that passed the bounds check ------------------------------------------------

@functools.cache
def _onnx_version() -> str:
    """onnx's installed version (its dist-info folder's name), found without importing onnx (the point of the entry)
    or importlib.metadata (10 ms)."""
    import importlib.util

    spec = importlib.util.find_spec("onnx")
    found = sorted(p.name for p in Path(spec.origin).parent.parent.glob("onnx-*.dist-info")) if spec and spec.origin else []
    return "|".join(found) or "unknown"


def _onnx_check_entry(digest: str) -> str:
    described = {"kind": "onnx check", "sha256": digest, "onnx": _onnx_version(), "fcexport": _source_digest()}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def passed_onnx_check(digest: str) -> int | None:
    """Where the ONNX bytes of this sha256 passed fcexport.onnx_checks.check_onnx_model on this machine, with this
    fcexport and this onnx: the bytes one image keeps alive that it found; else None."""
    if not enabled():
        return (_this_run.get() or {}).get(("onnx check", digest))
    if _onnx_version() == "unknown":
        return None
    found = _read(folder("onnx-checks") / _onnx_check_entry(digest))
    return int(found) if found is not None and found.isdigit() and len(found) <= 12 else None


def record_onnx_check(digest: str, peak_bytes: int) -> None:
    shared = _this_run.get()
    if not enabled() and shared is not None:  # FCX_FRESH: once per command
        shared[("onnx check", digest)] = int(peak_bytes)
    _write("onnx-checks", _onnx_check_entry(digest), str(int(peak_bytes)).encode())


# ---- float64 answers ------------------------------------------------------------------------

_this_run: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fcx_answers_this_run", default=None)


@contextlib.contextmanager
def one_command():
    """Within it, answers and ONNX checks computed with FCX_FRESH=1 are shared by the command's steps (computed once,
    not recalled from an earlier command)."""
    token = _this_run.set({})
    try:
        yield
    finally:
        _this_run.reset(token)


def answers(model_sha256: str, output_shape: tuple[int, ...], x: np.ndarray, compute) -> tuple[np.ndarray, np.ndarray]:
    """(float64 logits, own float32 error per input) for `x`: recorded rows reused, the others from `compute(x_missing)`
    (which returns the same pair) and recorded. A record that is not finite logits of `output_shape` (one image's) and
    a finite error >= 0 per row is a miss."""
    entry = key(kind="float64 answers", model=model_sha256)
    rows = np.frombuffer(b"".join(hashlib.sha256(row.tobytes()).digest() for row in x), dtype="S32")
    shared = _this_run.get()
    known = _load_answers(entry, tuple(output_shape)) if enabled() else (shared or {}).get(entry)
    index = {d: i for i, d in enumerate(known[0])} if known is not None else {}
    hits = np.array([index.get(d, -1) for d in rows], dtype=np.int64)
    missing = np.flatnonzero(hits < 0)
    if not len(missing):
        return known[1][hits], known[2][hits]
    logits, own = compute(np.ascontiguousarray(x[missing]))
    if known is None:
        known = (np.zeros(0, dtype="S32"), np.zeros((0, *logits.shape[1:])), np.zeros(0))
    out_logits = np.empty((len(x), *logits.shape[1:]), dtype=np.float64)
    out_own = np.empty(len(x), dtype=np.float64)
    out_logits[missing], out_own[missing] = logits, own
    present = np.flatnonzero(hits >= 0)
    out_logits[present], out_own[present] = known[1][hits[present]], known[2][hits[present]]
    kept = [np.concatenate([a, b])[-MAX_ANSWERS:] for a, b in zip(known, (rows[missing], logits, own))]
    if not enabled() and shared is not None and kept[1].nbytes <= MAX_ENTRY_BYTES:  # FCX_FRESH: once per command
        shared[entry] = tuple(kept)
    buffer = io.BytesIO()
    np.savez(buffer, digests=kept[0], logits=kept[1], own=kept[2])
    _write("answers", f"{entry}.npz", buffer.getvalue())
    return out_logits, out_own


def _load_answers(entry: str, output_shape: tuple[int, ...]):
    data = _read(folder("answers") / f"{entry}.npz")
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as found:
            digests, logits, own = found["digests"], found["logits"], found["own"]
    except Exception:  # a damaged or foreign file is a miss
        return None
    if not (digests.dtype == np.dtype("S32") and logits.dtype == np.float64 and own.dtype == np.float64
            and logits.shape[1:] == output_shape and len(digests) == len(logits) == len(own)
            and np.isfinite(logits).all() and np.isfinite(own).all() and (own >= 0).all()):
        return None
    return digests, logits, own
