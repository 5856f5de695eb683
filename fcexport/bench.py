"""Latency and throughput per backend: warm up, then time single calls and report percentiles."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from fcexport.backends import BACKENDS, BackendUnavailable, find_default_model, open_backend
from fcexport.errors import FcxError, check_choices


def measure(predictor, x: np.ndarray, warmup: int = 20, repeat: int = 200, max_seconds: float = 1.0) -> dict:
    """Time `repeat` calls (fewer if `max_seconds` runs out, never fewer than 5) after `warmup` calls."""
    for _ in range(warmup):
        predictor(x)
    times = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < repeat and (len(times) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        predictor(x)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)), "throughput": len(x) / (p50 / 1e3), "calls": len(times)}


def run(artifacts: Path, batch_sizes=(1, 64, 1024), backends=BACKENDS, device: str = "cpu",
        warmup: int = 20, repeat: int = 200, max_seconds: float = 1.0, seed: int = 0) -> list[dict]:
    """`fcx bench`: one row per backend x batch size; unavailable backends are rows with a reason."""
    check_choices("--backends", backends, BACKENDS)
    if not batch_sizes or min(batch_sizes) < 1:
        raise FcxError(f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    find_default_model(artifacts)  # a clear error when the folder holds no model at all
    rng = np.random.default_rng(seed)
    rows = []
    for backend in backends:
        try:
            predictor = open_backend(backend, artifacts, device)
        except BackendUnavailable as exc:
            rows.append({"backend": backend, "device": device, "batch_size": None, "skipped": str(exc)})
            continue
        for batch in batch_sizes:
            x = rng.random((batch, *predictor.input_shape), dtype=np.float32)
            rows.append({"backend": backend, "device": device, "batch_size": batch, **measure(predictor, x, warmup, repeat, max_seconds)})
    return rows
