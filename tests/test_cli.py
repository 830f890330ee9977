"""The `aot-export` shell: exit codes, one-line errors, JSON output, the console script."""

import json
import shutil
import subprocess

import pytest

from aot_export.errors import InputError
from aot_export.report import format_table
from runtime.cli import EXIT_BAD_INPUT, EXIT_OK, main


def test_console_script_is_installed():
    exe = shutil.which("aot-export")
    assert exe, "pip install -e . must put aot-export on PATH"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in out


# ~50 s on 2 cores (export, check and validate of the default 32-frame graph); CI's set-up line runs `aot-export demo`
# as well.
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


# ---- clip length: follows --frames as the authors' code does, one line where they define none --------------------
@pytest.fixture
def stop_before_export(monkeypatch, tiny):
    """`aot-export export` on the session's tiny model up to the export itself (~100 s on CPU): the configs it
    would have exported."""
    import aot_export.adapters
    import aot_export.export

    configs = []

    def stop(adapter, cfg, out, **kwargs):
        configs.append(cfg)
        raise InputError("stopped before the export")

    monkeypatch.setattr(aot_export.adapters, "load_model", lambda name: tiny)
    monkeypatch.setattr(aot_export.export, "export_vision_aot", stop)
    return configs


@pytest.mark.parametrize("argv, clip_len, noted", [(["--frames", "32"], 4, False), (["--frames", "64"], 8, False),
                                                   (["--frames", "8"], 4, True), (["--frames", "48"], 6, True),
                                                   (["--frames", "64", "--clip-len", "4"], 4, False),
                                                   (["--frames", "48", "--clip-len", "2"], 2, False)])
def test_export_clip_len_follows_the_frames(stop_before_export, tmp_path, capsys, argv, clip_len, noted):
    assert main(["export", *argv, "--out", str(tmp_path / "out"), "--quiet"]) == EXIT_BAD_INPUT
    *notes, last = capsys.readouterr().err.strip().splitlines()
    assert last == "aot-export export: error: stopped before the export"
    (cfg,) = stop_before_export
    assert cfg.clip_len == clip_len and len(notes) == noted
    if noted:
        assert notes[0].startswith(f"note: --frames {cfg.frames} → clips of {clip_len}: the authors define only "
                                   "32 → 4 and 64 → 8")
        assert notes[0].endswith("--clip-len sets another")


def test_export_refuses_a_clip_len_that_does_not_divide_the_frames(stop_before_export, tmp_path, capsys):
    assert main(["export", "--frames", "8", "--clip-len", "3", "--out", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err == ("aot-export export: error: --clip-len 3 does not cut --frames 8 into whole clips; pass one of "
                   "1, 2, 4, 8 (1: no inter-frame merging), or leave --clip-len out")
    assert stop_before_export == []


def test_clip_len_messages_count_temporal_patches_as_aot_frames():
    """Qwen2.5-VL folds 2 frames into one grid: the authors' rule counts grids, the messages count --frames."""
    from aot_export.export import clip_len_notice, solve_config

    assert clip_len_notice(32) is None and clip_len_notice(64) is None
    note = clip_len_notice(32, temporal_patch=2)
    assert note == ("note: --frames 64 (32 temporal patches of 2) → clips of 4 temporal patches: AOT counts temporal "
                    "patches as frames; the authors use 4 for 32; --clip-len (in temporal patches) sets another")
    assert "\n" not in clip_len_notice(8, temporal_patch=2)
    with pytest.raises(InputError, match=r"^--frames 6 \(3 temporal patches of 2\) is not a multiple of the clip "
                                         r"length 4.*pass --frames 8,"):
        solve_config(3, None, None, None, None, grid=27, temporal_patch=2)
    assert solve_config(64, None, None, None, None, grid=27, temporal_patch=2).clip_len == 8
