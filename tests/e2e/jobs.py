"""The small deterministic job most end-to-end tests train, and what they check of it.

``reference`` (tests/e2e/conftest.py) trains it once per session without interruption: the
weights every interrupted, restarted or faulted run of it must end with.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import TINY_CONFIG, CliResult, as_set_args, run_steadytrain, start_steadytrain

MAX_STEPS = 24


def checkpoint_overrides(text_corpus: Path, data_cache: Path) -> list[str]:
    return [
        f"data.corpus={text_corpus}",
        f"data.cache_dir={data_cache}",
        "data.seq_len=64",
        "data.ledger=true",
        "model.kwargs={num_layers: 2, width: 64, num_heads: 2}",
        f"train.max_steps={MAX_STEPS}",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.warmup_steps=4",
        "train.eval_batches=0",
        "checkpoint.every_steps=4",
        "checkpoint.keep_last=3",
        "log.every_steps=1",
        "log.console=false",
        "deterministic=true",
        # Steps here take tens of milliseconds: agree on signals every few, not every 1 s.
        "fault.signal_check_s=0.2",
    ]


def train(
    run_dir: Path,
    overrides: list[str],
    *extra: str,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> CliResult:
    """``steadytrain train`` of the tiny config with ``overrides``, to the end."""
    command = train_args(run_dir, overrides, *extra, nproc=nproc)
    return run_steadytrain(*command, env=env, timeout=timeout)


def start_training(
    run_dir: Path, overrides: list[str], *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """The same, 2 ranks, started in the background (for signals and kills)."""
    return start_steadytrain(*train_args(run_dir, overrides, *extra, nproc=2), env=env)


def train_args(run_dir: Path, overrides: list[str], *extra: str, nproc: int) -> list[str | Path]:
    return [
        "train",
        TINY_CONFIG,
        "--nproc",
        str(nproc),
        "--run-dir",
        run_dir,
        *extra,
        *as_set_args(overrides),
    ]


def final_weights(run_dir: Path) -> bytes:
    return (run_dir / "final" / "model.safetensors").read_bytes()


def assert_audit_ok(run_dir: Path) -> None:
    audit = run_steadytrain("audit", run_dir)
    assert audit.returncode == 0, audit.output
