"""`aot-export serve` (runtime/device/serve.py) on the tiny bundle, through the official `openai` client and raw
HTTP: answers streamed and not, from a path under --allow-path, a data: URL and a local http URL; usage with the
visual tokens before and after AOT; every bad input an OpenAI error object while the server keeps serving; the queue
bound (429 + Retry-After), a client that disconnects cancelling its generation, and the API key."""

import base64
import http.client
import http.server
import json
import os
import threading
import time
import urllib.request

import pytest

from aot_export.video import synthesize_clip
from runtime.device.pipeline import DevicePipeline

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from runtime.device.serve import ServeSettings, create_app, free_port  # noqa: E402

QUESTION = "What is happening in this video?"


class Running:
    """The app on a uvicorn server in a thread, on a free loopback port."""

    def __init__(self, pipeline, settings: ServeSettings):
        settings = ServeSettings(**{**settings.__dict__, "port": free_port()})
        self.app = create_app(pipeline, settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=settings.port,
                                                   log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{settings.port}"
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def post(self, body: bytes, headers=None):
        """(status, lower-cased headers, parsed JSON) of a raw POST to /v1/chat/completions. A server that refuses
        a body by its length answers before reading it, so a send cut short is expected and the answer still read."""
        host, port = self.url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.putrequest("POST", "/v1/chat/completions")
            for name, value in {"content-type": "application/json", "content-length": str(len(body)),
                                **(headers or {})}.items():
                connection.putheader(name, value)
            connection.endheaders()
            try:
                connection.send(body)
            except (BrokenPipeError, ConnectionResetError):
                pass
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(response.read())
        finally:
            connection.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    clip = synthesize_clip(root / "clip.mp4", frames=24, size=96)
    (root / "notes.txt").write_text("not a video")
    os.symlink("/etc/passwd", root / "escape.mp4")
    return root


@pytest.fixture(scope="module")
def pipeline(tiny_bundle):
    with DevicePipeline(tiny_bundle) as pipeline:
        yield pipeline


@pytest.fixture(scope="module")
def server(pipeline, media):
    running = Running(pipeline, ServeSettings(allow_paths=(media,), allow_remote=True, remote_timeout_s=3.0,
                                              max_body_bytes=8 << 20, max_video_bytes=4 << 20))
    yield running
    running.stop()


def message(video_url: str, text: str = QUESTION):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                          {"type": "text", "text": text}]}]


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-llava-ov"]
    with urllib.request.urlopen(server.url + "/health") as response:
        assert json.loads(response.read())["status"] == "ok"


def test_answer_from_a_path_under_the_allowed_root(server, pipeline, media):
    reply = server.client().chat.completions.create(model="tiny-llava-ov", messages=message(str(media / "clip.mp4")),
                                                    max_tokens=6)
    # The same answer as the device pipeline run directly on the same file.
    direct = pipeline.answer(media / "clip.mp4", QUESTION, 6)
    assert reply.choices[0].message.content == direct.answer
    assert reply.usage.completion_tokens == direct.generated_tokens and reply.usage.prompt_tokens == direct.prompt_tokens
    cfg = pipeline.bundle.export_manifest.aot
    assert reply.usage.model_extra == {"visual_tokens_before_aot": cfg.input_tokens,
                                       "visual_tokens_after_aot": cfg.output_tokens}


