"""Helpers for tests: run the real CLI in a subprocess as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from steadytrain.distributed import local_worker_pids, process_running

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "examples" / "tiny.yaml"
PLUGINS_DIR = Path(__file__).resolve().parent / "plugins"


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli_env(**extra: str) -> dict[str, str]:
    """The environment a user's shell would give: plugins importable, no inherited ranks."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS_DIR), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_steadytrain(
    *args: str | Path,
    timeout: float = 240,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> CliResult:
    """Run ``steadytrain ARGS`` exactly as a user would, from the installed entry point."""
    command = [str(Path(sys.executable).parent / "steadytrain"), *map(str, args)]
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(**(env or {})),
        cwd=cwd or REPO,
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def run_torchrun(*args: str | Path, nproc: int = 2, timeout: float = 240) -> CliResult:
    """``torchrun --standalone --nproc-per-node N ARGS`` (how users launch on one machine)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        *map(str, args),
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=cli_env(), cwd=REPO
    )
    return CliResult(completed.returncode, completed.stdout, completed.stderr)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on just now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``metrics.jsonl``, ``events.jsonl``)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The events of one kind in ``RUN_DIR/events.jsonl``, oldest first."""
    return [record for record in read_jsonl(run_dir / "events.jsonl") if record["event"] == kind]


def as_set_args(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def start_steadytrain(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``steadytrain ARGS`` in the background (to kill it); output goes to pipes."""
    command = [str(Path(sys.executable).parent / "steadytrain"), *map(str, args)]
    return subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=cli_env(**(env or {})),
        cwd=REPO,
    )


def wait_for_step(
    run_dir: Path, step: int, process: subprocess.Popen[str], timeout: float = 120
) -> int:
    """Block until ``metrics.jsonl`` logs a step >= ``step``; returns the step seen."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited early ({process.returncode})")
        if metrics.is_file():
            for line in reversed(metrics.read_text().splitlines()):
                try:
                    seen = json.loads(line).get("step", -1)
                except json.JSONDecodeError:
                    continue
                if seen >= step:
                    return int(seen)
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def wait_for_staging(
    checkpoints: Path, process: subprocess.Popen[str], timeout: float = 60
) -> None:
    """Return as soon as a save's staging directory exists (polled every millisecond)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if checkpoints.is_dir() and any(checkpoints.glob(".step_*.partial-*")):
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early ({process.returncode})")
        time.sleep(0.001)
    raise AssertionError("no save started")


def worker_pids(launcher: subprocess.Popen[str]) -> list[int]:
    """The worker processes that ``--nproc`` runs now, by rank."""
    workers = local_worker_pids(launcher.pid)
    return [workers[rank] for rank in sorted(workers)]


def wait_until_gone(pids: list[int], *, timeout: float) -> bool:
    """Poll until none of ``pids`` runs (a zombie counts as gone); False on timeout."""
    deadline = time.monotonic() + timeout
    while any(process_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def prometheus_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of a real Prometheus endpoint, parsed by prometheus-client's own parser:
    ``{(name, sorted labels): value}``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class RecordingEvents:
    """An event sink (a Protocol boundary) that remembers what was emitted."""

    def __init__(self) -> None:
        self.emitted: list[tuple[str, dict[str, Any]]] = []

    def emit(self, kind: str, **fields: Any) -> None:
        self.emitted.append((kind, fields))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [fields for emitted_kind, fields in self.emitted if emitted_kind == kind]
