"""Every `aot-export` command line of the README, as a newcomer would type it.

A README line is a template: `[...]` is optional, `a|b|c` are alternatives, CAPITALS (and `clip.mp4`) are the
user's paths and values. `instances` turns a line into command lines: the optional parts left out (and, for the
parse check, each put in), the alternatives' first one that runs on this machine (every built-in where it lists
several), the placeholders filled in. The default tier parses every instance with the CLI's own parser (an option
the README names and the CLI lacks fails here); the heavy tier runs each line that can run here, in the order a
newcomer would, at the README's frame counts.
"""

from __future__ import annotations

import io
import itertools
import re
import shlex
from pathlib import Path

import pytest

from runtime.cli import EXIT_FAILED, EXIT_OK, build_parser, main

README = Path(__file__).resolve().parents[1] / "README.md"
BUILT_INS = ("tiny-llava-ov", "tiny-qwen2.5-vl", "tiny-cosmos3-edge")
# Alternatives that cannot run here: a checkpoint is not in the repository, the Jetson/datacenter targets build with
# TensorRT (only TensorRT-RTX is installed), and there is no GPU.
NOT_HERE = {"CHECKPOINT_DIR", "orin-agx", "orin-nx", "orin-nano", "a100", "l4", "h100", "cuda", "URL", "/dev/videoN",
            "ROSBAG", "weak"}
# Lines that do not run here as written, with why; the same commands run elsewhere.
NOT_RUN = {
    "live --model BUNDLE --source rtsp://camera/stream":
        "a camera's stream; the Commands block's `live --source FILE` runs instead (and tests/test_live.py)",
    "serve": "a server that runs until stopped; tests/test_serve.py drives it",
    "bench": "full-size encoder timings for minutes; docs/benchmarks.md, tests/test_reliability.py",
    "demo": "CI's set-up line runs it, and tests/test_cli.py (heavy)",
}
# The order a newcomer runs them in: each takes what an earlier one wrote.
ORDER = ("export", "check", "validate", "quantize-llm", "quantize-weights", "build", "calibrate", "bundle", "run",
         "live", "visualize")
# Values for the README's placeholders (`{video}`, `{tmp}`: filled in per run; an artifact's name where no earlier
# line wrote one, enough for the parser). A placeholder an `--out` names is an artifact the line writes, which later
# lines read.
VALUES = {"MODEL": "tiny-llava-ov", "PATH": "{video}", "PATH...": "{video}", "clip.mp4": "{video}",
          "FILE": "{video}", "TEXT": "What happens?", "overlay.png": "{tmp}/overlay.png", "R": "0.15", "V": "20",
          "A": "10", "K": "3", "L": "4", "N": "2", "W": "1", "T": "2", "S": "8", "F": "1", "C": "1", "G": "0",
          "KEY": "secret", "aot.json": "{tmp}/aot.json", "RULE...": "score-path",
          **{name: f"{{tmp}}/{kind}" for name, kind in [("DIR", "export"), ("EXPORT_DIR", "export"),
                                                       ("ENGINE_DIR", "engine"), ("BUNDLE", "bundle"),
                                                       ("LLM_DIR", "llm"), ("STREAM_EXPORT", "stream"),
                                                       ("STREAM_BUNDLE", "stream-bundle")]}}
SERIAL = itertools.count()      # a new name for every artifact a line writes
# An option whose placeholder means something else there: the held-out video is not the calibration one.
OPTION_VALUES = {"--holdout": "{other_video}"}
# Another name for an artifact an earlier line wrote.
ALIASES = {"EXPORT_DIR": "DIR"}
# The live section's flow: its bundle is made from the `--stream` export, and `live` runs that one (a 32-frame
# bundle needs a --window of more than its 32 s at --fps 1).
STREAM_BUNDLE = {"bundle": ("STREAM_EXPORT", "BUNDLE", "STREAM_BUNDLE"), "live": ("BUNDLE", "BUNDLE", "STREAM_BUNDLE")}
OUTPUTS = {"DIR": "export", "DIR2": "derived", "LLM_DIR": "llm", "BUNDLE": "bundle", "STREAM_EXPORT": "stream",
           "ENGINE_DIR": "engine", "STREAM_BUNDLE": "stream-bundle"}


def readme_lines(text: str) -> list[str]:
    """The `aot-export` lines of the README's command blocks (fenced, or indented by four spaces): a line that
    starts with `aot-export`, with the lines after it that continue it (a trailing `\\`, or a line of options
    starting with `[` or `--`); comments dropped."""
    lines, fenced, current = [], False, None
    for raw in text.splitlines():
        if raw.startswith("```"):
            fenced, current = not fenced, None
            continue
        in_block = fenced or raw.startswith("    ")
        text_ = re.sub(r"\s#\s.*", "", raw).strip()
        if in_block and text_.startswith("aot-export "):
            current = len(lines)
            lines.append(text_)
        elif in_block and current is not None and text_[:1] in ("[", "-"):
            lines[current] += " " + text_
        else:
            current = None
    return [" ".join(line.replace("\\", " ").split()) for line in lines]


def without_optional(line: str) -> str:
    while re.search(r"\[[^\[\]]*\]", line):
        line = re.sub(r"\s*\[[^\[\]]*\]", "", line)
    return line


