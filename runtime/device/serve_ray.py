"""The OpenAI-compatible app of `runtime.device.serve` scaled out on Ray Serve: N replicas, each a process holding
its own `DevicePipeline` built from the bundle directory, behind one HTTP endpoint (the `[ray]` extra).

- `serve_on_ray` (what `aot-export serve --ray` runs) starts a single-node Ray cluster on loopback, deploys the app
  and blocks until SIGINT / SIGTERM, then shuts Serve and Ray down.
- `application` is the entry point for a Ray cluster of your own: it returns the bound application, so

      from ray import serve
      from runtime.device.serve import ServeSettings
      from runtime.device.serve_ray import application

      serve.start(http_options={"host": "127.0.0.1", "port": 8000})
      serve.run(application("bundle", ServeSettings(allow_paths=(Path("videos"),)), replicas=4, cpus=2),
                name="aot-export", route_prefix="/")

  serves `/v1/chat/completions`, `/v1/models` and `/health` there (every node needs `aot-export[ray]` and the
  bundle at that path).

Each replica admits requests as a plain server does (`max_queue`, then 429 with Retry-After); every response names
its replica's process in `x-aot-replica`. Ray is imported only when a deployment is made: `serve_on_ray` has to set
the cluster's environment first (`local_cluster`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from aot_export.errors import InputError
from runtime.device.serve import ServeSettings, create_app

APP_NAME = "aot-export"
# A replica's requests beyond `max_queue + 1` are refused by the app (429 + Retry-After, in a millisecond); Ray's own
# limit sits above that so Ray forwards them to be refused instead of holding them, unbounded and silent, in its
# proxy. It still caps a replica at a few times its bound.
RAY_ONGOING_PER_ADMITTED = 4
# Serve waits this long for a replica's running requests when shutting down (its default, 20 s, makes Ctrl-C slow).
GRACEFUL_SHUTDOWN_S = 5.0
# The local cluster's environment, set before Ray is imported and inherited by every process it starts (Ray reads
# these settings from the environment only):
# - Ray turns 127.0.0.1 into the machine's routable address on Linux (`_node_ip_address` is resolved away) and its
#   gRPC servers then listen on every interface; this switch (named for Windows/macOS, where it is the default) is
#   the only one that keeps the node's servers on loopback.
# - Token authentication stays on, with a token made for this cluster and held only in its processes' environment
#   (Ray's default would write one into ~/.ray). Loopback is not enough: every Serve replica also opens a gRPC port on
#   all interfaces (Ray 2.60, replica.py: "[::]:0") that unpickles what it is sent; only the token guards it.
def local_cluster_env() -> dict[str, str]:
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32)}


LOOPBACK_NODE = "127.0.0.1"


class Replica:
    """One replica: the bundle's `DevicePipeline`, loaded in the replica's process, under `create_app` (Ray Serve
    wraps it with `serve.ingress()` in `application`)."""

    def __init__(self, bundle_dir: str, settings: ServeSettings, pipeline_options: dict[str, Any]):
        from runtime.device.pipeline import DevicePipeline

        self.settings = settings
        self.pipeline = DevicePipeline(bundle_dir, **pipeline_options)

    def __serve_build_asgi_app__(self) -> Any:
        """Ray Serve calls this in the replica after `__init__`: the same app a plain `serve` runs."""
        return create_app(self.pipeline, self.settings)


def check_replicas(replicas: int, cpus: float, gpus: float) -> None:
    if replicas < 1 or not cpus > 0 or gpus < 0:
        raise InputError("--replicas must be at least 1, --cpus-per-replica above 0 and GPUs per replica at least 0")


def replica_options(pipeline_options: dict[str, Any] | None, cpus: float) -> dict[str, Any]:
    """`DevicePipeline`'s keyword arguments in a replica: ONNX Runtime's threads default to the CPUs the replica
    reserves, not to every core of the node (its own default), so N replicas on one node do not each spin all cores."""
    options = dict(pipeline_options or {})
    if options.get("intra_op_threads") is None:
        options["intra_op_threads"] = max(1, math.floor(cpus))
    return options


def application(bundle_dir: str | os.PathLike, settings: ServeSettings = ServeSettings(), *, replicas: int = 2,
                cpus: float = 1.0, gpus: float = 0.0, pipeline_options: dict[str, Any] | None = None) -> Any:
    """The bound Ray Serve application (for `serve.run`): `replicas` copies of the app, each reserving `cpus` CPUs
    (fractions allowed) and `gpus` GPUs; `pipeline_options` are `DevicePipeline`'s keyword arguments."""
    from ray import serve

    settings.check()
    check_replicas(replicas, cpus, gpus)
    deployment = serve.deployment(
        serve.ingress()(Replica), name=APP_NAME, num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        max_ongoing_requests=RAY_ONGOING_PER_ADMITTED * (settings.max_queue + 1),
        graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S)
    return deployment.bind(str(Path(bundle_dir).resolve()), settings, replica_options(pipeline_options, cpus))


