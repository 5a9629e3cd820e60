"""Wall and process-CPU timing of one benchmark case, shared by the reference benchmark scripts
(bench_sd15_cpu.py, bench_classifier.py, bench_demo.py)."""

from __future__ import annotations

import os
import statistics
import time


def bench(fn, reps: int, warmup: int) -> dict:
    """--warmup untimed calls of fn, then max(1, reps) timed ones: median / min / max wall
    seconds, the process CPU seconds, and the 1-minute load average before and after."""
    for _ in range(warmup):
        fn()
    ts, cs = [], []
    load0 = os.getloadavg()[0]
    for _ in range(max(1, reps)):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "runs_s": ts,
            "median_cpu_s": statistics.median(cs), "runs_cpu_s": cs,
            "loadavg_before": load0, "loadavg_after": os.getloadavg()[0]}
