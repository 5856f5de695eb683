"""Latency and throughput of one predictor: warm up, then time single calls and report percentiles."""

from __future__ import annotations

import time

import numpy as np


def measure(predictor, x: np.ndarray, warmup: int = 20, repeat: int = 200, max_seconds: float = 1.0) -> dict:
    """Time `repeat` calls (fewer if `max_seconds` runs out, never fewer than 5) after `warmup` calls
    (fewer, but at least one, if they take more than `max_seconds` too)."""
    warm_until = time.perf_counter() + max_seconds
    for i in range(warmup):
        predictor(x)
        if time.perf_counter() > warm_until:
            break
    times = []
    deadline = time.perf_counter() + max_seconds
    while len(times) < repeat and (len(times) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        predictor(x)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)), "throughput": len(x) / (p50 / 1e3), "calls": len(times)}
