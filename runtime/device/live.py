"""Live video on the device: a source (camera, network stream, file, ROS 2 recording) → clips → the bundle's vision
graph per clip → each clip's reduced tokens prefilled ONCE into the LLM's KV cache, the last W seconds kept; a
question then costs its own tokens, whatever the window holds.

- `LiveWindow` is the LLM side: the cache holds the chat template's prefix, then one region per clip (its tokens,
  and for Cosmos3-Edge its frames' stamps and block ends), laid out by the one prompt assembly
  (`aot_export.prompt_assembly.assemble_prompt`) exactly as a prompt about the window's clips would be. A question
  appends the rest of that prompt (LLaVA's newline, Qwen's `<|vision_end|>`, the question, the assistant turn),
  generates, and is taken back (`KVCache.rewind`). When the window is full the oldest clip leaves: `shift` drops its
  slots and turns the later keys to their new rotary positions (no token is run again); `reprefill` runs the kept
  clips again. docs/benchmarks.md has the measured cost and fidelity of each.
- `live_events` drives it from a source: a reader thread cuts clips into a queue of `pending` clips; a live source
  that outruns the pipeline loses its oldest pending clip (counted, reported), a file read as fast as possible waits
  instead. It yields events (`ClipReduced`, `ClipDropped`, `ClipEvicted`, `AnswerToken`, `Answer`, `End`).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np

from aot_export.errors import InputError
from aot_export.prompt_assembly import AssembledPrompt, assemble_prompt
from aot_export.report import peak_rss_mib

from .decoder import OrtDecoder, greedy
from .text import DeviceText, TextStream

EVICTIONS = ("shift", "reprefill")
# The clips' layout never depends on the question (the video precedes it in every family's template), so the
# window's regions are laid out with this stand-in until a real question comes.
STAND_IN_QUESTION = "?"


@dataclass(frozen=True)
class ClipTokens:
    """One clip after the vision graph: its reduced tokens [n, H], their (frame within the clip, row, col) [n, 3],
    the stream time of each of its grids [frames], and the stream seconds it covers."""

    clip: int
    tokens: np.ndarray
    index: np.ndarray
    frame_seconds: np.ndarray
    start: float
    end: float


def clip_bounds(prompt: AssembledPrompt, frames_per_clip: int, clips: int) -> np.ndarray:
    """[clips + 1] slot boundaries of the clips' regions in `prompt`: region k is [b[k], b[k+1]), the prefix ends
    at b[0] and the question's part starts at b[-1]."""
    clip_of = np.where(prompt.frame_of >= 0, prompt.frame_of // frames_per_clip, -1)
    video = np.flatnonzero(clip_of >= 0)
    counts = np.bincount(clip_of[video], minlength=clips)
    bounds = int(video[0]) + np.concatenate([[0], np.cumsum(counts)])
    if not np.array_equal(clip_of[bounds[0]:bounds[-1]], np.repeat(np.arange(clips), counts)):
        raise RuntimeError("a clip's positions are not contiguous in the prompt layout")
    return bounds


@dataclass
class Reply:
    question: str
    answer: str
    tokens: list[int]
    seen: list[tuple[float, float]]       # stream seconds of the window's clips (merged where they touch)
    ttft_s: float
    decode_s: float
    prompt_tokens: int                    # prefix + window + question, as one prompt would hold them
    question_tokens: int                  # what this question ran through the LLM before its first token
    first_logits: np.ndarray              # [V] before the first answer token


def merged_spans(clips: Iterable[ClipTokens], gap: float) -> list[tuple[float, float]]:
    """The clips' [start, end] stream seconds, touching ones (within `gap`) merged: what a window saw."""
    spans: list[tuple[float, float]] = []
    for clip in clips:
        if spans and clip.start - spans[-1][1] <= gap:
            spans[-1] = (spans[-1][0], clip.end)
        else:
            spans.append((clip.start, clip.end))
    return spans


class LiveWindow:
    """The LLM's side of a live stream: the last `clips` clips' tokens held in one KV cache (see the module)."""

    def __init__(self, text: DeviceText, llm: OrtDecoder, frames_per_clip: int, clips: int,
                 eviction: str = "shift", frame_gap: float = 1.0):
        if eviction not in EVICTIONS:
            raise InputError(f"--eviction {eviction!r}: choose one of {', '.join(EVICTIONS)}")
        if llm.kv != "bound":
            raise InputError("a live window keeps the LLM's cache between calls; run it with --kv bound")
        if eviction == "shift" and llm.rotary is None:
            raise InputError(f"{llm.directory}: its llm.json records no rotary turns, which --eviction shift needs to "
                             "move cached keys; rebuild it with `aot-export quantize-llm` or use --eviction reprefill")
        if clips < 1:
            raise InputError("the window holds no whole clip; raise --window to at least one clip's seconds")
        self.text, self.llm, self.frames_per_clip, self.size = text, llm, frames_per_clip, clips
        self.eviction, self.frame_gap = eviction, frame_gap
        self.clips: deque[ClipTokens] = deque()
        self.cache = llm.cache(1024)
        self.ids = np.zeros(0, np.int64)          # what the cache holds, as ids (checked against every layout)
        self.prefix = 0                           # the chat template's part before the first clip
        self.lengths: deque[int] = deque()        # each clip's region in the cache

    # ---- layout -----------------------------------------------------------------------------------------------
    def layout(self, question: str) -> tuple[AssembledPrompt, np.ndarray]:
        """The prompt about the window's clips with `question`, and its clip bounds (`clip_bounds`)."""
        clips = list(self.clips)
        offsets = np.repeat(np.arange(len(clips)) * self.frames_per_clip, [len(c.index) for c in clips])
        index = np.concatenate([c.index for c in clips]).astype(np.int64)
        index[:, 0] += offsets
        prompt = assemble_prompt(self.text.spec, self.text.tokenizer, question,
                                 np.concatenate([c.tokens for c in clips]), index, self.text.embed, self.text.newline,
                                 len(clips) * self.frames_per_clip, np.concatenate([c.frame_seconds for c in clips]))
        return prompt, clip_bounds(prompt, self.frames_per_clip, len(clips))

    def _extend(self, prompt: AssembledPrompt, begin: int, end: int) -> np.ndarray:
        """Runs prompt slots [begin, end) into the cache (they follow what it holds) → the last one's logits."""
        if self.cache.length != begin or not np.array_equal(self.ids, prompt.input_ids[:begin]):
            raise RuntimeError("the live cache no longer holds the prompt's beginning")
        positions = None if prompt.position_ids is None else prompt.position_ids[:, :, begin:end]
        logits = self.cache.append(prompt.embeds[:, begin:end], positions)
        self.ids = prompt.input_ids[:end]
        return logits

    # ---- the window ---------------------------------------------------------------------------------------------
    @property
    def seen(self) -> list[tuple[float, float]]:
        return merged_spans(self.clips, self.frame_gap)

    def add(self, clip: ClipTokens) -> tuple[ClipTokens | None, float, float]:
        """Appends a clip (the oldest leaves first when the window is full) → (the clip that left or None, seconds
        spent evicting, seconds prefilling the new clip)."""
        evicted, evict_s = None, 0.0
        if len(self.clips) == self.size:
            start = time.perf_counter()
            evicted = self._evict()
            evict_s = time.perf_counter() - start
        self.clips.append(clip)
        start = time.perf_counter()
        prompt, bounds = self.layout(STAND_IN_QUESTION)
        self._extend(prompt, 0 if self.cache.length == 0 else int(bounds[-2]), int(bounds[-1]))
        self.prefix = int(bounds[0])
        self.lengths.append(int(bounds[-1] - bounds[-2]))
        return evicted, evict_s, time.perf_counter() - start

    def _truncate(self, length: int) -> None:
        self.cache.rewind(length)
        self.ids = self.ids[:length]

    def _evict(self) -> ClipTokens:
        evicted, leaving = self.clips.popleft(), self.lengths.popleft()
        kept = self.ids[self.prefix + leaving:]
        if not self.clips:
            self._truncate(self.prefix)
            return evicted
        prompt, bounds = self.layout(STAND_IN_QUESTION)
        end = int(bounds[-1])
        if not np.array_equal(prompt.input_ids[self.prefix:end], kept):
            raise RuntimeError("the kept clips' layout changed when the oldest left")
        if self.eviction == "reprefill":
            self._truncate(self.prefix)
            self._extend(prompt, self.prefix, end)
        else:
            new_positions = None if prompt.position_ids is None else prompt.position_ids[:, 0, self.prefix:end]
            self.cache.drop(self.prefix, self.prefix + leaving, self.llm.rotary, new_positions)
            self.ids = prompt.input_ids[:end]
        return evicted

    def ask(self, question: str, max_new_tokens: int = 32,
            on_token: Callable[[int], None] | None = None) -> Reply:
        """Greedy answer to `question` about the window; the cache is left as it was."""
        if not self.clips:
            raise InputError("no clip has arrived yet; ask once the stream has given one")
        start = time.perf_counter()                  # the question's layout is part of its time to first token
        prompt, bounds = self.layout(question)
        begin = int(bounds[-1])
        context = self.text.spec.context_length
        if prompt.length + max_new_tokens > context:
            raise InputError(f"the window's prompt ({prompt.length} tokens) and {max_new_tokens} new tokens exceed "
                             f"the model's context of {context}; shorten the question, --window or "
                             "--max-new-tokens")
        first = self._extend(prompt, begin, prompt.length)
        ttft = time.perf_counter() - start
        following = None if prompt.position_ids is None else int(prompt.position_ids.max()) + 1

        def step(embedding: np.ndarray) -> np.ndarray:
            nonlocal following
            positions = None
            if following is not None:
                positions, following = np.full((3, 1, 1), following, np.int64), following + 1
            return self.cache.append(embedding, positions)

        start = time.perf_counter()
        try:
            tokens, _ = greedy(step, self.text.embed_token, first, max_new_tokens, self.text.eos_token_id, None,
                               on_token)
        finally:
            self._truncate(begin)
        return Reply(question, self.text.decode(tokens), tokens, self.seen, ttft, time.perf_counter() - start,
                     prompt.length, prompt.length - begin, first)


# ---- events ----------------------------------------------------------------------------------------------------
@dataclass
class Event:
    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, **asdict(self)}


