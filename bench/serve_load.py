"""Load benchmark of `aot-export serve` (issue #20): the official `openai` client, 1, 4 and 16 concurrent clients,
against plain servers (one pipeline, one process) and against Ray Serve replicas; then a soak of 1,000 requests
against the first plain server with its RSS read every 100 requests (drift: request 100 to the last).

Every load request is streamed (TTFT: the first chunk with text; latency: the last chunk), asks about a short
synthetic clip by path under --allow-path, and wants --max-tokens tokens. The soak cycles streamed / not, path /
data: URL. A server's queue holds --max-queue requests (16 by default: 16 clients never find it full on one
replica); beyond it the server answers 429 with Retry-After, which the `openai` client honours with at most
--retries retries. 429s are counted as they arrive (a hook on the client's HTTP client); errors are requests that
failed for good. The box may be shared: each row records the load average.

The servers are `python -m runtime.cli serve` processes on loopback, stopped with SIGINT. docs/benchmarks.md,
"Serving", has the figures.

    python bench/serve_load.py [--bundle B] [--clients 1 4 16] [--requests 48] [--plain-threads 0 1] \
        [--ray-replicas 2] [--soak 1000] --json out.json
"""

from __future__ import annotations

import argparse
import base64
import itertools
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aot_export.report import format_table, write_json  # noqa: E402
from aot_export.video import synthesize_clip  # noqa: E402
from runtime.device.serve import free_port  # noqa: E402

PROMPT = "What is happening in this video?"
START_S = 180


def tiny_bundle(work: Path) -> Path:
    """The tiny model's 8-frame export and int4 ONNX LLM, bundled (what the test suite serves)."""
    from aot_export import AOTConfig
    from aot_export.adapters import load_model
    from aot_export.export import export_vision_aot
    from runtime.bundle import write_bundle
    from runtime.llm import build_onnx_decoder

    tiny = load_model("tiny-llava-ov")
    export = export_vision_aot(tiny, AOTConfig(frames=8, sinkhorn="fixed"), work / "export", progress=False).directory
    return write_bundle(export, build_onnx_decoder(tiny, work / "llm", progress=False), work / "bundle", adapter=tiny)


# ---- the server ------------------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    process: subprocess.Popen
    url: str
    started_s: float

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as status:
            return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.communicate(timeout=60)
        finally:
            self.process.kill()
        return self.process.returncode


def start_server(name: str, bundle: Path, videos: Path, args: argparse.Namespace, ray_replicas: int = 0,
                 threads: int = 0) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "runtime.cli", "serve", "--model", str(bundle), "--port", str(port),
               "--allow-path", str(videos), "--max-queue", str(args.max_queue), "--max-tokens", str(args.max_tokens)]
    if threads:
        command += ["--threads", str(threads)]
    if ray_replicas:
        command += ["--ray", "--replicas", str(ray_replicas), "--cpus-per-replica", str(args.cpus_per_replica)]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = started + START_S
    while time.monotonic() < deadline and process.poll() is None:
        if select.select([process.stdout], [], [], 1.0)[0]:
            line = process.stdout.readline()
            if line.startswith("serving"):
                return Server(name, process, f"http://127.0.0.1:{port}/v1", time.monotonic() - started)
    process.kill()
    raise SystemExit(f"{name}: no `serving` line within {START_S} s: {process.stderr.read()[-2000:]}")


# ---- the clients -----------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """Requests' timings, 429s seen (retried by the client) and failures, from every client thread."""

    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    replicas: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_429(self, response) -> None:
        if response.status_code == 429:
            with self.lock:
                self.rejected += 1


def client(url: str, tally: Tally, retries: int):
    import openai

    http = openai.DefaultHttpxClient(event_hooks={"response": [tally.count_429]}, timeout=120)
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=retries, http_client=http)


def ask(api, tally: Tally, video_url: str, max_tokens: int, stream: bool) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                             {"type": "video_url", "video_url": {"url": video_url}}]}]
    start = time.perf_counter()
    first = None
    try:
        raw = api.chat.completions.with_raw_response.create(model="tiny-llava-ov", messages=messages,
                                                            max_tokens=max_tokens, stream=stream)
        if stream:
            for chunk in raw.parse():
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
        else:
            raw.parse()
    except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
        with tally.lock:
            tally.errors.append(f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:160]}")
        return
    with tally.lock:
        tally.latency.append(time.perf_counter() - start)
        if first is not None:
            tally.ttft.append(first)
        replica = raw.headers.get("x-aot-replica", "?")
        tally.replicas[replica] = tally.replicas.get(replica, 0) + 1


def ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


def load(server: Server, clients: int, requests: int, clip: Path, args: argparse.Namespace) -> dict:
    """`requests` streamed requests shared by `clients` threads, each waiting for its answer before asking again."""
    tally = Tally()
    api = client(server.url, tally, args.retries)
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

    def run(count: int) -> None:
        for _ in range(count):
            ask(api, tally, str(clip), args.max_tokens, stream=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, per_client))
    wall = time.perf_counter() - start
    alive = server.process.poll() is None
    return {"server": server.name, "clients": clients, "requests": requests, "wall_s": round(wall, 2),
            "rps": round(len(tally.latency) / wall, 2), "p50_ms": ms(tally.latency, 50),
            "p99_ms": ms(tally.latency, 99),
            "ttft_p50_ms": ms(tally.ttft, 50), "ttft_p99_ms": ms(tally.ttft, 99), "rejected_429": tally.rejected,
            "errors": len(tally.errors), "error_samples": tally.errors[:3], "replicas": tally.replicas,
            "server_alive": alive, "load_average": round(os.getloadavg()[0], 1)}   # the box is shared: say how


