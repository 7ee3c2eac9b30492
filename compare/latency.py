"""Time a backend's `infer` on a prepared input: warm-up, then timed calls within a budget."""
from __future__ import annotations

import time

import numpy as np

from .results import LatencyStats

MIN_ITERS = 5
MAX_ITERS = 10_000


def measure(backend, batch: np.ndarray, warmup: int = 10, iters: int | None = None, budget_s: float = 3.0) -> LatencyStats:
    """Latency of `backend.infer` on `batch`, whose preparation is not timed.

    With `iters` the count is fixed. Otherwise calls go on until `budget_s` seconds are spent and
    at least MIN_ITERS were made, and the warm-up also stops once it has used the budget.
    """
    prepared = backend.prepare(batch)
    started = time.perf_counter()
    done_warmup = 0
    while done_warmup < warmup:
        backend.infer(prepared)
        done_warmup += 1
        if iters is None and time.perf_counter() - started >= budget_s:
            break
    times: list[float] = []
    spent = 0.0
    while len(times) < MAX_ITERS:
        t0 = time.perf_counter()
        backend.infer(prepared)
        times.append(time.perf_counter() - t0)
        spent += times[-1]
        if iters is not None and len(times) >= iters:
            break
        if iters is None and len(times) >= MIN_ITERS and spent >= budget_s:
            break
    ms = np.array(times) * 1e3
    return LatencyStats(
        backend=backend.name,
        batch=int(batch.shape[0]),
        warmup=done_warmup,
        iters=len(times),
        mean_ms=float(ms.mean()),
        std_ms=float(ms.std()),
        min_ms=float(ms.min()),
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        images_per_s=float(batch.shape[0] / ms.mean() * 1e3),
    )
