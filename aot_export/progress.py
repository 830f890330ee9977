"""Progress of multi-stage commands: one tqdm bar over named stages, with the time each took."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm


class Stages:
    """`with stages.step(): ...` once per named stage, in order; `seconds` maps each stage to its duration."""

    def __init__(self, names: list[str], show: bool = True):
        self.names = names
        self.seconds: dict[str, float] = {}
        # disable=None: tqdm draws only on a terminal, so logs and pipes get no carriage-return noise.
        self.bar = tqdm(total=len(names), disable=None if show else True, file=sys.stderr, leave=False,
                        bar_format="{desc}: {n_fmt}/{total_fmt} stages [{elapsed}]")

    @contextmanager
    def step(self) -> Iterator[None]:
        name = self.names[len(self.seconds)]
        self.bar.set_description_str(name)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
