"""The live window (runtime/device/live.py) on the tiny bundle: clips prefilled once into one KV cache answer as the
same prompt prefilled whole; a question leaves the cache as it was; `shift` eviction moves cached keys to exactly
the rotary positions a fresh prefill gives them (layer 0, whose keys depend on nothing before them), `reprefill`
equals a fresh prefill of the kept clips outright; the cache's size is bounded by the window."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_VIDEOS

from aot_export.errors import InputError
from aot_export.video import decode_frames, synthesize_clip
from runtime.device.decoder import KVCache, rotate_keys
from runtime.device.live import ClipTokens, LiveWindow
from runtime.device.pipeline import DevicePipeline

QUESTION = "What is happening in this video?"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    with DevicePipeline(tiny_bundle) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def clips(pipeline, tmp_path_factory):
    """Six consecutive clips of a synthesized video through the bundle's vision graph."""
    return reduced_clips(pipeline, synthesize_clip(tmp_path_factory.mktemp("v") / "clip.mp4", frames=48, size=160), 6)


def one_prefill(pipeline, window, question=QUESTION, tokens=6):
    prompt, _ = window.layout(question)
    return pipeline.llm.generate(prompt.embeds, tokens, pipeline.text.embed_token, eos=None,
                                 position_ids=prompt.position_ids)


def test_cache_in_segments_equals_one_prefill(pipeline, clips):
    window = LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, 3)
    prompt, bounds = (window.clips.extend(clips[:3]), window.layout(QUESTION))[1]
    whole = KVCache(pipeline.llm, prompt.length).append(prompt.embeds)
    pieces = KVCache(pipeline.llm, 4)                                 # grows twice on the way
    for begin, end in zip([0, *bounds], [*bounds, prompt.length]):
        if end > begin:
            last = pieces.append(prompt.embeds[:, begin:end])
    assert pieces.capacity >= prompt.length
    np.testing.assert_allclose(last, whole, atol=1e-5)


def test_window_answers_as_the_same_prompt_prefilled_whole(pipeline, clips):
    window = LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, 3)
    for clip in clips[:3]:
        window.add(clip)
    reply = window.ask(QUESTION, 6)
    reference = one_prefill(pipeline, window)
    np.testing.assert_allclose(reply.first_logits, reference.step_logits[0], atol=1e-5)
    assert reply.tokens == reference.tokens
    assert reply.seen == [(clips[0].start, clips[2].end)]
    # The question is taken back: asking again, or another question first, changes nothing.
    window.ask("Another question?", 3)
    again = window.ask(QUESTION, 6)
    assert again.tokens == reply.tokens
    np.testing.assert_allclose(again.first_logits, reply.first_logits, atol=1e-6)
    assert reply.question_tokens < reply.prompt_tokens / 4


def test_reprefill_eviction_equals_a_fresh_window(pipeline, clips):
    window = LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, 3, eviction="reprefill")
    for clip in clips:
        window.add(clip)
    assert [c.clip for c in window.clips] == [3, 4, 5]
    reply = window.ask(QUESTION, 6)
    np.testing.assert_allclose(reply.first_logits, one_prefill(pipeline, window).step_logits[0], atol=1e-5)


def test_shift_eviction_moves_keys_to_their_new_positions(pipeline, clips):
    windows = {}
    for eviction in ("shift", "reprefill"):
        windows[eviction] = LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, 3, eviction=eviction)
        for clip in clips:
            windows[eviction].add(clip)
    shift, fresh = windows["shift"].cache, windows["reprefill"].cache
    assert shift.length == fresh.length
    n = shift.length
    np.testing.assert_array_equal(shift.positions[:, :n], fresh.positions[:, :n])
    # Layer 0's keys and values depend only on their own token and position: the turned keys equal fresh ones.
    np.testing.assert_allclose(shift.buffers[0][:, :, :n], fresh.buffers[0][:, :, :n], atol=2e-5)
    np.testing.assert_array_equal(shift.buffers[1][:, :, :n], fresh.buffers[1][:, :, :n])
    # Deeper layers saw the evicted clip when they were computed: the measured cost of not running them again is
    # in docs/benchmarks.md (bench/live.py), not an error here.


def test_rotation_composes():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1, 2, 5, 8)).astype(np.float32)
    # Each frequency turns the pair (i, i + D/2): the tables repeat it over both halves.
    a, b = (np.tile(rng.standard_normal((5, 4)), 2) for _ in range(2))
    np.testing.assert_allclose(rotate_keys(rotate_keys(keys, a), b), rotate_keys(keys, a + b), atol=1e-5)
    np.testing.assert_allclose(rotate_keys(rotate_keys(keys, a), -a), keys, atol=1e-5)


def test_memory_is_bounded_by_the_window(pipeline, clips):
    window = LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, 2)
    lengths, capacities = [], []
    for clip in clips * 3:                                          # 18 clips through a 2-clip window
        window.add(clip)
        window.ask(QUESTION, 2)
        lengths.append(window.cache.length)
        capacities.append(window.cache.capacity)
    assert len(set(lengths[2:])) == 1 and len(set(capacities)) == 1


