"""An OpenAI-compatible video endpoint over one device pipeline: `/v1/chat/completions` (streamed as server-sent
events or not), `/v1/models`, `/health` — what vLLM, llama.cpp's server and Jetson Platform Services expose, so the
official `openai` client talks to a bundle unchanged. FastAPI + uvicorn come with the `[serve]` extra.

- One `DevicePipeline` per process; inferences run one at a time on one worker thread (its ONNX Runtime sessions
  and KV cache are never shared by two requests). At most `max_queue` requests wait; beyond that 429 with
  Retry-After. A client that disconnects cancels its generation at the next token.
- A request holds one user message: its text parts and one `video_url` part — a path under an `--allow-path` root
  (no `..`, no symlink out), a `data:video/...;base64,` URL, or an http(s) URL where `--allow-remote` is given (size and
  time limited). `media_io_kwargs: {"video": {"num_frames": N, "fps": F}}` as vLLM names them: the frame count must be
  the bundle's; `fps` samples the start of the video at that rate instead of uniformly over all of it.
- Every error is an OpenAI error object (`{"error": {"message", "type", "param", "code"}}`), one line; no traceback
  reaches a client. `usage` adds the visual tokens before and after AOT.
"""


import asyncio
import base64
import binascii
import hmac
import json
import math
import os
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from aot_export.errors import InputError

from .text import TextStream

DEFAULT_HOST = "127.0.0.1"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """How the server admits and reads requests; validated by `check`."""

    host: str = DEFAULT_HOST
    port: int = 8000
    api_key: str | None = None
    allow_paths: tuple[Path, ...] = ()
    allow_remote: bool = False
    max_queue: int = 8
    max_body_bytes: int = 64 << 20
    max_video_bytes: int = 48 << 20          # a data URL's or a remote video's decoded bytes
    remote_timeout_s: float = 10.0
    max_tokens: int = 256                    # the most a request may ask for
    model_name: str | None = None            # the id /v1/models lists (default: the bundle's model id)

    def check(self) -> None:
        if self.host not in LOOPBACK and not self.api_key:
            raise InputError(f"--host {self.host} would serve beyond this machine without a key; pass --api-key "
                             "(clients then send it as a Bearer token), or keep the default 127.0.0.1")
        if not 0 <= self.port < 65536:
            raise InputError(f"--port {self.port}: choose 0–65535")
        for root in self.allow_paths:
            if not Path(root).is_dir():
                raise InputError(f"--allow-path {root}: no such directory; pass a directory videos may be read from")
        if self.max_queue < 1 or self.max_tokens < 1:
            raise InputError("--max-queue and --max-tokens must be at least 1")


