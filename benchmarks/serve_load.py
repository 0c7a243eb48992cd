"""The served side of benchmarks/serve.py: ``steadytrain serve`` as a subprocess, its CPU per
thread and its own metrics, and a closed-loop load generator (asyncio, one process, one lean
HTTP/1.1 connection per client: serve_client.py).

The load generator runs ``concurrency`` clients, each sending its next request as soon as
the previous one is answered, for ``seconds``; latency is measured per request from send to
the whole answer read. Before the timed part every client sends one untimed request (its
connection is opened then); the server's CPU and metrics are read after it and at the end,
when nothing is in flight.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from overhead import REPO_ROOT, machine_cpu_ticks
from serve_client import Answer, Connection, encode_request

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
METRIC_PREFIX = "steadytrain_serve_"
# Server metrics (per kind) read around each load; differences give per-load figures.
KIND_METRICS = (
    "forward_seconds_sum",
    "forward_seconds_count",
    "batch_size_sum",
    "queue_wait_seconds_sum",
    "queue_wait_seconds_count",
    "batch_tokens_total",
    "padding_tokens_total",
)


@dataclass
class ServerProcess:
    """One ``steadytrain serve RUN_DIR --port P [--set ...]`` and where it answers."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def stop(self, *, signalled: bool = False) -> int:
        """SIGTERM (it drains and exits 0) unless ``signalled`` already, then its exit
        status."""
        if not signalled and self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(
    name: str,
    run_dir: Path,
    *,
    settings: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start ``steadytrain serve`` as a user does (the console script), without waiting;
    ``env`` is added to this process's environment."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "steadytrain"), "serve", str(run_dir)]
    command += ["--port", str(port), *(arg for setting in settings for arg in ("--set", setting))]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env={**os.environ, **(env or {})},
        )
    return ServerProcess(name, process, f"http://127.0.0.1:{port}", log_path)


def wait_ready(server: ServerProcess, *, timeout_s: float = 180) -> None:
    """Until /readyz answers 200 (loaded and warmed up); exits with its log if it dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.process.poll() is not None or time.monotonic() > deadline:
            server.process.kill()
            sys.exit(f"serve: {server.name} server did not become ready:\n{server.tail()}")
        time.sleep(0.2)


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of ``pid``'s main thread (uvicorn's event loop: HTTP and the handlers) and
    of all its other threads together (the model's thread and torch's intra-op threads)."""
    main, others = 0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        if int(task.name) == pid:
            main += ticks
        else:
            others += ticks
    return {"event_loop": main / CLOCK_TICKS, "other_threads": others / CLOCK_TICKS}


