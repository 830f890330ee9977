"""The live window (runtime/device/live.py) on the tiny bundle: clips prefilled once into one KV cache answer as the
same prompt prefilled whole; a question leaves the cache as it was; `shift` eviction moves cached keys to exactly
the rotary positions a fresh prefill gives them (layer 0, whose keys depend on nothing before them), `reprefill`
equals a fresh prefill of the kept clips outright; the cache's size is bounded by the window."""

import numpy as np
import pytest

from aot_export.errors import InputError
from aot_export.video import decode_frames, synthesize_clip
from runtime.device.decoder import KVCache, rotate_keys
from runtime.device.live import ClipTokens, LiveWindow
from runtime.device.pipeline import DevicePipeline

QUESTION = "What is happening in this video?"


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
