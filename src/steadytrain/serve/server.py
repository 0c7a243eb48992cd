"""Run the server: bind, load in the background (/readyz says 503 until then), serve, drain.

SIGTERM (or Ctrl-C) stops accepting connections and lets the requests in flight finish
within ``serve.shutdown_grace_s``; the model's thread keeps answering them meanwhile.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from steadytrain.config import Config, ConfigError
from steadytrain.serve.app import ServerState, create_app
from steadytrain.serve.batcher import Batcher
from steadytrain.serve.faults import Faults
from steadytrain.serve.loading import (
    check_checkpoint_exists,
    load_run_config,
    load_served_model,
)
from steadytrain.serve.metrics import ServeMetrics
from steadytrain.serve.worker import KINDS, ModelWorker


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve(
    run_dir: Path,
    *,
    checkpoint_step: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    overrides: list[str] | tuple[str, ...] = (),
    say: Callable[[str], None] = _stderr,
) -> None:
    """Serve ``run_dir``'s final weights (or checkpoint ``checkpoint_step``) until SIGTERM.

    Raises:
        ConfigError: no run there, a bad ``--set serve.*``, the address cannot be bound.
        ServeRefused: the weights are missing, corrupted or do not fit the model.
        FactoryError: the run's model factory cannot be called.
    """
    config = load_run_config(run_dir, overrides)
    if checkpoint_step is not None:
        check_checkpoint_exists(config, checkpoint_step)
    faults = Faults.from_environment()
    listener = _bind(host, port)
    settings = config.serve
    metrics = ServeMetrics(max_batch_size=settings.max_batch_size)
    batcher = Batcher(max_queue=settings.max_queue, kinds=KINDS)
    state = ServerState()
    app = create_app(state, batcher=batcher, metrics=metrics, settings=settings)
    _check_installed({"serve.http": settings.http, "serve.event_loop": settings.event_loop})
    server = _DrainingServer(
        uvicorn.Config(
            app,
            http=settings.http,
            loop=settings.event_loop,
            timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
            log_level="warning",
            access_log=False,
            lifespan="off",
        ),
        state=state,
    )
    failures: list[BaseException] = []
    loader = threading.Thread(
        target=_load,
        kwargs=dict(
            state=state,
            server=server,
            config=config,
            run_dir=run_dir,
            checkpoint_step=checkpoint_step,
            batcher=batcher,
            metrics=metrics,
            faults=faults,
            failures=failures,
            say=say,
        ),
        name="steadytrain-load",
        daemon=True,
    )
    bound_host, bound_port = listener.getsockname()[:2]
    say(f"steadytrain: listening on http://{bound_host}:{bound_port} (loading {run_dir})")
    loader.start()
    try:
        server.run(sockets=[listener])
    finally:
        # uvicorn has put the default handler back: another SIGTERM now, while the model's
        # thread stops, would end a drained server by the signal instead of with 0.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if state.worker is not None:
            state.worker.stop(timeout=5)
        listener.close()
    if failures:
        raise failures[0]
    say("steadytrain: stopped")


def _load(
    *,
    state: ServerState,
    server: uvicorn.Server,
    config: Config,
    run_dir: Path,
    checkpoint_step: int | None,
    batcher: Batcher,
    metrics: ServeMetrics,
    faults: Faults,
    failures: list[BaseException],
    say: Callable[[str], None],
) -> None:
    """Load, warm up, start the model's thread; on failure stop the server with the error."""
    try:
        faults.before_load()
        served = load_served_model(config, run_dir=run_dir, checkpoint_step=checkpoint_step)
        worker = ModelWorker(served, batcher, metrics, faults=faults)
        warning = worker.warm_up()
        if warning is not None:
            say(f"steadytrain: warning: {warning}")
        worker.start()
        state.served, state.worker = served, worker
    except BaseException as error:
        failures.append(error)
        server.should_exit = True
        return
    say(
        f"steadytrain: ready: {served.source} ({config.model.factory} on {served.device}); "
        f"batches of up to {config.serve.max_batch_size}, waiting up to "
        f"{config.serve.max_wait_ms:g} ms"
    )


def _check_installed(wanted: dict[str, str]) -> None:
    """Refuse in one line an HTTP parser or event loop asked for by name but not installed.

    Raises:
        ConfigError: naming the setting and what to do.
    """
    for field, name in wanted.items():
        if name not in ("auto", "h11", "asyncio") and importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"{field}: {name} is not installed; install it (pip install "
                f"'uvicorn[standard]') or set {field}=auto"
            )


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({reason}); "
            "choose another --port (or --host)"
        ) from None
    # Accepted connections inherit it. asyncio sets it only on sockets whose proto is TCP, and
    # create_server's is 0: without it, uvicorn's separate header and body writes meet the
    # client's delayed ACK and every answer waits ~40 ms (Nagle).
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


class _DrainingServer(uvicorn.Server):
    """uvicorn's server; its signal handler also marks the state draining (a flag)."""

    def __init__(self, config: uvicorn.Config, *, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Flags only. uvicorn's own handler would also re-raise the signal after the drain,
        # turning a clean stop into death by SIGTERM; a drained server exits 0 instead.
        self.state.draining = True
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True
