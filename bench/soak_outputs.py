"""Soak of the output rules: alternating good and bad commands against one output directory, checking after every
command that it holds nothing but complete artifacts and the user's own files, untouched.

Good commands cycle through `export --frames 4 --force`, `check --no-tensorrt`, `build --target rtx --precision fp32
--force` (one export in five);
bad ones through refusals (an existing export without --force, a file or a user directory as --out, the wrong
kind, bad arguments, a JSON path that is a directory) and interruptions (SIGTERM and SIGINT delivered to the
running export). Every command is the CLI's `main` in this process (one model load per export, as a user's run).

    PYTHONPATH=. python bench/soak_outputs.py [--commands 100] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from aot_export.artifacts import sha256_file
from aot_export.errors import InputError
from aot_export.manifest import read_manifest
from engines.sidecar import read_sidecar
from runtime.cli import main

SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


def run(argv: list[str], interrupt: tuple[str, float] | None = None) -> tuple[int, str]:
    """`main(argv)` → (exit code, the last line on stderr); `interrupt` sends a signal to this process after a
    delay, as `kill` from another shell would."""
    err = io.StringIO()
    timer = None
    if interrupt:
        name, delay = interrupt
        timer = threading.Timer(delay, os.kill, (os.getpid(), SIGNALS[name]))
        timer.start()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as exc:                 # argparse's refusals
        code = exc.code
    finally:
        if timer:
            timer.cancel()
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


def inventory(out: Path, user: dict[str, str]) -> list[str]:
    """What is wrong with `out`: anything that is not a complete artifact or the user's untouched files."""
    problems = []
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name in user:
            if sha256_file(entry) != user[name]:
                problems.append(f"{name}: the user's file changed")
        elif name == "mine":
            if sorted(p.name for p in entry.iterdir()) != ["data.csv"]:
                problems.append("mine/: the user's directory changed")
        elif name == "export":
            try:
                read_manifest(entry)
            except InputError as exc:
                problems.append(f"export/: incomplete ({exc})")
        elif name == "engine":
            try:
                read_sidecar(entry)
            except InputError as exc:
                problems.append(f"engine/: incomplete ({exc})")
        else:
            problems.append(f"{name}: left behind")
    return problems


def commands(out: Path) -> list[tuple[str, list[str], tuple[str, float] | None]]:
    export, engine = str(out / "export"), str(out / "engine")
    check = ("check", ["check", export, "--no-tensorrt", "--quiet"], None)
    build = ("build --force", ["build", export, "--target", "rtx", "--precision", "fp32", "--out", engine,
                               "--force", "--quiet"], None)
    # an export costs ~10 s, a check or build ~2 s: one export in five good commands keeps the soak to minutes
    good = [("export --force", ["export", "--frames", "4", "--out", export, "--force", "--quiet"], None),
            check, build, check, build]
    bad = [("export onto an export, no --force", ["export", "--frames", "4", "--out", export, "--quiet"], None),
           ("export --out a user file", ["export", "--frames", "4", "--out", str(out / "notes.txt"), "--quiet"],
            None),
           ("export --out a user directory", ["export", "--frames", "4", "--out", str(out / "mine"), "--quiet"],
            None),
           ("export SIGTERM after 6 s", ["export", "--frames", "4", "--out", export, "--force", "--quiet"],
            ("SIGTERM", 6.0)),
           ("build --out the export", ["build", export, "--target", "rtx", "--precision", "fp32", "--out", export,
                                       "--force", "--quiet"], None),
           ("export --frames 7", ["export", "--frames", "7", "--out", export, "--force", "--quiet"], None),
           ("check --json a directory", ["check", export, "--json", str(out / "mine"), "--quiet"], None),
           ("export SIGINT after 9 s", ["export", "--frames", "4", "--out", export, "--force", "--quiet"],
            ("SIGINT", 9.0)),
           ("build --workspace-mib -5", ["build", export, "--target", "rtx", "--precision", "fp32",
                                         "--workspace-mib", "-5", "--out", engine, "--quiet"], None),
           ("check an engine directory", ["check", engine, "--quiet"], None)]
    return [item for pair in zip(good * 20, bad * 10) for item in pair]


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=100)
    parser.add_argument("--out", default=None, help="the output directory (default: a new temporary one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="soak-outputs-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "notes.txt").write_text("the user's notes\n")
    (out / "mine").mkdir(exist_ok=True)
    (out / "mine" / "data.csv").write_text("1,2,3\n")
    user = {"notes.txt": sha256_file(out / "notes.txt")}
    rows, start = [], time.perf_counter()
    for i, (label, argv_, interrupt) in enumerate(commands(out)[:args.commands]):
        began = time.perf_counter()
        code, line = run(argv_, interrupt)
        problems = inventory(out, user)
        rows.append({"i": i, "command": label, "exit": code, "line": line, "problems": problems,
                     "seconds": round(time.perf_counter() - began, 1)})
        print(f"{i:3d} {label:38s} exit {code!s:4s} {'OK' if not problems else problems} {line[:90]}",
              flush=True)
    summary = {"commands": len(rows), "seconds": round(time.perf_counter() - start),
               "exit_codes": dict(Counter(str(r["exit"]) for r in rows)),
               "commands_leaving_problems": sum(bool(r["problems"]) for r in rows),
               "final_entries": sorted(p.name for p in out.iterdir()), "out": str(out)}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    return 0 if summary["commands_leaving_problems"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main_())