def test_refusals(pipeline, clips):
    window = LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, 2)
    with pytest.raises(InputError, match="no clip has arrived"):
        window.ask(QUESTION)
    window.add(clips[0])
    with pytest.raises(InputError, match="prompt is empty"):
        window.ask("  ")
    with pytest.raises(InputError, match="exceed the model's context"):
        window.ask(QUESTION, 10 ** 9)
    with pytest.raises(InputError, match="eviction"):
        LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, 2, eviction="fifo")
    with pytest.raises(InputError, match="no whole clip"):
        LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, 0)


def reduced_clips(pipeline, video, count):
    """`count` consecutive clips of `video` through the bundle's vision graph, stamped one second per grid."""
    frames = decode_frames(video, count * pipeline.frames)
    result = []
    for k in range(count):
        outputs, _ = pipeline.reduce(frames[k * pipeline.frames:(k + 1) * pipeline.frames])
        seconds = k * pipeline.aot_frames + np.arange(pipeline.aot_frames, dtype=np.float64)
        result.append(ClipTokens(k, outputs["tokens"], outputs["index"].astype(np.int64), seconds,
                                 float(seconds[0]), float(seconds[-1])))
    return result


def window_checks(bundle, video):
    """A family's live window against one prefill of the same prompt (its 3-D positions, its stamps), and shift
    eviction's layer-0 keys against a fresh prefill of the kept clips."""
    with DevicePipeline(bundle) as pipeline:
        clips = reduced_clips(pipeline, video, 4)
        growing = LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, 2)
        for clip in clips[:2]:
            growing.add(clip)
        reply = growing.ask(QUESTION, 4)
        reference = one_prefill(pipeline, growing, tokens=4)
        np.testing.assert_allclose(reply.first_logits, reference.step_logits[0], atol=1e-5)
        assert reply.tokens == reference.tokens
        windows = {name: LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames, 2, eviction=name)
                   for name in ("shift", "reprefill")}
        for window in windows.values():
            for clip in clips:
                window.add(clip)
        shift, fresh = windows["shift"].cache, windows["reprefill"].cache
        n = fresh.length
        assert shift.length == n
        np.testing.assert_array_equal(shift.positions[:, :n], fresh.positions[:, :n])
        np.testing.assert_allclose(shift.buffers[0][:, :, :n], fresh.buffers[0][:, :, :n], atol=2e-5)
        reply = windows["reprefill"].ask(QUESTION, 4)
        np.testing.assert_allclose(reply.first_logits,
                                   one_prefill(pipeline, windows["reprefill"], tokens=4).step_logits[0], atol=1e-5)


# ---- live_events and `aot-export live` on real sources made here ---------------------------------------------------
def footage_ts(video, seconds: float, fps: int = 10, size: int = 96) -> bytes:
    """`seconds` of real footage as an MPEG-TS byte stream (what a network camera sends)."""
    import io

    import av

    frames = decode_frames(video, int(seconds * fps), size=size)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    videos = sorted(SHARED_VIDEOS.glob("*.mp4"))
    if videos:
        return videos[0]
    return synthesize_clip(tmp_path_factory.mktemp("v") / "clip.mp4", frames=240, size=160)


def test_live_events_on_a_network_stream(pipeline, footage):
    """Four clips of footage served over loopback TCP; a standing prompt answered after each; the window keeps two."""
    from aot_export.sources import open_source
    from runtime.device.live import Answer, ClipEvicted, ClipReduced, End, LiveSettings
    from test_sources import Server

    with Server(footage_ts(footage, 16.5)) as server:
        source = open_source(f"tcp://127.0.0.1:{server.port}", stall_timeout=3.0)
        # The server sends the whole stream at once, faster than real time: room for every clip, so none drops.
        settings = LiveSettings(fps=2.0, window_s=8.0, prompt=QUESTION, max_new_tokens=3, pending=4)
        events = list(pipeline.live(source, settings))
    kinds = [type(e) for e in events]
    reduced = [e for e in events if isinstance(e, ClipReduced)]
    answers = [e for e in events if isinstance(e, Answer)]
    assert len(reduced) == 4 and kinds.count(ClipEvicted) == 2 and len(answers) == 4
    assert [r.clip for r in reduced] == [0, 1, 2, 3]
    assert reduced[0].start == 0.0 and reduced[-1].end == pytest.approx(15.5, abs=0.11)
    assert answers[-1].seen == [(reduced[2].start, reduced[3].end)]          # two clips of 4 s, the last ones
    assert all(a.question_tokens < a.prompt_tokens / 3 and a.generated_tokens >= 1 for a in answers)
    end = events[-1]
    assert isinstance(end, End) and end.clips == 4 and end.dropped == 0 and end.answers == 4
    assert end.realtime_factor["max"] > 0 and end.reason