@dataclass
class ClipReduced(Event):
    kind: ClassVar[str] = "clip"
    clip: int
    start: float
    end: float
    visual_tokens: int
    seconds: dict[str, float]             # preprocess, vision + AOT, evict, prefill
    realtime_factor: float                # processing seconds / the clip's stream seconds
    window: list[tuple[float, float]]
    cached_tokens: int

    def line(self) -> str:
        spent = sum(self.seconds.values())
        return (f"[{self.start:7.1f}–{self.end:7.1f} s] clip {self.clip}: {self.visual_tokens} tokens in "
                f"{spent * 1e3:.0f} ms (real-time factor {self.realtime_factor:.2f}), window "
                f"{self.window[0][0]:.1f}–{self.window[-1][1]:.1f} s, cache {self.cached_tokens} tokens")


@dataclass
class ClipDropped(Event):
    kind: ClassVar[str] = "dropped"
    clip: int
    start: float
    end: float
    dropped: int                          # clips dropped so far

    def line(self) -> str:
        return (f"[{self.start:7.1f}–{self.end:7.1f} s] clip {self.clip} dropped: the pipeline is behind "
                f"({self.dropped} dropped so far)")


@dataclass
class ClipEvicted(Event):
    kind: ClassVar[str] = "evicted"
    clip: int
    start: float
    end: float
    eviction: str
    seconds: float

    def line(self) -> str:
        return (f"[{self.start:7.1f}–{self.end:7.1f} s] clip {self.clip} left the window "
                f"({self.eviction}, {self.seconds * 1e3:.1f} ms)")


