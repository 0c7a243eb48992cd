"""The chaos harness: a job hit by seeded random faults must end as if nothing happened.

``run_chaos`` trains a reference run without faults, then the same job while it injects
faults at seeded moments: ``kill -9`` of a rank or of the launcher (sometimes while a
checkpoint is being written), SIGTERM (preemption), SIGSTOP (a hung rank, found by the
watchdog), and NaN losses (planned by step, so the reference sees them too). The job
recovers the way it would in production: torchrun's agent restarts the group
(``--max-restarts``), and when the job exits anyway (preempted, restarts spent, launcher
killed) the harness runs the same command again, as a scheduler would. At the end the final
weights must be bit-identical to the reference's (deterministic mode) and the audit clean.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steadytrain.config import ConfigError, load_config
from steadytrain.distributed import local_worker_pids

FAULT_KINDS = ("kill", "term", "stop", "nan")
WEIGHTS = Path("final") / "model.safetensors"


@dataclass(frozen=True)
class Fault:
    """One fault: what, once training has logged ``at_step``, and whom (None: the launcher)."""

    kind: str
    at_step: int
    rank: int | None
    during_save: bool = False  # kill only: wait until a checkpoint is being written

    def describe(self) -> str:
        whom = "the launcher" if self.rank is None else f"rank {self.rank}"
        what = {
            "kill": "kill -9",
            "term": "SIGTERM",
            "stop": "SIGSTOP",
            "nan": "NaN loss on",
        }[self.kind]
        when = " during a checkpoint write" if self.during_save else ""
        return f"step {self.at_step}: {what} {whom}{when}"


@dataclass
class Recovery:
    fault: Fault
    injected_at: float
    seconds: float | None = None  # to the first step completed after the resume
    steps_recomputed: int | None = None


@dataclass
class ChaosReport:
    faults: list[Fault]
    recoveries: list[Recovery]
    reference_seconds: float
    chaos_seconds: float
    num_launches: int
    weights_identical: bool
    audit_ok: bool
    audit_output: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.weights_identical and self.audit_ok and not self.problems

    @property
    def goodput(self) -> float:
        """The uninterrupted run's wall time over the faulty run's: the share of the faulty
        run's time that was useful training."""
        return self.reference_seconds / self.chaos_seconds if self.chaos_seconds else 0.0

    def rows(self) -> list[tuple[str, str]]:
        measured = [r.seconds for r in self.recoveries if r.seconds is not None]
        recomputed = [r.steps_recomputed or 0 for r in self.recoveries]
        kinds = ", ".join(
            f"{kind} ×{sum(f.kind == kind for f in self.faults)}"
            for kind in FAULT_KINDS
            if any(f.kind == kind for f in self.faults)
        )
        return [
            ("faults injected", f"{len(self.faults)} ({kinds or 'none'})"),
            ("recoveries", f"{len(measured)} measured, {self.num_launches} launch(es)"),
            ("mean recovery", f"{sum(measured) / len(measured):.1f} s" if measured else "-"),
            ("max recovery", f"{max(measured):.1f} s" if measured else "-"),
            ("steps recomputed", str(sum(recomputed))),
            (
                "goodput",
                f"{self.goodput:.0%} ({self.reference_seconds:.0f} s uninterrupted, "
                f"{self.chaos_seconds:.0f} s with faults)",
            ),
            ("final weights", "bit-identical" if self.weights_identical else "DIFFERENT"),
            ("audit", "OK" if self.audit_ok else "FAILED"),
        ]


def plan_faults(
    *,
    kinds: Sequence[str],
    count: int,
    seed: int,
    max_steps: int,
    nproc: int,
    checkpoint_every: int,
) -> list[Fault]:
    """``count`` faults at distinct seeded steps, in step order.

    Raises:
        ConfigError: for an unknown kind, or more faults than the run has steps for.
    """
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown or not kinds:
        raise ConfigError(
            f"--faults: unknown kind(s) {', '.join(unknown) or '(none given)'}; choose from "
            + ", ".join(FAULT_KINDS)
        )
    usable = range(2, max_steps - 1)
    if count > len(usable):
        raise ConfigError(
            f"--kills {count}: the run has room for {len(usable)} faults (train.max_steps="
            f"{max_steps}); use fewer faults or more steps"
        )
    rng = random.Random(seed)
    faults = []
    for step in sorted(rng.sample(usable, count)):
        kind = rng.choice(list(kinds))
        ranks: list[int | None] = list(range(nproc))
        rank = rng.choice(ranks if kind in ("stop", "nan") else [*ranks, None])
        during_save = kind == "kill" and checkpoint_every > 0 and rng.random() < 0.3
        faults.append(Fault(kind=kind, at_step=step, rank=rank, during_save=during_save))
    return faults