def test_streamed_answer_from_a_data_url(server, pipeline, media):
    data = base64.b64encode((media / "clip.mp4").read_bytes()).decode()
    stream = server.client().chat.completions.create(model="tiny-llava-ov",
                                                     messages=message(f"data:video/mp4;base64,{data}"),
                                                     max_tokens=6, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == pipeline.answer(media / "clip.mp4", QUESTION, 6).answer
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_answer_from_a_local_http_url(server, pipeline, media):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = lambda *a, **kw: Quiet(*a, directory=str(media), **kw)                  # noqa: E731
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{files.server_address[1]}/clip.mp4"
        reply = server.client().chat.completions.create(model="tiny-llava-ov", messages=message(url), max_tokens=4)
        files.shutdown()
    assert reply.choices[0].message.content == pipeline.answer(media / "clip.mp4", QUESTION, 4).answer


def closed_port() -> int:
    return free_port()


BAD = {
    "malformed JSON": (b"{\"model\": ", 400, "not valid JSON"),
    "wrong types": (json.dumps({"model": "tiny-llava-ov", "messages": "hi"}).encode(), 400, "messages"),
    "unknown model": (json.dumps({"model": "gpt-9", "messages": []}).encode(), 404, "does not exist"),
    "no video": (json.dumps({"model": "tiny-llava-ov", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}]}]}).encode(), 400, "0 videos"),
    "max_tokens out of range": (json.dumps({"model": "tiny-llava-ov", "messages": message("clip.mp4"),
                                            "max_tokens": 10 ** 6}).encode(), 400, "max_tokens"),
    "a file that is not a video": (json.dumps({"model": "tiny-llava-ov", "messages": message("notes.txt")}).encode(),
                                   400, "notes.txt"),
    "an enormous prompt": (json.dumps({"model": "tiny-llava-ov",
                                       "messages": message("clip.mp4", "word " * 60000)}).encode(), 400, "context"),
    "file:///etc/passwd": (json.dumps({"model": "tiny-llava-ov", "messages": message("file:///etc/passwd")}).encode(),
                           403, "outside the allowed"),
    "../ path": (json.dumps({"model": "tiny-llava-ov", "messages": message("../../etc/passwd")}).encode(), 400, "`..`"),
    "a symlink out of the root": (json.dumps({"model": "tiny-llava-ov", "messages": message("escape.mp4")}).encode(),
                                  403, "outside the allowed"),
    "a URL to a closed port": (json.dumps({"model": "tiny-llava-ov",
                                           "messages": message(f"http://127.0.0.1:{closed_port()}/v.mp4")}).encode(),
                               400, "cannot be fetched"),
    "a 100 MB body": (b"{\"model\": \"" + b"x" * (100 << 20) + b"\"}", 413, "over 8 MiB"),
    "a data URL over the video limit": (json.dumps({"model": "tiny-llava-ov", "messages": message(
        "data:video/mp4;base64," + "A" * (6 << 20))}).encode(), 413, "over 4 MiB"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_an_openai_error_and_the_server_keeps_serving(server, media, case):
    body, status, words = BAD[case]
    code, _, answer = server.post(body)
    assert code == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"], error
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    assert str(media) not in error["message"]                     # the server's own paths are never told
    with urllib.request.urlopen(server.url + "/health") as response:
        assert json.loads(response.read())["queued"] == 0


def test_openai_client_sees_error_objects(server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().chat.completions.create(model="gpt-9", messages=message("clip.mp4"))
    with pytest.raises(openai.PermissionDeniedError, match="outside the allowed"):
        server.client().chat.completions.create(model="tiny-llava-ov", messages=message("/etc/passwd"))


def test_a_client_that_disconnects_cancels_its_generation(server, media):
    body = json.dumps({"model": "tiny-llava-ov", "messages": message(str(media / "clip.mp4")), "stream": True,
                       "max_tokens": 256}).encode()
    before = json.loads(urllib.request.urlopen(server.url + "/health").read())["cancelled"]
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        response.readline()                                  # the first event: the answer has started
    deadline = time.monotonic() + 10
    while json.loads(urllib.request.urlopen(server.url + "/health").read())["cancelled"] == before:
        assert time.monotonic() < deadline, "the generation ran on after its client left"
        time.sleep(0.05)
    health = json.loads(urllib.request.urlopen(server.url + "/health").read())
    assert health["queued"] == 0


def test_requests_beyond_the_queue_get_429_with_retry_after(pipeline, media):
    running = Running(pipeline, ServeSettings(allow_paths=(media,), max_queue=1))
    body = json.dumps({"model": "tiny-llava-ov", "messages": message("clip.mp4"), "max_tokens": 64}).encode()
    results = []
    threads = [threading.Thread(target=lambda: results.append(running.post(body))) for _ in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        running.stop()
    codes = sorted(code for code, _, _ in results)
    assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}, codes
    refused = next(r for r in results if r[0] == 429)
    assert int(refused[1]["retry-after"]) >= 1 and refused[2]["error"]["type"] == "rate_limit_error"


def test_api_key(pipeline, media):
    running = Running(pipeline, ServeSettings(allow_paths=(media,), api_key="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").models.list()
        assert [m.id for m in running.client(api_key="s3cret").models.list().data] == ["tiny-llava-ov"]
    finally:
        running.stop()


def test_binding_beyond_loopback_needs_a_key(tiny_bundle, capsys):
    from runtime.cli import EXIT_BAD_INPUT, main

    code = main(["serve", "--model", str(tiny_bundle), "--host", "0.0.0.0"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_BAD_INPUT and len(err.splitlines()) == 1 and "--api-key" in err


def test_api_key_file_is_read_or_refused_in_one_line(tiny_bundle, tmp_path, capsys):
    from runtime.cli import EXIT_BAD_INPUT, _read_text, main

    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert _read_text(str(key)).strip() == "s3cret"
    for content, words in [(None, "cannot be read"), (b" \n", "is empty"), (b"\xff\xfe", "not UTF-8"),
                           (b"k" * 70000, "larger than")]:
        if content is None:
            key.unlink(missing_ok=True)
        else:
            key.write_bytes(content)
        code = main(["serve", "--model", str(tiny_bundle), "--api-key-file", str(key)])
        err = capsys.readouterr().err.strip()
        assert code == EXIT_BAD_INPUT and len(err.splitlines()) == 1, err
        assert "--api-key-file" in err and words in err, err
