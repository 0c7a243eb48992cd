"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.jobs import checkpoint_overrides, train
from tests.helpers import events, free_port


@pytest.fixture(scope="session")
def overrides(text_corpus: Path, data_cache: Path) -> list[str]:
    """The small deterministic job's settings (tests/e2e/jobs.py)."""
    return checkpoint_overrides(text_corpus, data_cache)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, overrides: list[str]) -> Path:
    """One uninterrupted 2-rank run of that job, trained once per session: the weights every
    interrupted run must end with. Tests read it, or copy it to change it."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = train(run_dir, overrides)
    assert result.returncode == 0, result.output
    return run_dir


@pytest.fixture(scope="session")
def fsdp_reference(tmp_path_factory: pytest.TempPathFactory, overrides: list[str]) -> Path:
    """The same job trained uninterrupted under FSDP at 2 ranks: sharded checkpoints, and
    the weights every interrupted FSDP run of it must end with."""
    run_dir = tmp_path_factory.mktemp("fsdp-reference")
    result = train(run_dir, [*overrides, "parallel.strategy=fsdp"])
    assert result.returncode == 0, result.output
    return run_dir


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on loopback (SQLite store, artifacts served by it): its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host=127.0.0.1",
            f"--port={port}",
            "--workers=1",
            f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
            f"--artifacts-destination={root / 'artifacts'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "mlflow server did not start:\n" + (root / "server.log").read_text()
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="session")
def restarted_run(
    tmp_path_factory: pytest.TempPathFactory, overrides: list[str], mlflow_server: str
) -> Path:
    """8 steps with a NaN on rank 1 at step 5 (skipped), then the same run resumed to 12;
    tracked in the MLflow server's experiment ``restarted``."""
    run_dir = tmp_path_factory.mktemp("restarted-run")
    job = [
        *overrides,
        "log.every_steps=2",
        "fault.inject_nonfinite_at=[[5, 1]]",
        f"telemetry.mlflow_tracking_uri={mlflow_server}",
        "telemetry.mlflow_experiment=restarted",
    ]
    first = train(run_dir, [*job, "train.max_steps=8"])
    assert first.returncode == 0, first.output
    second = train(run_dir, [*job, "train.max_steps=12"], "--allow-change", "train.max_steps")
    assert second.returncode == 0, second.output
    assert events(run_dir, "resume") and events(run_dir, "nonfinite_step_skipped")
    return run_dir