def test_a_slow_consumer_drops_clips_never_queues_them(pipeline, tmp_path):
    """A file played at its own rate to a consumer slower than it: clips are dropped, counted and reported."""
    from aot_export.sources import open_source
    from runtime.device.live import ClipDropped, ClipReduced, End, LiveSettings

    video = synthesize_clip(tmp_path / "four.mp4", frames=96, size=96, fps=24)           # 4 s
    settings = LiveSettings(fps=8.0, window_s=2.0, pending=1)                            # a clip per second
    events = []
    for event in pipeline.live(open_source(str(video), realtime=True), settings):
        events.append(event)
        if isinstance(event, ClipReduced):
            time.sleep(1.6)
    dropped = [e for e in events if isinstance(e, ClipDropped)]
    reduced = [e for e in events if isinstance(e, ClipReduced)]
    end = events[-1]
    assert isinstance(end, End) and end.dropped == len(dropped) >= 1
    assert len(reduced) + len(dropped) <= 4 and dropped[-1].dropped == end.dropped


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, **kwargs)


def write_image_bag(path, video, seconds: float, rate: float = 4.0):
    """A rosbag2 (sqlite3) recording of `seconds` of footage as sensor_msgs/Image rgb8 on /camera/image."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.LATEST)
    Image, Header, Time = (store.types[n] for n in ("sensor_msgs/msg/Image", "std_msgs/msg/Header",
                                                    "builtin_interfaces/msg/Time"))
    frames = decode_frames(video, int(seconds * rate), size=64)
    with Writer(path, version=8) as writer:
        connection = writer.add_connection("/camera/image", Image.__msgtype__, typestore=store)
        for i, frame in enumerate(frames):
            stamp = i / rate
            ns = int(stamp * 1e9)
            message = Image(Header(Time(ns // 10 ** 9, ns % 10 ** 9), "camera"), 64, 64, "rgb8", 0, 64 * 3,
                            np.ascontiguousarray(frame).reshape(-1))
            writer.write(connection, ns, store.serialize_cdr(message, Image.__msgtype__))
    return path


def test_cli_live_on_a_rosbag_with_questions_on_stdin(tiny_bundle, footage, tmp_path):
    pytest.importorskip("rosbags")
    bag = write_image_bag(tmp_path / "bag", footage, 12.5)
    out = tmp_path / "live.json"
    done = run_cli("live", "--model", str(tiny_bundle), "--source", str(bag), "--fps", "2", "--window", "8",
                   "--max-new-tokens", "3", "--json", str(out), input="What is in view?\nAnd now?\n")
    assert done.returncode == 0, done.stderr
    log = json.loads(out.read_text())
    kinds = [e["event"] for e in log["events"]]
    assert kinds.count("clip") == 3 and kinds.count("answer") == 2 and kinds[-1] == "end"
    answer = next(e for e in log["events"] if e["event"] == "answer")
    assert answer["question"] == "What is in view?" and answer["seen"][0][0] == 0.0
    assert "clip 2" in done.stdout and "Q1" in done.stdout and log["end"]["reason"] == "end of stream"


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130),
                                          pytest.param(signal.SIGTERM, 143, marks=pytest.mark.heavy)])
def test_cli_live_stops_on_a_signal_and_keeps_its_log(tiny_bundle, tmp_path, signum, code):
    video = synthesize_clip(tmp_path / "long.mp4", frames=480, size=96, fps=24)         # 20 s at its own rate
    out = tmp_path / "live.json"
    process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "live", "--model", str(tiny_bundle),
                                "--source", str(video), "--realtime", "--fps", "2", "--window", "8", "--prompt",
                                QUESTION, "--max-new-tokens", "2", "--json", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = process.stdout.readline()                          # the first clip's line: the stream is running
        assert "clip 0" in line, line + process.stderr.read()
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == code and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    log = json.loads(out.read_text())
    assert log["events"][0]["event"] == "clip" and log["end"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.json", "long.mp4"]


@pytest.mark.parametrize("args, words", [
    (["--source", "/nonexistent/camera.mp4"], "camera.mp4"),
    (["--source", "tcp://127.0.0.1:9"], "127.0.0.1:9"),
    (["--source", "x.mp4", "--window", "1"], "no whole clip"),
    (["--source", "x.mp4", "--stall-timeout", "-1"], "--stall-timeout"),
])
def test_cli_live_bad_input_is_one_line(tiny_bundle, tmp_path, capsys, args, words):
    from runtime.cli import EXIT_BAD_INPUT, main

    (tmp_path / "x.mp4").write_bytes(b"")
    try:
        code = main(["live", "--model", str(tiny_bundle), *[a.replace("x.mp4", str(tmp_path / "x.mp4"))
                                                            for a in args]])
    except SystemExit as exc:                                    # argparse refuses a bad value itself
        code = exc.code
    err = capsys.readouterr().err.strip()
    # argparse's own refusals print its usage above the one line
    assert code == EXIT_BAD_INPUT and "Traceback" not in err and words in err.splitlines()[-1], err
