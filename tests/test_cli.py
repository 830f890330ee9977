"""The `aot-export` shell: exit codes, one-line errors, JSON output, the console script."""

import json
import shutil
import subprocess

import pytest

from aot_export.report import format_table
from runtime.cli import EXIT_BAD_INPUT, EXIT_OK, main


def test_console_script_is_installed():
    exe = shutil.which("aot-export")
    assert exe, "pip install -e . must put aot-export on PATH"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out


# ~100 s (the default solver's 32-frame export); CI's set-up line runs `aot-export demo` as well.
@pytest.mark.heavy
def test_demo_on_a_synthesized_clip(tmp_path, capsys):
    """The README's main job end to end (export → check → validate), on a clip made here."""
    from aot_export.video import synthesize_clip

    video = synthesize_clip(tmp_path / "clip.mp4", frames=40)
    report_path = tmp_path / "report.json"
    code = main(["demo", "--workdir", str(tmp_path / "work"), "--video", str(video), "--json", str(report_path),
                 "--quiet"])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "PASS" in out and "visual tokens with AOT" in out
    assert "random weights" in out and f"written   " in out and str(tmp_path / "work" / "export") in out
    assert "aot-export build " in out and "aot-export run " in out          # what to run next
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["output_tokens"] == 752 and report["input_tokens"] == 6272
    (validation,) = report["validations"]
    assert validation["metrics"]["cosine_min"] >= 0.99999 and validation["metrics"]["index_agreement"] == 1.0
    assert report["check"]["passed"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["export"]


@pytest.mark.parametrize("content", [None, b"", b"not a video at all" * 100])
def test_bad_video_is_one_line_and_exit_2(tmp_path, capsys, content):
    path = tmp_path / "video.mp4"
    if content is not None:
        path.write_bytes(content)
    code = main(["demo", "--workdir", str(tmp_path / "work"), "--video", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err and "pass" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    code = main(["demo", "--workdir", str(tmp_path), "--video", str(tmp_path / "missing.mp4"), "--debug"])
    assert code == EXIT_BAD_INPUT
    assert "Traceback" in capsys.readouterr().err


def test_format_table():
    text = format_table([("a", 1.0), ("bb", 22)], ("name", "value")).splitlines()
    assert text[0].split() == ["name", "value"] and set(text[1]) <= {"-", " "} and text[3].split() == ["bb", "22"]


def test_calibrate_refuses_what_is_not_an_export(tmp_path, capsys):
    code = main(["calibrate", str(tmp_path), "--videos", str(tmp_path / "v.mp4"), "--precision", "int8",
                 "--out", str(tmp_path / "q")])
    assert code == EXIT_BAD_INPUT and "manifest.json" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