@dataclass
class AnswerToken(Event):
    kind: ClassVar[str] = "token"
    question: int
    text: str


@dataclass
class Answer(Event):
    kind: ClassVar[str] = "answer"
    question_id: int
    question: str
    answer: str
    seen: list[tuple[float, float]]
    ttft_s: float
    decode_s: float
    prompt_tokens: int
    question_tokens: int
    generated_tokens: int

    def line(self) -> str:
        seen = ", ".join(f"{a:.1f}–{b:.1f} s" for a, b in self.seen)
        return (f"Q{self.question_id} (saw {seen}; first token {self.ttft_s * 1e3:.1f} ms, {self.question_tokens} "
                f"new of {self.prompt_tokens} prompt tokens): {self.question!r}\n  → {self.answer!r}")


@dataclass
class End(Event):
    kind: ClassVar[str] = "end"
    reason: str
    clips: int
    dropped: int
    evicted: int
    answers: int
    corrupt: int
    resized: int
    realtime_factor: dict[str, float]     # p50 / p99 / max over the clips
    clip_latency_s: dict[str, float]      # p50 / p99 / max
    peak_rss_mb: float

    def line(self) -> str:
        rtf, lat = self.realtime_factor, self.clip_latency_s
        return (f"end: {self.reason}; {self.clips} clips reduced, {self.dropped} dropped, {self.evicted} left the "
                f"window, {self.answers} answers; per clip p50 {lat.get('p50', float('nan')) * 1e3:.0f} ms / p99 "
                f"{lat.get('p99', float('nan')) * 1e3:.0f} ms, real-time factor p50 {rtf.get('p50', float('nan')):.2f}"
                f" / max {rtf.get('max', float('nan')):.2f}; peak RSS {self.peak_rss_mb:.0f} MiB")


