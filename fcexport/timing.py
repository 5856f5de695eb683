"""Latency and throughput of one predictor: warm up, then time single calls and report percentiles."""

from __future__ import annotations

import time

import numpy as np


def measure(predictor, x: np.ndarray, warmup: int = 20, repeat: int = 200, max_seconds: float = 1.0) -> dict:
    """Time `repeat` calls after `warmup` calls, all within `max_seconds` when calls are fast enough: warm-up gets
    at most a quarter of it (but at least one call), timing the rest (fewer calls if it runs out, never fewer
    than 5). `warmup_calls` says how many warm-up calls the budget allowed."""
    start = time.perf_counter()
    warm_until, deadline = start + max_seconds / 4, start + max_seconds
    warmup_calls = 0
    while warmup_calls < warmup:
        predictor(x)
        warmup_calls += 1
        if time.perf_counter() > warm_until:
            break
    times = []
    while len(times) < repeat and (len(times) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        predictor(x)
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {"p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)), "throughput": len(x) / (p50 / 1e3), "calls": len(times),
            "warmup_calls": warmup_calls}