def run_chaos(
    config_path: Path,
    *,
    num_faults: int,
    seed: int,
    nproc: int,
    kinds: Sequence[str],
    work_dir: Path,
    overrides: Sequence[str] = (),
    max_restarts: int = 1,
    hang_timeout_s: float = 5.0,
) -> ChaosReport:
    """Run the reference and the faulty job under ``work_dir``; compare them.

    Raises:
        ConfigError: the config, overrides or fault settings are unusable.
    """
    config = load_config(config_path, overrides=list(overrides))
    faults = plan_faults(
        kinds=kinds,
        count=num_faults,
        seed=seed,
        max_steps=config.train.max_steps,
        nproc=nproc,
        checkpoint_every=config.checkpoint.every_steps,
    )
    if config.checkpoint.every_steps == 0 and any(f.kind != "nan" for f in faults):
        raise ConfigError(
            "checkpoint.every_steps is 0: a job without checkpoints cannot recover; set it"
        )
    nan_plan = [[f.at_step, f.rank] for f in faults if f.kind == "nan"]
    settings = [
        *overrides,
        "deterministic=true",  # bit-identical is only promised with deterministic kernels
        "data.ledger=true",
        "log.every_steps=1",  # the harness follows progress in metrics.jsonl
        "log.console=false",
        f"fault.inject_nonfinite_at={json.dumps(nan_plan)}",
        f"fault.hang_timeout_s={hang_timeout_s}",
        # A peer frozen during a save must be found in seconds too, not after the warm-up
        # allowance meant for slow first steps and large saves.
        f"fault.hang_warmup_s={4 * hang_timeout_s}",
    ]
    job = _Job(config_path, settings, nproc=nproc, max_restarts=max_restarts)
    reference_dir, chaos_dir = work_dir / "reference", work_dir / "chaos"
    started = time.monotonic()
    job.run_to_end(reference_dir, faults=[])
    reference_seconds = time.monotonic() - started
    started = time.monotonic()
    recoveries, launches, problems = job.run_to_end(
        chaos_dir, faults=[f for f in faults if f.kind != "nan"]
    )
    chaos_seconds = time.monotonic() - started
    _measure_recoveries(chaos_dir, recoveries)
    audit = subprocess.run(
        [sys.executable, "-m", "steadytrain", "audit", str(chaos_dir)],
        capture_output=True,
        text=True,
    )
    return ChaosReport(
        faults=faults,
        recoveries=recoveries,
        reference_seconds=reference_seconds,
        chaos_seconds=chaos_seconds,
        num_launches=launches,
        weights_identical=same_weights(reference_dir, chaos_dir),
        audit_ok=audit.returncode == 0,
        audit_output=audit.stdout + audit.stderr,
        problems=problems,
    )


def same_weights(reference_dir: Path, chaos_dir: Path) -> bool:
    """Whether both runs ended with byte-identical final weights."""
    reference, chaos = reference_dir / WEIGHTS, chaos_dir / WEIGHTS
    return reference.is_file() and chaos.is_file() and reference.read_bytes() == chaos.read_bytes()