RECENT = 10_000


def percentiles(values: Iterable[float]) -> dict[str, float]:
    values = np.asarray(list(values), np.float64)
    if not len(values):
        return {}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "max": float(values.max())}


# ---- the reader thread -----------------------------------------------------------------------------------------
class ClipFeed:
    """Clips cut from `clips` on a thread into a queue of `pending`: `drop` (a live source) makes room by dropping
    the oldest pending clip, otherwise (a file read as fast as possible) the reader waits. `stop()` ends it."""

    END = object()

    def __init__(self, clips: Iterable[Any], pending: int, drop: bool):
        self.queue: queue.Queue = queue.Queue(maxsize=pending)
        self.dropped: deque = deque(maxlen=256)        # the ones not yet reported
        self.dropped_total = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, args=(clips, drop), daemon=True, name="live-source")
        self.thread.start()

    def _read(self, clips: Iterable[Any], drop: bool) -> None:
        try:
            for clip in clips:
                if self.stopping.is_set():
                    break
                self._put(clip, drop)
        except BaseException as exc:   # handed to the consumer, which reports it
            self.error = exc
        finally:
            self._put(self.END, drop=False)

    def _put(self, item: Any, drop: bool) -> None:
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if drop and item is not self.END:
                    with self.lock:
                        try:
                            self.dropped.append(self.queue.get_nowait())
                            self.dropped_total += 1
                        except queue.Empty:
                            pass

    def take(self, timeout: float) -> Any:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def newly_dropped(self) -> list[Any]:
        with self.lock:
            items = list(self.dropped)
            self.dropped.clear()
        return items

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2.0)