# ---- the local cluster ------------------------------------------------------------------------------------------
class Stop(BaseException):
    """SIGINT or SIGTERM arrived: the cluster is shut down, then the signal is raised again for the caller. A
    BaseException, as KeyboardInterrupt is, so that no `except Exception` inside Ray swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame: Any) -> None:
    for other in (signal.SIGINT, signal.SIGTERM):     # a second Ctrl-C must not cut the shutdown short (bounded:
        signal.signal(other, signal.SIG_IGN)          # GRACEFUL_SHUTDOWN_S)
    raise Stop(signum)


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGINT / SIGTERM raise `Stop` inside the block; the caller's handlers come back after it."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, _stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def cluster_environment() -> Iterator[None]:
    """`local_cluster_env()` in this process (so in the processes Ray starts) for the block, put back after it."""
    env = local_cluster_env()
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def local_cluster() -> Iterator[None]:
    """A new single-node Ray cluster on loopback, shut down (Serve first) when the block ends."""
    if "ray" in sys.modules:        # its settings were read at import, before `local_cluster_env()` could be set
        raise InputError("serve_on_ray starts its own Ray cluster and must do so before this process imports ray; "
                         "on a cluster of your own, deploy `application()` with serve.run")
    with cluster_environment():
        import ray
        from ray import serve

        # address="local": always a new cluster, never one RAY_ADDRESS or a running `ray start` points at.
        ray.init(address="local", include_dashboard=False, logging_level="warning")
        try:
            node = ray.util.get_node_ip_address()
            if node != LOOPBACK_NODE:           # a Ray whose switch no longer keeps the node on loopback
                raise InputError(f"the local Ray cluster came up on {node}, not loopback; refusing to serve from "
                                 "it (this Ray version is not the one runtime/device/serve_ray.py was written for)")
            yield
        finally:
            with contextlib.suppress(Exception):       # a half-started Serve: Ray's shutdown still ends it
                serve.shutdown()
            ray.shutdown()


def check_fits(replicas: int, cpus: float, gpus: float) -> None:
    """Ray would wait forever for replicas the cluster cannot hold; refuse them in one line instead."""
    import ray

    have = ray.cluster_resources()
    if replicas * cpus > have.get("CPU", 0) + 1e-9:
        raise InputError(f"--replicas {replicas} × --cpus-per-replica {cpus:g} needs {replicas * cpus:g} CPUs; this "
                         f"machine has {have.get('CPU', 0):g}: reserve a fraction per replica (e.g. "
                         f"--cpus-per-replica {have.get('CPU', 0) / replicas:g})")
    if replicas * gpus > have.get("GPU", 0) + 1e-9:
        raise InputError(f"--replicas {replicas} × --gpus-per-replica {gpus:g} needs {replicas * gpus:g} GPUs; "
                         f"this machine has {have.get('GPU', 0):g}")


def serve_on_ray(bundle_dir: str | os.PathLike, settings: ServeSettings, *, replicas: int = 2, cpus: float = 1.0,
                 gpus: float = 0.0, pipeline_options: dict[str, Any] | None = None,
                 on_ready: Callable[[str], None] | None = None) -> None:
    """Serves the bundle from `replicas` Ray Serve replicas on a local cluster at settings.host:settings.port until
    SIGINT / SIGTERM; then shuts Serve and Ray down and raises that signal again (as uvicorn does for `serve`)."""
    settings.check()
    check_replicas(replicas, cpus, gpus)               # before the cluster's seconds of start-up
    quiet = {"log_level": "WARNING", "enable_access_log": False}
    received = None
    with stopped_by_signals():
        try:
            with local_cluster():
                from ray import serve

                signal.signal(signal.SIGTERM, _stop)            # ray.init put its own in (exit, no shutdown)
                # Serve's driver-side INFO lines (one says the http_options "will not be applied": they were, by
                # serve.start) would be all a user sees; its warnings and the replicas' errors still show.
                logging.getLogger("ray.serve").setLevel(logging.WARNING)
                check_fits(replicas, cpus, gpus)
                serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config=quiet)
                serve.run(application(bundle_dir, settings, replicas=replicas, cpus=cpus, gpus=gpus,
                                      pipeline_options=pipeline_options),
                          name=APP_NAME, route_prefix="/", logging_config=quiet)
                if on_ready is not None:
                    on_ready(f"http://{settings.host}:{settings.port}/v1")
                while True:
                    time.sleep(3600)
        except Stop as stop:
            received = stop.signum
    if received is not None:
        signal.raise_signal(received)