class _Job:
    """Launches ``steadytrain train`` (``--nproc``) the way a user would, again and again."""

    def __init__(
        self, config_path: Path, settings: list[str], *, nproc: int, max_restarts: int
    ) -> None:
        self.config_path = config_path
        self.settings = settings
        self.nproc = nproc
        self.max_restarts = max_restarts

    def command(self, run_dir: Path) -> list[str]:
        sets = [arg for setting in self.settings for arg in ("--set", setting)]
        return [
            sys.executable,
            "-m",
            "steadytrain",
            "train",
            str(self.config_path),
            "--nproc",
            str(self.nproc),
            "--max-restarts",
            str(self.max_restarts),
            "--run-dir",
            str(run_dir),
            *sets,
        ]

    def run_to_end(
        self, run_dir: Path, *, faults: list[Fault]
    ) -> tuple[list[Recovery], int, list[str]]:
        """Run (and re-run, as a scheduler would) until training finishes."""
        pending = list(faults)
        recoveries: list[Recovery] = []
        problems: list[str] = []
        logs = run_dir.parent / f"{run_dir.name}-logs"
        logs.mkdir(parents=True, exist_ok=True)
        launches = 0
        while True:
            launches += 1
            if launches > len(faults) + 3:
                problems.append(f"{run_dir}: still not finished after {launches - 1} launches")
                return recoveries, launches - 1, problems
            with open(logs / f"launch-{launches}.log", "w") as log:
                process = subprocess.Popen(
                    self.command(run_dir), stdout=log, stderr=subprocess.STDOUT, text=True
                )
                recoveries += _inject_while_running(process, run_dir, pending)
            if process.returncode == 0:
                if pending:
                    problems.append(f"{len(pending)} fault(s) never injected: training ended")
                return recoveries, launches, problems


def _inject_while_running(
    process: subprocess.Popen[str], run_dir: Path, pending: list[Fault]
) -> list[Recovery]:
    """Inject ``pending`` faults (in order, removed as injected) while ``process`` runs."""
    # Only steps logged since the last fault count: after a restart the group logs from its
    # checkpoint again, and a dying group's last lines must not trigger the next fault.
    last_fault = time.time()
    recoveries: list[Recovery] = []
    stopped: list[int] = []
    try:
        while process.poll() is None:
            if pending and _logged_step(run_dir, since=last_fault) >= pending[0].at_step:
                pid = _inject(pending[0], process, run_dir)
                if pid is None:  # the target is not running (yet): try again shortly
                    time.sleep(0.05)
                    continue
                fault = pending.pop(0)
                last_fault = time.time()
                recoveries.append(Recovery(fault=fault, injected_at=last_fault))
                if fault.kind == "stop":
                    stopped.append(pid)
            if stopped and _has_event(run_dir, "hang", since=recoveries[-1].injected_at):
                _kill_all(stopped)  # the watchdog saw it; nothing revives a frozen node
            time.sleep(0.02)
    finally:
        _kill_all(stopped)
        if process.poll() is None:
            process.kill()
        process.wait()
    return recoveries


def _inject(fault: Fault, launcher: subprocess.Popen[str], run_dir: Path) -> int | None:
    """Send ``fault``'s signal to its target; returns the pid signalled (None: none left)."""
    if fault.during_save:
        _wait_for_save(run_dir / "checkpoints", launcher)
    target = launcher.pid if fault.rank is None else local_worker_pids(launcher.pid).get(fault.rank)
    number = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stop": signal.SIGSTOP}[fault.kind]
    if target is None:
        return None
    try:
        os.kill(target, number)
    except ProcessLookupError:
        return None
    return target


def _wait_for_save(checkpoints: Path, launcher: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launcher.poll() is None:
        if checkpoints.is_dir() and any(checkpoints.glob(".step_*.partial-*")):
            return
        time.sleep(0.001)


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pids.clear()


def _logged_step(run_dir: Path, *, since: float) -> int:
    """The newest step ``metrics.jsonl`` logged after ``since`` (-1: none yet)."""
    for record in reversed(_records(run_dir / "metrics.jsonl")):
        if record.get("time", 0) > since and "loss" in record:
            return int(record["step"])
    return -1


def _has_event(run_dir: Path, kind: str, *, since: float) -> bool:
    return any(
        r.get("event") == kind and r.get("time", 0) > since
        for r in _records(run_dir / "events.jsonl")
    )


def _measure_recoveries(run_dir: Path, recoveries: list[Recovery]) -> None:
    """Each fault's recovery: from injection to the first step after the next resume."""
    resumed = [r for r in _records(run_dir / "events.jsonl") if r.get("event") == "recovery"]
    for recovery in recoveries:
        after = [r for r in resumed if r["first_step_done_at"] > recovery.injected_at]
        if after:
            recovery.seconds = after[0]["first_step_done_at"] - recovery.injected_at
            recovery.steps_recomputed = after[0].get("steps_recomputed")


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