def with_each_optional(line: str) -> list[str]:
    """The line with one optional group in at a time (each alternative of a group `[a | b]` on its own)."""
    variants = []
    for group in re.finditer(r"\[([^\[\]]*)\]", line):
        for option in group.group(1).split(" | "):
            variants.append(without_optional(line[:group.start()] + " " + option + " " + line[group.end():]))
    return variants


def choices(token: str, expand: bool) -> list[str]:
    """The alternatives of `token` that run here: all of them (`expand`) or the first."""
    usable = [t for t in token.split("|") if t not in NOT_HERE] if "|" in token else [token]
    assert usable, f"no alternative of {token!r} runs here"
    return usable if expand else usable[:1]


def instances(line: str, artifacts: dict[str, str]) -> list[list[str]]:
    """Command lines for one README line: every built-in where it lists several for --model, else the first
    alternative that runs here, placeholders filled from `artifacts` (what earlier lines wrote) or `VALUES`."""
    tokens = shlex.split(line)[1:]
    words: list[list[str]] = []
    for i, token in enumerate(tokens):
        expand = tokens[i - 1] == "--model" and any(name in token.split("|") for name in BUILT_INS)
        words.append(choices(token, expand))
    commands = [[]]
    for options in words:
        commands = [command + [option] for command in commands for option in options]
    filled, written = [], {}
    for command in commands:
        out = []
        model, name, stream_name = STREAM_BUNDLE.get(command[0], (None, None, None))
        if model is not None and command[command.index("--model") + 1] == model:
            command = [stream_name if word == name else word for word in command]
        for i, word in enumerate(command):
            option = command[i - 1] if i else ""
            if option == "--out" and word in OUTPUTS:
                value = f"{{tmp}}/{OUTPUTS[word]}-{command[0]}-{next(SERIAL)}"
                written.setdefault(word, value)        # of several built-ins, the first (LLaVA) is read later
            elif option in OPTION_VALUES:
                value = OPTION_VALUES[option]
            elif ALIASES.get(word, word) in artifacts:
                value = artifacts[ALIASES.get(word, word)]
            elif word in VALUES:
                value = VALUES[word]
            else:
                assert not re.fullmatch(r"[A-Z][A-Z0-9_.]*", word), f"README placeholder {word} has no value here"
                value = word
            out.append(value)
        filled.append(out)
    artifacts.update(written)
    return filled


def fill(command: list[str], tmp: Path, video: Path, other_video: Path) -> list[str]:
    return [word.format(tmp=tmp, video=video, other_video=other_video) for word in command]


def test_readme_has_the_commands_it_documents():
    lines = readme_lines(README.read_text())
    commands = {line.split()[1] for line in lines}
    assert {*ORDER, "serve", "bench", "demo"} <= commands, commands
    assert any("--model tiny-llava-ov|tiny-qwen2.5-vl|tiny-cosmos3-edge" in line for line in lines)


def test_every_readme_line_parses(tmp_path):
    """Each line, bare and with each optional part in turn, is accepted by the CLI's parser: an option the README
    names exists, with a value of the right kind."""
    parser = build_parser()
    artifacts: dict[str, str] = {}
    for line in readme_lines(README.read_text()):
        for variant in [without_optional(line), *with_each_optional(line)]:
            for command in instances(variant, artifacts):
                try:
                    parser.parse_args(fill(command, tmp_path, tmp_path / "a.mp4", tmp_path / "b.mp4"))
                except SystemExit as exc:
                    pytest.fail(f"README line {line!r} as {command}: argparse exit {exc.code}")


def test_built_ins_get_a_budget_that_fits_their_grid():
    """The README's `export --model tiny-qwen2.5-vl --frames 32` failed on SigLIP's budget (126 anchors > 8×8)."""
    from aot_export.adapters import load_model
    from aot_export.export import solve_config

    for name in BUILT_INS:
        adapter = load_model(name)
        cfg = solve_config(adapter.aot_frames(32), None, None, None, None, temporal_patch=adapter.info.temporal_patch,
                           **adapter.aot_fields())
        adapter.check_fits(cfg)
        assert 0.10 <= cfg.retention <= 0.13, (name, cfg.retention)     # the authors' 12 % on LLaVA-OneVision


def runnable(line: str) -> bool:
    return not any(line.startswith(f"aot-export {prefix}") for prefix in NOT_RUN)


# Each line once at the README's sizes (three 32-frame exports, an int4 LLM, bundles, an engine, runs): ~4 min.
@pytest.mark.heavy
def test_every_readme_line_runs(tmp_path, shared_videos, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))  # `live` without --prompt: no questions
    lines = sorted(filter(runnable, readme_lines(README.read_text())),
                   key=lambda line: ORDER.index(line.split()[1]))
    artifacts: dict[str, str] = {}
    for line in lines:
        for command in instances(without_optional(line), artifacts):
            argv = fill(command, tmp_path, *shared_videos[:2]) + ["--quiet"]
            code = main(argv)
            out, err = capsys.readouterr()
            # The README says the tiny model's int8 calibration fails its gate (and writes the export anyway).
            expected = {EXIT_OK, EXIT_FAILED} if command[0] == "calibrate" else {EXIT_OK}
            assert code in expected, f"{' '.join(argv)} → exit {code}\n{err}"
            assert code == EXIT_OK or "FAIL" in out