@dataclass
class LiveSettings:
    """How `live_events` runs: sample rate, window, standing prompt, answer length, eviction, queue, stop."""

    fps: float = 1.0
    window_s: float = 30.0
    prompt: str | None = None             # re-asked on every new clip (Live LLaVA's mode)
    max_new_tokens: int = 32
    eviction: str = "shift"
    pending: int = 1
    drop: bool = True                     # a live source drops clips when behind; a file read flat out waits
    duration_s: float | None = None       # stop after this much stream time
    stream_tokens: bool = False           # yield AnswerToken events as tokens are chosen

    def check(self) -> None:
        if not (self.fps > 0 and np.isfinite(self.fps)):
            raise InputError(f"--fps {self.fps}: the sample rate must be a positive number of frames per second")
        if not (self.window_s > 0 and np.isfinite(self.window_s)):
            raise InputError(f"--window {self.window_s}: the window must be a positive number of seconds")
        if self.pending < 1:
            raise InputError("pending clips must be at least 1")
        if self.max_new_tokens < 1:
            raise InputError("--max-new-tokens must be at least 1")

    def window_clips(self, frames_per_call: int) -> int:
        """Clips of `frames_per_call` sampled frames the window holds (refused when not even one)."""
        clip_seconds = frames_per_call / self.fps
        clips = int(self.window_s / clip_seconds + 1e-9)
        if clips < 1:
            raise InputError(f"--window {self.window_s:g} s holds no whole clip ({frames_per_call} frames at --fps "
                             f"{self.fps:g} span {clip_seconds:g} s); raise --window or --fps")
        return clips


@dataclass
class QuestionRefused(Event):
    kind: ClassVar[str] = "refused"
    question_id: int
    question: str
    reason: str

    def line(self) -> str:
        return f"Q{self.question_id} refused: {self.reason}"


def clip_tokens(pipeline: Any, clip: Any) -> tuple[ClipTokens, dict[str, float]]:
    """One source clip (`aot_export.sources.Clip`) through the bundle's vision graph → its tokens and stage times."""
    outputs, seconds = pipeline.reduce(clip.frames)
    per_grid = len(clip.frames) // pipeline.aot_frames              # Qwen2.5-VL: 2 frames per temporal patch
    return ClipTokens(clip.index, np.asarray(outputs["tokens"], np.float32), np.asarray(outputs["index"], np.int64),
                      np.asarray(clip.seconds[::per_grid], np.float64), float(clip.start), float(clip.end)), seconds


class LiveRun:
    """`live_events`' state: the window, the feed, counters and the per-clip figures for the End event."""

    def __init__(self, pipeline: Any, settings: LiveSettings):
        self.pipeline, self.settings = pipeline, settings
        self.clip_seconds = pipeline.frames / settings.fps
        self.window = LiveWindow(pipeline.text, pipeline.llm, pipeline.aot_frames,
                                 settings.window_clips(pipeline.frames), settings.eviction,
                                 frame_gap=1.5 / settings.fps)
        # The End event's percentiles cover the last RECENT clips: nothing here grows with the stream's length.
        self.latencies: deque[float] = deque(maxlen=RECENT)
        self.factors: deque[float] = deque(maxlen=RECENT)
        self.clips = self.evicted = self.answers = self.questions = 0

    def reduce(self, clip: Any) -> Iterator[Event]:
        tokens, seconds = clip_tokens(self.pipeline, clip)
        evicted, evict_s, prefill_s = self.window.add(tokens)
        seconds = {**seconds, "evict": evict_s, "prefill": prefill_s}
        spent = sum(seconds.values())
        self.clips += 1
        self.latencies.append(spent)
        self.factors.append(spent / self.clip_seconds)
        if evicted is not None:
            self.evicted += 1
            yield ClipEvicted(evicted.clip, evicted.start, evicted.end, self.settings.eviction, evict_s)
        yield ClipReduced(tokens.clip, tokens.start, tokens.end, len(tokens.tokens), seconds, self.factors[-1],
                          self.window.seen, self.window.cache.length)

    def ask(self, question: str) -> Iterator[Event]:
        self.questions += 1
        number = self.questions
        streamed: list[Event] = []
        on_token = None
        if self.settings.stream_tokens:
            pieces = TextStream(self.window.text)

            def on_token(token: int) -> None:
                if piece := pieces.push(token):
                    streamed.append(AnswerToken(number, piece))

        try:
            reply = self.window.ask(question, self.settings.max_new_tokens, on_token)
        except InputError as exc:
            yield QuestionRefused(number, question, str(exc))
            return
        yield from streamed
        self.answers += 1
        yield Answer(number, question, reply.answer, reply.seen, reply.ttft_s, reply.decode_s, reply.prompt_tokens,
                     reply.question_tokens, len(reply.tokens))

    def end(self, reason: str, feed: ClipFeed, source: Any) -> End:
        return End(reason, self.clips, feed.dropped_total, self.evicted, self.answers,
                   getattr(source, "corrupt", 0), getattr(source, "resized", 0), percentiles(self.factors),
                   percentiles(self.latencies), peak_rss_mib())


