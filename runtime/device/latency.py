"""Latency you can trust: every stage over N timed runs after W warm-ups, as p50 / p90 / max."""

from __future__ import annotations

from typing import Callable

import numpy as np


def repeat_stages(run: Callable[[], dict[str, float]], warmup: int, repeat: int) -> dict[str, dict[str, float]]:
    """`run()` returns seconds per stage; → {stage: {"p50", "p90", "max", "min", "n"}} over `repeat` runs after
    `warmup` untimed ones."""
    if warmup < 0 or repeat < 1:
        raise ValueError(f"--warmup {warmup} / --repeat {repeat}: warm-ups must be ≥ 0 and repeats ≥ 1")
    for _ in range(warmup):
        run()
    runs = [run() for _ in range(repeat)]
    stages = list(runs[0])
    samples = np.asarray([[r[s] for s in stages] for r in runs], dtype=np.float64)      # [repeat, stages]
    p50, p90 = np.percentile(samples, [50, 90], axis=0)
    return {s: {"p50": float(p50[i]), "p90": float(p90[i]), "max": float(samples[:, i].max()),
                "min": float(samples[:, i].min()), "n": repeat} for i, s in enumerate(stages)}