def scrape(url: str) -> dict[str, float]:
    """The server's metrics this benchmark reads, keyed ``name{label}`` (kind or endpoint)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix(METRIC_PREFIX)
            label = sample.labels.get("kind") or sample.labels.get("endpoint", "")
            if "outcome" in sample.labels:
                label += f",{sample.labels['outcome']}"
            if "reason" in sample.labels:
                label = sample.labels["reason"]
            if "le" not in sample.labels:
                found[f"{name}{{{label}}}"] = sample.value
    return found


def server_figures(
    before: dict[str, float], after: dict[str, float], *, kind: str, requests: int
) -> dict[str, Any]:
    """Per-load figures from the server's own metrics: model time per call and per request,
    batch size, queue wait, padding share (of positions run through the model), masked share
    (of cache positions cached steps read), and any rejection."""
    delta = {
        name: after.get(f"{name}{{{kind}}}", 0.0) - before.get(f"{name}{{{kind}}}", 0.0)
        for name in KIND_METRICS
    }
    attended, masked = (
        after.get(f"{name}{{}}", 0.0) - before.get(f"{name}{{}}", 0.0)
        for name in ("attended_positions_total", "masked_positions_total")
    )
    calls = delta["forward_seconds_count"]
    rejected = sum(
        after[name] - before.get(name, 0.0) for name in after if name.startswith("rejections")
    )
    return {
        "model_calls": int(calls),
        "model_s_per_call": delta["forward_seconds_sum"] / calls if calls else None,
        "model_s_per_request": delta["forward_seconds_sum"] / requests if requests else None,
        "model_s_total": delta["forward_seconds_sum"],
        "mean_batch_size": delta["batch_size_sum"] / calls if calls else None,
        "queue_wait_s": delta["queue_wait_seconds_sum"] / delta["queue_wait_seconds_count"]
        if delta["queue_wait_seconds_count"]
        else None,
        "padding_share": delta["padding_tokens_total"] / delta["batch_tokens_total"]
        if delta["batch_tokens_total"]
        else None,
        "masked_share": masked / attended if attended else None,
        "rejections": int(rejected),
    }


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile (0..1), interpolated between the closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = share * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Load:
    """What the clients send: ``path`` with the JSON bodies in turn (a GET without bodies)."""

    kind: str  # the server's metric kind: "generate", "forward" (or "" for none)
    path: str
    bodies: list[dict[str, Any]] | None
    check: Callable[[int, dict[str, Any]], None] | None = None  # (body index, answer)


async def _closed_loop(
    server: ServerProcess, load: Load, *, concurrency: int, seconds: float
) -> dict[str, Any]:
    # A connection of its own each, and every request's bytes made before the clock starts.
    if load.bodies is None:
        requests = [encode_request(server.url, "GET", load.path, None)]
    else:
        requests = [encode_request(server.url, "POST", load.path, body) for body in load.bodies]
    connections = [await Connection.open(server.url) for _ in range(concurrency)]
    try:

        async def send(index: int) -> Answer:
            return await connections[index % concurrency].send(requests[index % len(requests)])

        await asyncio.gather(*(send(index) for index in range(concurrency)))  # connections
        metrics_before = scrape(server.url)
        threads_before = thread_cpu_s(server.process.pid)
        machine_before = machine_cpu_ticks()
        client_before = time.process_time()
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        started = time.perf_counter()
        deadline = started + seconds

        async def client_loop(first: int) -> None:
            index = first
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                answer = await send(index)
                latencies.append(time.perf_counter() - sent)
                statuses[answer.status] += 1
                if answer.status == 200 and load.check is not None:
                    load.check(index, answer.json())
                index += concurrency

        await asyncio.gather(*(client_loop(first) for first in range(concurrency)))
        elapsed = time.perf_counter() - started
        client_s = time.process_time() - client_before
        machine_after = machine_cpu_ticks()
        threads_after = thread_cpu_s(server.process.pid)
        metrics_after = scrape(server.url)
    finally:
        for connection in connections:
            await connection.close()
    server_s = {name: threads_after[name] - threads_before[name] for name in threads_after}
    answered = statuses[200]
    measured: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(latencies),
        "answered": answered,
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "seconds": elapsed,
        "requests_per_s": answered / elapsed,
        "p50_s": statistics.median(latencies),
        "p99_s": percentile(latencies, 0.99),
        "latencies_s": [round(latency, 6) for latency in latencies],
        # CPU in cores (seconds of CPU per second): 1.0 is one core kept busy.
        "client_cores": client_s / elapsed,
        "server_event_loop_cores": server_s["event_loop"] / elapsed,
        "server_other_threads_cores": server_s["other_threads"] / elapsed,
        "client_cpu_s_per_request": client_s / max(1, len(latencies)),
        "server_event_loop_cpu_s_per_request": server_s["event_loop"] / max(1, len(latencies)),
    }
    if machine_before is not None and machine_after is not None:
        total, busy, steal = (a - b for a, b in zip(machine_after, machine_before, strict=True))
        measured["machine_busy_share"] = busy / max(1, total)
        ours = (client_s + server_s["event_loop"] + server_s["other_threads"]) * CLOCK_TICKS
        measured["foreign_cpu_share"] = max(0.0, (busy - steal - ours) / max(1, total))
    if load.kind:
        measured["server"] = server_figures(
            metrics_before, metrics_after, kind=load.kind, requests=answered
        )
    return measured


def drive(server: ServerProcess, load: Load, *, concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` closed-loop clients for ``seconds``: throughput, latency, CPU, and the
    server's own figures for the same requests."""
    return asyncio.run(_closed_loop(server, load, concurrency=concurrency, seconds=seconds))
