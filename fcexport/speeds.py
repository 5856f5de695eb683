"""What `fcx bench` measured on this machine, so `fcx predict` can run a file with its fastest runtime.

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


def cache_file() -> Path:
    root = os.environ.get("FCX_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fcexport"
    return Path(root) / "speeds.json"


def _machine() -> str:
    return f"{platform.node()}|{platform.machine()}|{os.cpu_count()}"


def _load() -> list[dict]:
    try:
        entries = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return []  # no cache yet, or a damaged one: nothing is known, nothing is chosen from it
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


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
    """The runtime with the best throughput measured for this file at the batch size nearest `batch`, or None."""
    from fcexport import registry

    entries = _load()
    if not entries:
        return None
    digest = sha256_file(path)
    mine = [e for e in entries if e.get("sha256") == digest and e.get("machine") == _machine() and e.get("device") == device
            and e.get("backend") in registry.backends() and isinstance(e.get("batch_size"), int)
            and isinstance(e.get("throughput"), (int, float))]
    if not mine:
        return None
    nearest = min({e["batch_size"] for e in mine}, key=lambda b: (abs(b - batch), b))
    best = max((e for e in mine if e["batch_size"] == nearest), key=lambda e: e["throughput"])
    return registry.backend(best["backend"]).runtime.name
