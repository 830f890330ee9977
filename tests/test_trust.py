"""Issue 22: bundles you can trust. One confinement rule for every artifact (every file a manifest names is inside
its directory, listed and hashed, and so is each nested manifest's), a bundle's id and `--expect-id`, failed
verdicts that travel to `bundle` and the device, and no command writing over its own input. Every refusal is exit 2,
one line naming the path or value, and leaves nothing behind."""

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from aot_export.artifacts import sha256_file
from aot_export.errors import InputError
from aot_export.manifest import MANIFEST, read_manifest
from runtime.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, main
from runtime.device.bundle import BUNDLE, bundle_id
from runtime.device.decoder import read_llm_manifest

PROMPT = "What is happening in this video?"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from aot_export.video import synthesize_clip

    return synthesize_clip(tmp_path_factory.mktemp("v") / "clip.mp4", frames=24, size=160)


def tree(directory: Path) -> dict[str, str]:
    """Every entry below `directory` (symlinks by their target, files by their sha256): what was left behind."""
    found = {}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        found[name] = (f"-> {os.readlink(path)}" if path.is_symlink() else sha256_file(path) if path.is_file()
                       else "dir")
    return found


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "internal error" not in err, err
    return err


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def rehash(bundle: Path, *names: str) -> None:
    edit_json(bundle / BUNDLE, lambda data: data["files"].update({name: sha(bundle / name) for name in names}))


# ---- 1. confinement: a bundle altered in each way the issue found, run on the device ------------------------------
def _unlisted(d):
    (d / "text/notes.txt").write_text("not listed")


def _absolute(d):
    edit_json(d / BUNDLE, lambda data: data["files"].update({"/etc/passwd": sha(Path("/etc/passwd"))}))


def _dotdot(d):
    (d.parent / "outside.txt").write_text("outside the bundle")
    edit_json(d / BUNDLE, lambda data: data["files"].update({"../outside.txt": sha(d.parent / "outside.txt")}))


def _escaping_symlink(d):
    (d / "text/tokenizer.json").unlink()
    (d / "text/tokenizer.json").symlink_to("/etc/passwd")
    rehash(d, "text/tokenizer.json")


def _dropped_and_altered(d):
    flip(d / "vision/vision_aot.onnx.data")
    edit_json(d / BUNDLE, lambda data: data["files"].pop("vision/vision_aot.onnx.data"))


def _no_files(d):
    flip(d / "vision/vision_aot.onnx.data")
    edit_json(d / BUNDLE, lambda data: data.update(files={}))


def _decoder_outside(d):
    edit_json(d / "llm/genai_config.json",
              lambda g: g["model"]["decoder"].update(filename="../vision/vision_aot.onnx"))
    size = (d / "llm/genai_config.json").stat().st_size
    edit_json(d / "llm/llm.json", lambda m: (m["files"].update({"genai_config.json": sha(d / "llm/genai_config.json")}),
                                             m["sizes"].update({"genai_config.json": size})))
    rehash(d, "llm/genai_config.json", "llm/llm.json")


def _nested_hash(d):
    """vision/manifest.json records another sha256 for the weights; bundle.json is rehashed to match the edit."""
    edit_json(d / "vision/manifest.json", lambda m: m["files"].update({"vision_aot.onnx.data": "0" * 64}))
    rehash(d, "vision/manifest.json")


def _list_document(d):
    (d / BUNDLE).write_text("[]")


def _files_a_list(d):
    edit_json(d / BUNDLE, lambda data: data.update(files=sorted(data["files"])))


def _unknown_flavour(d):
    edit_json(d / BUNDLE, lambda data: data["vision"].update(flavour="openvino"))