class ApiError(Exception):
    """An OpenAI-style error answer: HTTP `status`, one-line `message`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- the request ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatRequest:
    prompt: str
    video_url: str
    stream: bool
    max_tokens: int
    num_frames: int | None
    fps: float | None
    include_usage: bool


def _expect(condition: bool, message: str, param: str | None = None) -> None:
    if not condition:
        raise ApiError(400, message, param=param)


def parse_request(body: Any, model_ids: tuple[str, ...], settings: ServeSettings) -> ChatRequest:
    """An OpenAI chat-completions body → what the pipeline needs, or ApiError naming the first problem."""
    _expect(isinstance(body, dict), "the body must be a JSON object")
    model = body.get("model")
    _expect(isinstance(model, str), "`model` must be a string", "model")
    if model not in model_ids:
        raise ApiError(404, f"the model `{model}` does not exist here; GET /v1/models lists {', '.join(model_ids)}",
                       param="model", code="model_not_found")
    messages = body.get("messages")
    _expect(isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict)
            and messages[0].get("role") == "user",
            "`messages` must hold exactly one user message (the bundle's chat template takes one turn about one "
            "video)", "messages")
    content = messages[0].get("content")
    _expect(isinstance(content, list), "the user message's `content` must be a list of parts: text and one "
                                       "video_url", "messages[0].content")
    texts, videos = [], []
    for part in content:
        _expect(isinstance(part, dict) and part.get("type") in ("text", "video_url"),
                "each content part must be {\"type\": \"text\"} or {\"type\": \"video_url\"}", "messages[0].content")
        if part["type"] == "text":
            _expect(isinstance(part.get("text"), str), "a text part needs a string `text`", "messages[0].content")
            texts.append(part["text"])
        else:
            url = part.get("video_url")
            url = url.get("url") if isinstance(url, dict) else None
            _expect(isinstance(url, str) and url, "a video_url part needs {\"url\": \"...\"}", "messages[0].content")
            videos.append(url)
    _expect(len(videos) == 1, f"the message holds {len(videos)} videos; send exactly one video_url part",
            "messages[0].content")
    prompt = "\n".join(texts)
    _expect(prompt.strip() != "", "the message has no text; add a text part with the question", "messages[0].content")
    stream = body.get("stream", False)
    _expect(isinstance(stream, bool), "`stream` must be true or false", "stream")
    limit = body.get("max_completion_tokens", body.get("max_tokens", 64))
    _expect(isinstance(limit, int) and not isinstance(limit, bool) and 1 <= limit <= settings.max_tokens,
            f"`max_tokens` must be a whole number from 1 to {settings.max_tokens}", "max_tokens")
    media = body.get("media_io_kwargs", {})
    video = media.get("video", {}) if isinstance(media, dict) else None
    _expect(isinstance(video, dict), "`media_io_kwargs` must be {\"video\": {\"num_frames\": N, \"fps\": F}}",
            "media_io_kwargs")
    num_frames, fps = video.get("num_frames"), video.get("fps")
    _expect(num_frames is None or (isinstance(num_frames, int) and not isinstance(num_frames, bool)),
            "`num_frames` must be a whole number", "media_io_kwargs")
    _expect(fps is None or (isinstance(fps, (int, float)) and not isinstance(fps, bool) and 0 < fps <= 240),
            "`fps` must be a number in (0, 240]", "media_io_kwargs")
    options = body.get("stream_options") or {}
    _expect(isinstance(options, dict), "`stream_options` must be an object", "stream_options")
    return ChatRequest(prompt, videos[0], stream, limit, num_frames, None if fps is None else float(fps),
                       bool(options.get("include_usage", False)))


# ---- the video -------------------------------------------------------------------------------------------------
def confined_path(path: str, roots: tuple[Path, ...]) -> Path:
    """`path` (a plain path or a file:// URL) resolved, if it lies under one of `roots` after every symlink."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not roots:
        raise ApiError(400, "this server reads no local files (start it with --allow-path DIR); send a data: URL",
                       param="video_url")
    candidate = Path(path)
    if ".." in candidate.parts:
        raise ApiError(400, f"{path}: `..` is not allowed in a video path", param="video_url")
    for root in roots:
        resolved_root = Path(root).resolve()
        resolved = (resolved_root / candidate).resolve() if not candidate.is_absolute() else candidate.resolve()
        if resolved.is_relative_to(resolved_root):
            if not resolved.is_file():
                raise ApiError(400, f"{path}: no such video file under the allowed directories", param="video_url")
            return resolved
    raise ApiError(403, f"{path}: outside the allowed directories (or a link leading out of them)",
                   kind="permission_error", param="video_url")


def data_url_video(url: str, limit: int, directory: Path) -> Path:
    """A `data:video/...;base64,` URL decoded to a file in `directory`."""
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not payload:
        raise ApiError(400, "a data URL must be data:video/<type>;base64,<bytes>", param="video_url")
    if len(payload) * 3 // 4 > limit:
        raise ApiError(413, f"the video is over {limit >> 20} MiB; send a shorter or smaller one",
                       param="video_url")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the data URL's payload is not valid base64", param="video_url") from None
    path = directory / "video"
    path.write_bytes(data)
    return path


def remote_video(url: str, settings: ServeSettings, directory: Path) -> Path:
    """An http(s) video fetched within the size and time limits."""
    import urllib.error
    import urllib.request

    if not settings.allow_remote:
        raise ApiError(400, "this server fetches no remote videos (start it with --allow-remote); send a data: URL "
                            "or a path under --allow-path", param="video_url")
    deadline = time.monotonic() + settings.remote_timeout_s
    path = directory / "video"
    try:
        with urllib.request.urlopen(url, timeout=settings.remote_timeout_s) as response, path.open("wb") as out:
            size = 0
            while chunk := response.read(1 << 16):
                size += len(chunk)
                if size > settings.max_video_bytes:
                    raise ApiError(413, f"{url}: over {settings.max_video_bytes >> 20} MiB", param="video_url")
                if time.monotonic() > deadline:
                    raise ApiError(408, f"{url}: not fetched within {settings.remote_timeout_s:g} s",
                                   param="video_url")
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc.__class__.__name__
        raise ApiError(400, f"{url}: cannot be fetched ({reason})", param="video_url") from None
    return path


def fetch_video(url: str, settings: ServeSettings, directory: Path) -> Path:
    if url.startswith("data:"):
        return data_url_video(url, settings.max_video_bytes, directory)
    if url.startswith(("http://", "https://")):
        return remote_video(url, settings, directory)
    if "://" in url and not url.startswith("file://"):
        raise ApiError(400, f"{url.split('://')[0]}:// videos are not served; send a data: URL, an http(s) URL or a "
                            "path", param="video_url")
    return confined_path(url, settings.allow_paths)


# ---- the engine: one pipeline, one inference at a time ------------------------------------------------------------
class Cancelled(Exception):
    """The client went away: the generation stops at its next token."""


@dataclass
class Completion:
    text: str
    tokens: int
    prompt_tokens: int
    visual_tokens: int
    finish_reason: str


@dataclass
class Engine:
    pipeline: Any
    settings: ServeSettings
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="infer"))
    admitted: int = 0
    cancelled: int = 0                     # generations stopped because their client went away
    seconds_per_request: float = 1.0       # a running mean of the answers' times (Retry-After's estimate)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self) -> None:
        """One more request, or 429 when `max_queue` already wait (the one running included), with Retry-After the
        seconds the queue ahead takes to drain (a fixed 1 s sent clients back before a slot could have freed)."""
        with self.lock:
            if self.admitted >= self.settings.max_queue + 1:
                drain = max(1, math.ceil(self.admitted * self.seconds_per_request))
                raise ApiError(429, f"{self.admitted} requests are already queued; retry in {drain} s",
                               kind="rate_limit_error", code="queue_full", headers={"Retry-After": str(drain)})
            self.admitted += 1

    def timed(self, seconds: float) -> None:
        with self.lock:
            self.seconds_per_request = 0.8 * self.seconds_per_request + 0.2 * seconds

    def release(self) -> None:
        with self.lock:
            self.admitted -= 1

    def frames(self, video: Path, request: ChatRequest) -> np.ndarray:
        from aot_export.video import decode_frames

        wanted = self.pipeline.frames
        if request.num_frames is not None and request.num_frames != wanted:
            raise ApiError(400, f"num_frames {request.num_frames}: this bundle's vision graph takes {wanted} frames",
                           param="media_io_kwargs")
        if request.fps is None:
            return decode_frames(video, wanted)
        from aot_export.sources import open_source, sample_at_rate

        with open_source(str(video)) as source:
            picked = [f.image for f, _ in zip(sample_at_rate(source, request.fps), range(wanted))]
        if not picked:
            raise InputError(f"{video}: contains no frames")
        picked += [picked[-1]] * (wanted - len(picked))         # a short video repeats its last frame, as a file does
        return np.stack(picked)

    def answer(self, request: ChatRequest, on_text: Callable[[str], None] | None,
               cancelled: threading.Event) -> Completion:
        """Runs on the worker thread: video → vision + AOT → prompt → greedy tokens (`on_text` gets each new
        piece of text)."""
        started = time.perf_counter()
        text = self.pipeline.text
        text.prompt_ids(request.prompt)                   # a bad prompt is refused before the video is decoded
        with tempfile.TemporaryDirectory(prefix="aot-serve-") as work:
            video = fetch_video(request.video_url, self.settings, Path(work))
            try:
                frames = self.frames(video, request)
            except InputError:
                # The decoder's message names the server's own path; the client is told of its own URL.
                shown = "the data: URL's video" if request.video_url.startswith("data:") else request.video_url[:200]
                raise ApiError(400, f"{shown}: cannot be decoded as a video; send an mp4, mkv or webm file",
                               param="video_url") from None
        outputs, _ = self.pipeline.reduce(frames)
        prompt = self.pipeline.assemble(request.prompt, outputs)
        if prompt.length + request.max_tokens > text.spec.context_length:
            raise ApiError(400, f"the prompt ({prompt.length} tokens) and max_tokens {request.max_tokens} exceed the "
                                f"model's context of {text.spec.context_length}", param="max_tokens")
        pieces = TextStream(text) if on_text is not None else None

        def on_token(token: int) -> None:
            if cancelled.is_set():
                with self.lock:
                    self.cancelled += 1
                raise Cancelled()
            if pieces is not None and (piece := pieces.push(token)):
                on_text(piece)

        generation = self.pipeline.generate(prompt, request.max_tokens, on_token=on_token)
        self.timed(time.perf_counter() - started)
        ended = generation.tokens and generation.tokens[-1] == text.eos_token_id
        return Completion(text.decode(generation.tokens), len(generation.tokens), prompt.length,
                          prompt.visual_tokens, "stop" if ended else "length")


