"""The newcomer's path beyond the README's lines (tests/test_readme.py): the one wheel the device installs, a quiet
LLM builder that still shows progress and its failure, and `run --repeat` that says how far it is."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from runtime.cli import EXIT_OK, main
from runtime.device.latency import repeat_stages
from runtime.llm import FAILURE_LINES, run_child

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("aot_export", "engines", "runtime", "calibration")


def test_one_wheel_holds_every_package_and_data_file(tmp_path):
    """What the device installs without the source tree (README, "The device runtime alone"): every file of the
    four packages that git knows, the adapters' tokenizer corpus included, and the CLI's entry point."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("aot_export-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *PACKAGES], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    sources = {name for name in listed if (ROOT / name).is_file()}
    assert "aot_export/adapters/tiny_corpus.txt" in sources
    assert sorted(sources - names) == []
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "aot-export = runtime.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_builder_is_quiet_unless_asked(capfd):
    noisy = "import sys\nfor i in range(100): print('line', i)\nprint('bar 1%\\rbar 100%', file=sys.stderr)"
    assert run_child(child(noisy), "builder", progress=False, verbose=False)[0] == 0
    assert capfd.readouterr().err == ""
    code, lines = run_child(child(noisy), "builder", progress=False, verbose=True)
    assert code == 0 and capfd.readouterr().err.endswith("line 99\nbar 1%\rbar 100%\n")     # as it printed it
    assert lines[-2:] == ["bar 1%", "bar 100%"] and len(lines) == 102


def test_a_failed_builder_shows_its_last_lines(tmp_path, capfd, monkeypatch):
    """quantize-llm with the genai builder failing: its last lines, then the one-line error."""
    import runtime.llm as llm

    failing = tmp_path / "failing_builder.py"
    failing.write_text("import sys\nfor i in range(50): print('step', i)\nsys.exit('the builder gave up')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))          # where the builder child finds it
    monkeypatch.setattr(llm, "GENAI_BUILDER", "failing_builder")
    code = main(["quantize-llm", "--out", str(tmp_path / "llm"), "--quiet"])
    err = capfd.readouterr().err.splitlines()
    assert code != EXIT_OK and not (tmp_path / "llm").exists()
    assert err[:FAILURE_LINES] == [*(f"step {i}" for i in range(50 - FAILURE_LINES + 1, 50)), "the builder gave up"]
    assert "model builder failed: the builder gave up" in err[-1] and len(err) == FAILURE_LINES + 1


def test_repeats_report_each_run():
    lines = []
    stats = repeat_stages(lambda: {"stage": 0.001}, warmup=2, repeat=3, progress=lines.append)
    assert [line.split(":")[0] for line in lines] == ["warm-up 1/2", "warm-up 2/2", "run 1/3", "run 2/3", "run 3/3"]
    assert stats["stage"]["n"] == 3