def _short_table(d):
    table = np.load(d / "text/embeddings.npy")
    np.save(d / "text/embeddings.npy", table[: len(table) // 2])
    rehash(d, "text/embeddings.npy")


def _frames_edited(d):
    def edit(data):
        data["frames"] *= 2
        data["export_manifest"]["inputs"][0]["shape"][0] *= 2
    edit_json(d / BUNDLE, edit)


TAMPERED = [
    (_unlisted, "text/notes.txt is not listed in bundle.json"),
    (_absolute, "/etc/passwd is an absolute path"),
    (_dotdot, "../outside.txt leads out of the directory"),
    (_escaping_symlink, "text/tokenizer.json is a symlink leading out of the directory (to /etc/passwd)"),
    (_dropped_and_altered, "vision/vision_aot.onnx.data is not listed in bundle.json"),
    (_no_files, "bundle.json lists no files"),
    (_decoder_outside, "names the decoder graph, but ../vision/vision_aot.onnx leads out of the directory"),
    (_nested_hash, "vision/vision_aot.onnx.data has another sha256 in vision/manifest.json than in bundle.json"),
    (_list_document, "holds a JSON list, not an object"),
    (_files_a_list, "'files' is a JSON list"),
    (_unknown_flavour, "vision 'export' on 'openvino' is not a vision part this version runs"),
    (_short_table, "text/embeddings.npy is ["),
    (_frames_edited, "its export_manifest input frames shape"),
]


@pytest.mark.parametrize("edit, words", TAMPERED, ids=[edit.__name__.strip("_") for edit, _ in TAMPERED])
def test_a_tampered_bundle_is_refused_in_one_line(tiny_bundle, clip, tmp_path, capsys, edit, words):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy, symlinks=True)
    edit(copy)
    before = tree(tmp_path)
    code = main(["run", "--model", str(copy), "--video", str(clip), "--prompt", PROMPT, "--max-new-tokens", "1"])
    err = one_line_error(capsys)
    assert code == EXIT_BAD_INPUT and words in err, err
    assert tree(tmp_path) == before                                   # nothing written, nothing left


# ---- 1. the same rule in every reader: export, LLM, engine ----------------------------------------------------------
def _fake_engine(directory: Path) -> Path:
    """An engine directory as `aot-export build` writes one (its sidecar and a plan of arbitrary bytes: reading the
    directory never deserializes the plan)."""
    from engines.sidecar import PLAN, SIDECAR, EngineSidecar

    directory.mkdir()
    (directory / PLAN).write_bytes(os.urandom(256))
    sidecar = EngineSidecar(flavour="tensorrt_rtx", tensorrt_version="1.0", cuda="12", target="rtx",
                            compute_capabilities=["8.9"], precision="fp32", builder={}, onnx_sha256="0" * 64,
                            plan_sha256=sha256_file(directory / PLAN), manifest={}, build_seconds=0.0, plan_bytes=256)
    (directory / SIDECAR).write_text(json.dumps(sidecar.to_dict()))
    return directory


def _read_export(d):
    return read_manifest(d)


def _read_llm(d):
    return read_llm_manifest(d)


def _read_engine(d):
    from engines.sidecar import read_sidecar

    return read_sidecar(d)


READERS = [
    ("export", "notes.txt is not listed in manifest.json", lambda d: (d / "notes.txt").write_text("x")),
    ("export", "leads out of the directory",
     lambda d: edit_json(d / MANIFEST, lambda m: m["files"].update({"../x": "0" * 64}))),
    ("export", "manifest.json lists no files", lambda d: edit_json(d / MANIFEST, lambda m: m.update(files={}))),
    ("export", "manifest.json is a symlink leading out",
     lambda d: (shutil.move(d / MANIFEST, d.parent / "elsewhere.json"), (d / MANIFEST).symlink_to(
         d.parent / "elsewhere.json"))),
    ("llm", "extra.onnx is not listed in llm.json", lambda d: (d / "extra.onnx").write_bytes(b"x")),
    ("llm", "llm.json lists no files", lambda d: edit_json(d / "llm.json", lambda m: m.update(files={}))),
    ("engine", "notes.txt is not listed in engine.json", lambda d: (d / "notes.txt").write_text("x")),
    ("engine", "engine.plan is a symlink leading out",
     lambda d: (shutil.move(d / "engine.plan", d.parent / "plan"), (d / "engine.plan").symlink_to(d.parent / "plan"))),
]


@pytest.mark.parametrize("kind, words, edit", READERS, ids=[f"{kind}-{i}" for i, (kind, _, _) in enumerate(READERS)])
def test_every_reader_holds_its_directory_to_its_manifest(tiny_export, tiny_llm, tmp_path, kind, words, edit):
    source = {"export": tiny_export, "llm": tiny_llm}.get(kind)
    copy = Path(shutil.copytree(source, tmp_path / kind)) if source else _fake_engine(tmp_path / kind)
    read = {"export": _read_export, "llm": _read_llm, "engine": _read_engine}[kind]
    read(copy)                                                     # as written: accepted
    edit(copy)
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")) as refused:
        read(copy)
    assert len(str(refused.value).splitlines()) == 1


def test_an_engines_own_report_is_no_stranger(tmp_path):
    from engines.sidecar import LAYER_REPORT, read_sidecar

    engine = _fake_engine(tmp_path / "engine")
    (engine / LAYER_REPORT).write_text("{}")
    assert read_sidecar(engine).plan_bytes == 256


def test_check_reports_an_unlisted_file_as_a_finding(tiny_export, tmp_path, capsys):
    copy = Path(shutil.copytree(tiny_export, tmp_path / "e"))
    (copy / "notes.txt").write_text("x")
    assert main(["check", str(copy), "--no-tensorrt"]) == EXIT_FAILED
    assert "notes.txt is not listed in manifest.json" in capsys.readouterr().out


# ---- 1. the bundle's id pins it ---------------------------------------------------------------------------------------
def test_expect_id_runs_only_the_bundle_given(tiny_bundle, tiny_export, clip, tmp_path, capsys):
    run = ["run", "--video", str(clip), "--prompt", PROMPT, "--max-new-tokens", "1"]
    identity = bundle_id(tiny_bundle)
    assert identity == sha(tiny_bundle / BUNDLE)
    assert main([*run, "--model", str(tiny_bundle), "--expect-id", identity.upper()]) == EXIT_OK
    capsys.readouterr()
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    edit_json(other / BUNDLE, lambda data: data.update(note="edited"))    # a bundle that still checks out in itself
    assert main([*run, "--model", str(other), "--expect-id", identity]) == EXIT_BAD_INPUT
    assert f"bundle id {bundle_id(other)} is not the expected {identity}" in one_line_error(capsys)
    assert main([*run, "--model", str(tiny_bundle), "--expect-id", identity, "--skip-hash"]) == EXIT_BAD_INPUT
    assert "--skip-hash" in one_line_error(capsys)
    assert main([*run, "--model", str(tiny_export), "--expect-id", identity]) == EXIT_BAD_INPUT
    assert "pins a bundle" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        main([*run, "--model", str(tiny_bundle), "--expect-id", "abc"])
    assert "not a sha256" in capsys.readouterr().err


# ---- 2. verdicts travel -----------------------------------------------------------------------------------------------
def test_a_failed_validate_travels_to_bundle_and_device(tiny_export, tiny_llm, clip, tmp_path, capsys):
    """validate writes its FAIL into the export (hashes still right); bundle refuses it unless --allow-failed, which
    bundle.json records; run and live refuse that bundle unless they are told --allow-failed too."""
    from export_copies import edited_export

    wrong = edited_export(tiny_export, tmp_path / "wrong", weight=("tower.embeddings.patch_embedding.weight", 1.5))
    assert main(["validate", str(wrong), "--video", str(clip), "--quiet"]) == EXIT_FAILED
    verdict = read_manifest(wrong).extra["validation"]                      # every sha256 verified
    assert verdict["passed"] is False and verdict["failed"] and verdict["video"] == clip.name
    capsys.readouterr()

    out = tmp_path / "bundle"
    bundle = ["bundle", "--model", str(wrong), "--llm", str(tiny_llm), "--out", str(out), "--quiet"]
    assert main(bundle) == EXIT_BAD_INPUT
    assert "validate FAILED" in one_line_error(capsys) and not out.exists()
    assert main([*bundle, "--allow-failed"]) == EXIT_OK
    printed = capsys.readouterr()
    assert "warning:" in printed.err and bundle_id(out) in printed.out
    assert any("validate FAILED" in failure for failure in json.loads((out / BUNDLE).read_text())["failed_gates"])

    run = ["run", "--model", str(out), "--video", str(clip), "--prompt", PROMPT, "--max-new-tokens", "1"]
    assert main(run) == EXIT_BAD_INPUT and "--allow-failed" in one_line_error(capsys)
    live = ["live", "--model", str(out), "--source", str(clip), "--prompt", PROMPT, "--max-new-tokens", "1"]
    assert main(live) == EXIT_BAD_INPUT and "validate FAILED" in one_line_error(capsys)
    assert main([*run, "--allow-failed"]) == EXIT_OK
    assert "warning:" in capsys.readouterr().err


def test_a_failed_calibration_is_refused_by_bundle(tiny, tiny_export, tiny_llm, tmp_path):
    from runtime.bundle import write_bundle

    copy = Path(shutil.copytree(tiny_export, tmp_path / "q8"))
    manifest = read_manifest(copy)
    holdout = {"name": "bikes.mp4", "passed": False}
    dataclasses.replace(manifest, extra={"calibration": {"holdout": holdout}}).write(copy)
    with pytest.raises(InputError, match="calibration FAILED its fidelity gates on bikes.mp4"):
        write_bundle(copy, tiny_llm, tmp_path / "b", adapter=tiny)
    assert not (tmp_path / "b").exists()


# ---- 3. no command writes over its own input --------------------------------------------------------------------------
OWN_INPUT = [
    (["quantize-weights", "{E}", "--out", "{E}", "--force"], "is the source export"),
    (["quantize-weights", "{E}", "--out", "{HERE}/e", "--force"], "is the source export"),      # resolves to it
    (["quantize-weights", "{E}", "--out", "{E}/w8"], "is inside the source export"),
    (["calibrate", "{E}", "--videos", "{CLIP}", "--holdout", "{CLIP}", "--precision", "int8", "--out", "{E}",
      "--force"], "is the source export"),
    (["build", "{E}", "--target", "rtx", "--precision", "fp32", "--out", "{E}/engine"], "is inside the source export"),
    (["bundle", "--model", "{B}/vision", "--llm", "{B}/llm", "--out", "{B}", "--force"], "holds the source artifact"),
    (["quantize-llm", "--model", "{CKPT}", "--out", "{CKPT}/llm"], "is inside the source model"),
    (["export", "--model", "{CKPT}", "--out", "{CKPT}/export"], "is inside the source model"),
]


@pytest.mark.parametrize("argv, words", OWN_INPUT, ids=[" ".join(argv[:1] + argv[-3:]) for argv, _ in OWN_INPUT])
def test_no_command_writes_over_its_own_input(tiny_export, tiny_bundle, clip, tmp_path, capsys, argv, words):
    shutil.copytree(tiny_export, tmp_path / "e")
    shutil.copytree(tiny_bundle, tmp_path / "b")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "here").symlink_to(tmp_path)
    names = {"{E}": tmp_path / "e", "{B}": tmp_path / "b", "{CKPT}": tmp_path / "ckpt", "{HERE}": tmp_path / "here",
             "{CLIP}": clip}
    filled = [str(names.get(arg.split("/")[0], arg.split("/")[0])) + arg[len(arg.split("/")[0]):] for arg in argv]
    before = tree(tmp_path)
    assert main([*filled, "--quiet"]) == EXIT_BAD_INPUT
    assert words in one_line_error(capsys)
    assert tree(tmp_path) == before                              # the source intact, nothing left beside it


def test_validate_never_writes_into_a_bundles_part(tiny_bundle, clip, tmp_path, capsys):
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    before = tree(tmp_path)
    assert main(["validate", str(copy / "vision"), "--video", str(clip), "--quiet"]) == EXIT_BAD_INPUT
    assert "vision part of the bundle" in one_line_error(capsys)
    assert tree(tmp_path) == before