def soak(server: Server, requests: int, clip: Path, args: argparse.Namespace) -> dict:
    """`requests` requests from 4 clients cycling streamed / not and path / data URL; RSS every 100 answered."""
    tally = Tally()
    api = client(server.url, tally, args.retries)
    data_url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    kinds = itertools.cycle([(str(clip), True), (data_url, False), (str(clip), False), (data_url, True)])
    next_kind = threading.Lock()
    rss: dict[int, float] = {}
    done = itertools.count(1)

    def one(_: int) -> None:
        with next_kind:
            video_url, stream = next(kinds)
        ask(api, tally, video_url, args.max_tokens, stream)
        finished = next(done)
        if finished % 100 == 0:
            rss[finished] = round(server.rss_mib(), 1)

    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    first, last = rss.get(100), rss.get(requests) or rss[max(rss)]
    return {"requests": requests, "wall_s": round(wall, 1), "rps": round(len(tally.latency) / wall, 2),
            "p50_ms": ms(tally.latency, 50), "p99_ms": ms(tally.latency, 99), "rejected_429": tally.rejected,
            "errors": len(tally.errors), "error_samples": tally.errors[:3], "rss_mib": rss,
            "rss_at_100_mib": first, "rss_at_end_mib": last, "drift_pct": round((last - first) / first * 100, 2),
            "server_alive": server.process.poll() is None, "load_average": round(os.getloadavg()[0], 1)}


# ---- the run -----------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle (default: the tiny one, built here)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level (48)")
    parser.add_argument("--ray-replicas", type=int, nargs="*", default=[2],
                        help="Ray Serve deployments to load besides the plain server (2; none: skip Ray)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0,
                        help="CPUs per Ray replica (1; its ONNX Runtime sessions get that many threads)")
    parser.add_argument("--plain-threads", type=int, nargs="+", default=[0],
                        help="plain servers to load, by ONNX Runtime threads (0: its default, one per core)")
    parser.add_argument("--soak", type=int, default=1000, help="soak requests against the plain server (0: skip)")
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--retries", type=int, default=5, help="the openai client's retries of a 429 (5)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if 0 < args.soak < 200:
        parser.error("--soak needs at least 200 requests (RSS is read at request 100 and at the last)")
    results: dict = {"cpus": os.cpu_count(), "load_average_start": os.getloadavg(), "settings": vars(args) | {
        "bundle": str(args.bundle)}, "load": [], "servers": {}}
    with tempfile.TemporaryDirectory(prefix="serve-load-") as work:
        work = Path(work)
        bundle = args.bundle or tiny_bundle(work)
        videos = work / "videos"
        videos.mkdir()
        clip = synthesize_clip(videos / "clip.mp4", frames=24, size=96)
        plans = [("plain" + (f" t{n}" if n else ""), 0, n) for n in args.plain_threads]
        plans += [(f"ray x{n}", n, 0) for n in args.ray_replicas]
        for name, replicas, threads in plans:
            server = start_server(name, bundle, videos, args, replicas, threads)
            try:
                ask(client(server.url, Tally(), 0), Tally(), str(clip), args.max_tokens, stream=False)   # warm-up
                for clients in args.clients:
                    row = load(server, clients, max(args.requests, clients), clip, args)
                    results["load"].append(row)
                    print(f"{name}: {clients} clients: {row['rps']} req/s, p50 {row['p50_ms']} ms, "
                          f"{row['errors']} errors, {row['rejected_429']} 429s", flush=True)
                if name == plans[0][0] and args.soak:
                    results["soak"] = soak(server, args.soak, clip, args)
            finally:
                results["servers"][name] = {"ready_s": round(server.started_s, 1), "exit": server.stop()}
    results["load_average_end"] = os.getloadavg()
    print()
    print(format_table([(r["server"], r["clients"], r["requests"], r["rps"], r["p50_ms"], r["p99_ms"],
                         r["ttft_p50_ms"], r["ttft_p99_ms"], r["rejected_429"], r["errors"],
                         " ".join(str(n) for n in sorted(r["replicas"].values(), reverse=True)), r["load_average"])
                        for r in results["load"]],
                       ("server", "clients", "requests", "req/s", "p50 ms", "p99 ms", "TTFT p50 ms", "TTFT p99 ms",
                        "429s", "errors", "per replica", "load avg")))
    if "soak" in results:
        s = results["soak"]
        print()
        print(format_table([(s["requests"], s["rps"], s["p50_ms"], s["p99_ms"], s["rss_at_100_mib"],
                             s["rss_at_end_mib"], f"{s['drift_pct']:+.2f} %", s["rejected_429"], s["errors"])],
                           ("soak requests", "req/s", "p50 ms", "p99 ms", "RSS @100 MiB", "RSS @end MiB", "drift",
                            "429s", "errors")))
        print("RSS every 100 requests (MiB):", " ".join(f"{v:g}" for _, v in sorted(s["rss_mib"].items())))
    print("servers:", ", ".join(f"{n} ready in {v['ready_s']} s, exit {v['exit']}" for n, v in
                                results["servers"].items()))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