def live_events(pipeline: Any, source: Any, settings: LiveSettings,
                questions: "queue.Queue[str] | None" = None) -> Iterator[Event]:
    """Events of a live run of `pipeline` (a `DevicePipeline`) on `source` (`aot_export.sources.open_source`; it is
    closed when the run ends): every clip reduced, dropped or evicted, every answer — to `settings.prompt` after each
    clip and to each string put in `questions` — and a closing `End`. The generator can be closed at any time."""
    from aot_export.sources import cut_clips, sample_at_rate

    settings.check()
    run = LiveRun(pipeline, settings)
    if settings.prompt is not None:
        pipeline.text.prompt_ids(settings.prompt)              # a bad standing prompt is refused before any work
    stopping = threading.Event()
    stopped_at: list[float] = []

    def clips() -> Iterator[Any]:
        try:
            frames = sample_at_rate(itertools.takewhile(lambda _: not stopping.is_set(), source), settings.fps)
            for clip in cut_clips(frames, pipeline.frames):
                if settings.duration_s is not None and clip.end >= settings.duration_s:
                    stopped_at.append(settings.duration_s)
                    return
                yield clip
        finally:
            source.close()              # on the thread that reads it: PyAV containers are not shared across threads

    feed = ClipFeed(clips(), settings.pending, settings.drop)
    try:
        while True:
            for clip in feed.newly_dropped():
                yield ClipDropped(clip.index, float(clip.start), float(clip.end), feed.dropped_total)
            while questions is not None and run.window.clips and not questions.empty():
                yield from run.ask(questions.get_nowait())
            item = feed.take(timeout=0.1)
            if item is None:
                continue
            if item is ClipFeed.END:
                break
            yield from run.reduce(item)
            if settings.prompt is not None:
                yield from run.ask(settings.prompt)
        for clip in feed.newly_dropped():
            yield ClipDropped(clip.index, float(clip.start), float(clip.end), feed.dropped_total)
        while questions is not None and run.window.clips and not questions.empty():
            yield from run.ask(questions.get_nowait())
        if feed.error is not None:
            raise feed.error
        reason = (f"stopped after {stopped_at[0]:g} s of stream (--duration)" if stopped_at
                  else getattr(source, "end_reason", None) or "end of stream")
        yield run.end(reason, feed, source)
    finally:
        stopping.set()
        feed.stop()


def stdin_questions(stream: Any = None, bound: int = 64) -> "queue.Queue[str]":
    """Questions typed on stdin (one per line, blank lines skipped) → a queue of at most `bound` waiting, filled by a
    daemon thread (a reader blocked on a terminal never holds the process)."""
    import sys

    lines = stream if stream is not None else sys.stdin.buffer
    questions: queue.Queue[str] = queue.Queue(maxsize=bound)

    def read() -> None:
        for line in lines:
            # Bytes that are not UTF-8 become U+FFFD: the question is still asked, never a crash of the reader.
            text = (line.decode("utf-8", "replace") if isinstance(line, bytes) else line).strip()
            if text:
                questions.put(text)

    threading.Thread(target=read, daemon=True, name="live-questions").start()
    return questions