def usage(engine: Engine, completion: Completion) -> dict[str, Any]:
    cfg = engine.pipeline.bundle.export_manifest.aot
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.tokens,
            "total_tokens": completion.prompt_tokens + completion.tokens,
            "visual_tokens_before_aot": cfg.input_tokens, "visual_tokens_after_aot": cfg.output_tokens}


# ---- the app ----------------------------------------------------------------------------------------------------
REPLICA_HEADER = b"x-aot-replica"


class ReplicaHeader:
    """ASGI middleware: every response names the process that answered it (`x-aot-replica: <pid>`), so how requests
    spread over Ray Serve replicas can be checked. Plain ASGI, not a `BaseHTTPMiddleware`: it sees only the response's
    start, never wraps its body, so streamed answers and disconnects pass through unchanged."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (REPLICA_HEADER, str(os.getpid()).encode())]
            await send(message)

        await self.app(scope, receive, send_named)


def create_app(pipeline: Any, settings: ServeSettings) -> Any:
    """The FastAPI app serving `pipeline` (a `DevicePipeline`)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    settings.check()
    engine = Engine(pipeline, settings)
    model_id = settings.model_name or pipeline.bundle.data["model"]["model_id"]
    app = FastAPI(title="aot-export", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(ReplicaHeader)               # outermost: error answers are named too

    def error_response(error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """API key, body size, and the last line of defence: no traceback ever reaches a client."""
        try:
            if settings.api_key is not None and request.url.path != "/health":
                given = request.headers.get("authorization", "")
                expected = f"Bearer {settings.api_key}"
                if not hmac.compare_digest(given.encode(), expected.encode()):
                    raise ApiError(401, "missing or wrong API key; send it as `Authorization: Bearer KEY`",
                                   kind="authentication_error", code="invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
                raise ApiError(413, f"the body is over {settings.max_body_bytes >> 20} MiB", code="body_too_large")
            return await call_next(request)
        except ApiError as error:
            return error_response(error)
        except Exception:  # noqa: BLE001 - logged here, never sent
            import logging

            logging.getLogger("aot_export.serve").exception("request failed")
            return error_response(ApiError(500, "internal error", kind="server_error"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": engine.admitted, "cancelled": engine.cancelled}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "aot-export"}]}

    async def read_body(request: Request) -> Any:
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise ApiError(413, f"the body is over {settings.max_body_bytes >> 20} MiB", code="body_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            chat_request = parse_request(await read_body(request), (model_id,), settings)
            engine.admit()
        except ApiError as error:
            return error_response(error)
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()
        identifier, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def run(on_text=None) -> Completion:
            try:
                return engine.answer(chat_request, on_text, cancelled)
            except InputError as exc:
                raise ApiError(400, str(exc).splitlines()[0], param="video_url") from None

        if not chat_request.stream:
            try:
                job = loop.run_in_executor(engine.worker, run)
                while not (await asyncio.wait({job}, timeout=0.25))[0]:
                    if await request.is_disconnected():
                        cancelled.set()             # the answer would reach no one: stop at the next token
                completion = await job
            except ApiError as error:
                return error_response(error)
            except Cancelled:
                return error_response(ApiError(499, "the client closed the request", code="client_closed"))
            finally:
                engine.release()
            return {"id": identifier, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                                 "finish_reason": completion.finish_reason}],
                    "usage": usage(engine, completion)}

        pieces: asyncio.Queue = asyncio.Queue()

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            body = {"id": identifier, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        future = loop.run_in_executor(engine.worker, run,
                                      lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))

        def finished(done: asyncio.Future) -> None:
            if not done.cancelled():
                done.exception()               # read here, so a cancelled generation is never reported as unhandled
            pieces.put_nowait(None)

        future.add_done_callback(finished)

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (piece := await pieces.get()) is not None:
                    yield chunk({"content": piece})
                try:
                    completion = future.result()
                except ApiError as error:
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
                except Cancelled:
                    return
                yield chunk({}, completion.finish_reason)
                if chat_request.include_usage:
                    body = {"id": identifier, "object": "chat.completion.chunk", "created": created,
                            "model": model_id, "choices": [], "usage": usage(engine, completion)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()                 # a client gone mid-answer stops the generation at its next token
                engine.release()

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception):
        return error_response(ApiError(404, f"no such endpoint: {request.method} {request.url.path}",
                                       code="not_found"))

    @app.exception_handler(405)
    async def wrong_method(request: Request, exc: Exception):
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                                       code="method_not_allowed"))

    return app


def serve(pipeline: Any, settings: ServeSettings, on_ready: Callable[[str], None] | None = None) -> None:
    """Runs the app with uvicorn until SIGINT / SIGTERM."""
    import uvicorn

    app = create_app(pipeline, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    if on_ready is not None:
        on_ready(f"http://{settings.host}:{settings.port}/v1")
    server.run()


def free_port() -> int:
    """A free loopback port (tests and benchmarks)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

