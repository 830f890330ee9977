"""Latency you can trust: every stage over N timed runs after W warm-ups, as p50 / p90 / max."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def repeat_stages(run: Callable[[], dict[str, float]], warmup: int, repeat: int,
                  progress: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """`run()` returns seconds per stage; → {stage: {"p50", "p90", "max", "min", "n"}} over `repeat` runs after
    `warmup` untimed ones. `progress` gets a line after each run (a run of a full-size bundle takes seconds to
    minutes, and N of them are otherwise silent)."""
    if warmup < 0 or repeat < 1:
        raise ValueError(f"--warmup {warmup} / --repeat {repeat}: warm-ups must be ≥ 0 and repeats ≥ 1")
    runs = []
    for i in range(warmup + repeat):
        start = time.perf_counter()
        seconds = run()
        if i >= warmup:
            runs.append(seconds)
        if progress is not None:
            kind, n, of = ("warm-up", i + 1, warmup) if i < warmup else ("run", i - warmup + 1, repeat)
            progress(f"{kind} {n}/{of}: {time.perf_counter() - start:.2f} s")
    stages = list(runs[0])
    samples = np.asarray([[r[s] for s in stages] for r in runs], dtype=np.float64)      # [repeat, stages]
    p50, p90 = np.percentile(samples, [50, 90], axis=0)
    return {s: {"p50": float(p50[i]), "p90": float(p90[i]), "max": float(samples[:, i].max()),
                "min": float(samples[:, i].min()), "n": repeat} for i, s in enumerate(stages)}
