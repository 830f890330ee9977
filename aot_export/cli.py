"""`aot-export`: a thin shell over the library. Each command parses its arguments, calls one library function
and prints what it returns; errors are one line (exit 2 bad input, 1 a failed check) unless `--debug`.

Commands that live in `runtime` or `engines` are imported when they run, so that `aot_export` itself
imports neither (dependencies point one way: runtime → engines → aot_export).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import CheckFailed, InputError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


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


def write_json(path: str | None, payload: dict) -> None:
    if path is None:
        return
    from .artifacts import atomic_file

    with atomic_file(path) as staging:
        staging.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


# ---- commands --------------------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from runtime.demo import run_demo

    report = run_demo(workdir=Path(args.workdir), video=args.video, progress=not args.quiet)
    print(report.table())
    write_json(args.json, report.to_dict())
    return EXIT_OK if report.passed else EXIT_FAILED


def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="aot-demo", help="where the demo writes its artifacts (aot-demo/)")
    parser.add_argument("--video", default=None,
                        help="video to run on (default: ../shared/data/videos when present, else a synthesized clip)")


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "demo": Command("the whole chain on the built-in default, no arguments needed", _add_demo, _demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aot-export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(child)
        child.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
        child.add_argument("--quiet", action="store_true", help="no progress bars")
        child.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (InputError, ValueError, FileNotFoundError) as exc:
        if args.debug:
            traceback.print_exc()
        print(f"aot-export {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckFailed as exc:
        if args.debug:
            traceback.print_exc()
        print(f"aot-export {args.command}: failed: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"aot-export {args.command}: interrupted; no partial artifact was left", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the shell's last line of defence, reported in one line
        if args.debug:
            traceback.print_exc()
        print(f"aot-export {args.command}: internal error: {exc.__class__.__name__}: {_one_line(exc)} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or exc.__class__.__name__


if __name__ == "__main__":
    sys.exit(main())
