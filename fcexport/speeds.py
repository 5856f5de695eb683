"""What `fcx bench` measured on this machine, so `fcx predict` can run a file with its fastest runtime; where nothing
is recorded, a short measurement on the file's first use here (measure_first_use) records it.

Kept in the user's cache folder (`$FCX_CACHE_DIR`, else `$XDG_CACHE_HOME/fcexport`, else ~/.cache/fcexport), not in
the artifacts folder: it describes this machine, and a signed folder must not change. Entries are keyed by the
file's sha256, the device and the machine, so a copied cache or a changed file never decides.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from fcexport.files import sha256_file, write_json_atomic

MAX_ENTRIES = 2000  # oldest dropped first: the file stays small whatever is benchmarked
MAX_CACHE_BYTES = 2 << 20  # what MAX_ENTRIES take, with room: a larger file is not fcx's and is ignored
FIELDS = {"sha256": str, "machine": str, "device": str, "backend": str, "batch_size": int, "throughput": float}


def cache_file() -> Path:
    root = os.environ.get("FCX_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fcexport"
    return Path(root) / "speeds.json"


def _machine() -> str:
    return f"{platform.node()}|{platform.machine()}|{os.cpu_count()}"


def _load() -> list[dict]:
    """The entries of a well-formed cache; anything else (missing, damaged, oversized, not a regular file, entries
    of the wrong types) counts as nothing known: predict then takes the default runtime."""
    import math
    import stat

    path = cache_file()
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CACHE_BYTES:
            return []
        with open(path, "rb") as f:
            entries = json.loads(f.read(MAX_CACHE_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return []
    if not isinstance(entries, list):
        return []

    def valid(entry) -> bool:
        return (isinstance(entry, dict) and all(type(entry.get(k)) is t or (t is float and type(entry.get(k)) is int)
                                                for k, t in FIELDS.items())
                and math.isfinite(entry["throughput"]) and entry["throughput"] > 0 and entry["batch_size"] > 0)

    return [e for e in entries if valid(e)]


def record(measured: list) -> None:
    """Remember (predictor, BenchRow) pairs: each file's throughput per runtime, device and batch size."""
    if not measured:
        return
    digests, fresh = {}, []
    for predictor, row in measured:
        path = Path(predictor.source)
        if not path.is_file():
            continue  # made in memory (fused from model.pt): nothing predict could open
        digest = digests.setdefault(path, sha256_file(path))
        fresh.append({"sha256": digest, "machine": _machine(), "device": row.device, "backend": predictor.backend,
                      "batch_size": row.batch_size, "throughput": row.throughput})
    keys = {(e["sha256"], e["machine"], e["device"], e["backend"], e["batch_size"]) for e in fresh}
    kept = [e for e in _load() if (e.get("sha256"), e.get("machine"), e.get("device"), e.get("backend"), e.get("batch_size")) not in keys]
    try:
        write_json_atomic(cache_file(), (kept + fresh)[-MAX_ENTRIES:])
    except Exception:  # a read-only home must not fail a benchmark: predict then uses the default runtime
        pass


def fastest_runtime(path: Path, batch: int, device: str) -> str | None:
    """The runtime with the best throughput measured for this file at the batch size nearest `batch`, among those
    that run this kind of file; None when nothing is known."""
    from fcexport import registry

    entries = _load()
    if not entries:
        return None
    digest, artifact = sha256_file(path), registry.artifact_of(Path(path))
    able = {name for name, b in registry.backends().items() if b.artifact == artifact and not b.approximate}  # exact only
    mine = [e for e in entries if e["sha256"] == digest and e["machine"] == _machine() and e["device"] == device
            and e["backend"] in able]
    if not mine:
        return None
    nearest = min({e["batch_size"] for e in mine}, key=lambda b: (abs(b - batch), b))
    best = max((e for e in mine if e["batch_size"] == nearest), key=lambda e: e["throughput"])
    return registry.backend(best["backend"]).runtime.name


FIRST_USE_CALL_SECONDS = 0.02  # the measured batch is as large as keeps one call near this (at most `batch`, FIRST_USE_BATCH)
FIRST_USE_BATCH = 32
FIRST_USE_SECONDS = 0.2  # per runtime, after one warm-up call (at least 5 timed calls: fcexport.timing.measure)


def measure_first_use(path: Path, batch: int, device: str, open_runtime):
    """The fastest exact runtime for this file here, opened, or None when only one can run it (nothing to choose).
    Each candidate (onnxruntime and OpenVINO for model.onnx, and any a plugin adds) is opened by `open_runtime(name)`
    and timed on a few seeded random batches; the speeds are recorded as `fcx bench` records them, so the next
    predict of this file on this machine reads them instead. A runtime other than the first registered that cannot
    open the file is left out; the first one's error is the file's, raised as before."""
    import numpy as np

    from fcexport import registry
    from fcexport.errors import FcxError
    from fcexport.results import BenchRow, Status
    from fcexport.timing import measure

    artifact = registry.artifact_of(path)
    names = list(dict.fromkeys(b.runtime.name for b in registry.backends().values() if b.artifact == artifact
                               and not b.approximate and device in b.devices and b.runtime.missing() is None))
    if len(names) < 2:
        return None
    opened = []
    for name in names:
        try:
            opened.append(open_runtime(name))
        except FcxError:
            if name == names[0]:
                raise
    if len(opened) < 2:
        return opened[0] if opened else None
    shape = opened[0].spec.input_shape
    rng = np.random.default_rng(0)
    one = rng.random((1, *shape), dtype=np.float32)
    seconds = measure(opened[0], one, warmup=1, repeat=5, max_seconds=FIRST_USE_SECONDS)["p50_ms"] / 1e3
    size = int(min(batch, FIRST_USE_BATCH, max(1, FIRST_USE_CALL_SECONDS // max(seconds, 1e-9))))
    x = rng.random((size, *shape), dtype=np.float32)
    rows = []
    for predictor in opened:
        timed = measure(predictor, x, warmup=1, repeat=5, max_seconds=FIRST_USE_SECONDS)
        rows.append((predictor, BenchRow(predictor.backend, device, Status.OK, size, throughput=timed["throughput"])))
    record(rows)
    return max(rows, key=lambda pair: pair[1].throughput)[0]
