"""`aot-export serve --ray`: the OpenAI-compatible app on a local Ray Serve cluster, two replicas on this CPU, asked by
the official `openai` client (the [ray] extra and the test extra's `openai`)."""

import base64
import os
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from aot_export.video import synthesize_clip
from runtime.device.serve import free_port

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is happening in this video?"
START_S = 120           # a 2-replica cluster starts in 15–30 s on this 2-core box, shared


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (the Ray cluster's GCS, raylet, workers and replicas)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone_within(pids: set[int], seconds: float) -> set[int]:
    """Those of `pids` still running after `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := {pid for pid in pids if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def end(process: subprocess.Popen, cluster: set[int]) -> None:
    """A run that failed half-way leaves nothing behind: SIGTERM (Serve and Ray shut down), and only if that hangs
    SIGKILL, then the cluster's own processes by id (Ray's agents outlive a killed driver)."""
    cluster = cluster | descendants(process.pid)
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    for pid in gone_within(cluster, 10):
        os.kill(pid, signal.SIGKILL)


def ready_line(process: subprocess.Popen, timeout: float) -> str:
    """The server's `serving …` line; the test fails with the server's stderr if none comes in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if select.select([process.stdout], [], [], 1.0)[0]:
            return process.stdout.readline()
    end(process, set())                     # its stderr ends only when it has stopped
    pytest.fail(f"no `serving` line within {timeout} s: {process.stderr.read()[-2000:]}")


def message(video_url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                         {"type": "video_url", "video_url": {"url": video_url}}]}]


@pytest.mark.heavy
def test_two_ray_replicas_answer_the_openai_client_and_share_the_requests(tiny_bundle, tmp_path):
    import openai

    videos = tmp_path / "videos"
    videos.mkdir()
    clip = synthesize_clip(videos / "clip.mp4", frames=24, size=96)
    data_url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    port = free_port()
    started = time.monotonic()
    cluster: set[int] = set()
    process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--model", str(tiny_bundle), "--ray",
                                "--replicas", "2", "--cpus-per-replica", "0.5", "--port", str(port),
                                "--allow-path", str(videos)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = ready_line(process, START_S)
        assert f"http://127.0.0.1:{port}/v1" in line and "2 Ray Serve replicas" in line, line
        start_s = time.monotonic() - started
        cluster = descendants(process.pid)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(video_url: str) -> tuple[str, str]:
            raw = client.chat.completions.with_raw_response.create(model="tiny-llava-ov", messages=message(video_url),
                                                                   max_tokens=6)
            return raw.headers["x-aot-replica"], raw.parse().choices[0].message.content

        with ThreadPoolExecutor(4) as pool:          # concurrent, so the router has a choice to make
            answers = list(pool.map(ask, [str(clip), data_url] * 4))
        raw = client.chat.completions.with_raw_response.create(model="tiny-llava-ov", messages=message(data_url),
                                                               max_tokens=6, stream=True)
        streamed = [chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices]

        replicas = {int(replica) for replica, _ in answers} | {int(raw.headers["x-aot-replica"])}
        assert len(replicas) == 2 and replicas <= cluster, (replicas, "not two processes of this cluster")
        assert len({text for _, text in answers}) == 1 and answers[0][1]        # one model, greedy: one answer
        assert len(streamed) > 2 and "".join(streamed) == answers[0][1]      # token by token, the same text

        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
        left = gone_within(cluster, 30)
    finally:
        end(process, cluster)
    assert process.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    assert not left, f"the cluster left processes behind: {left}"
    print(f"2 replicas ready in {start_s:.0f} s; torn down")


@pytest.mark.heavy
def test_ray_refuses_replicas_the_machine_cannot_hold(tiny_bundle):
    """Ray would wait forever to place them; the launcher says so in one line instead."""
    cpus = os.cpu_count() or 1
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "serve", "--model", str(tiny_bundle), "--ray",
                           "--replicas", str(cpus + 1), "--cpus-per-replica", "1", "--port", str(free_port())],
                          capture_output=True, text=True, cwd=ROOT, timeout=START_S)
    assert done.returncode == 2 and "--cpus-per-replica" in done.stderr.strip().splitlines()[-1], done.stderr
    assert "Traceback" not in done.stderr
