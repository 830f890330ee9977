"""What every command prints and writes: a plain table, a JSON file, and peak memory in one unit (MiB)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any, Sequence

from .artifacts import atomic_file


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_json(path: str | Path | None, payload: dict) -> None:
    """Write `payload` to `path` atomically (nothing when `path` is None)."""
    if path is None:
        return
    with atomic_file(path) as staging:
        staging.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def peak_rss_mib() -> float:
    """This process's peak resident set size in MiB (getrusage reports KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
