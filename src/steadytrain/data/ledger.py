"""The consumption ledger and its audit: proof that each sample was consumed exactly once.

Layout under ``RUN_DIR/ledger/``::

    meta.json            dataset size, global batch, seed, and a windowed shuffle's shards
                         and window (written by rank 0)
    attempts.jsonl       one line per start of training: attempt id, first step, world size
    rank-00000.jsonl     one line per committed step: attempt, step, epoch, sample ids read

Each rank records the ids of the samples that actually fed its forward passes, after the
optimizer step committed. When a later attempt resumes at step ``k``, records of earlier
attempts for steps ``>= k`` were rolled back (never reached a checkpoint) and are ignored.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from steadytrain.config import DataError
from steadytrain.data.sampler import MixtureOrder, SampleOrder, epoch_permutation

LEDGER_VERSION = 1


class ConsumptionLedger:
    """Appends this rank's committed consumption to ``RUN_DIR/ledger``."""

    def __init__(
        self,
        directory: Path,
        *,
        attempt: str,
        rank: int,
        world_size: int,
        start_step: int,
        num_samples: int,
        global_batch_size: int,
        seed: int,
        order: SampleOrder | MixtureOrder | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.rank = rank
        self.world_size = world_size
        if rank == 0:
            _write_meta(
                directory,
                num_samples=num_samples,
                global_batch_size=global_batch_size,
                seed=seed,
                order=order,
            )
        self.begin_attempt(attempt=attempt, start_step=start_step)
        path = directory / f"rank-{rank:05d}.jsonl"
        self._file: IO[str] = open(path, "a")  # noqa: SIM115
        if path.stat().st_size and not _ends_with_newline(path):
            self._file.write("\n")  # end a line torn by a crash, so our first record stands alone

    def begin_attempt(self, *, attempt: str, start_step: int, reason: str = "start") -> None:
        """From now on records belong to ``attempt``, which starts at ``start_step``.

        A start of training is an attempt, and so is a rollback: records of earlier attempts
        at ``start_step`` or later no longer count. Every rank must use the same id.
        """
        self.attempt = attempt
        if self.rank != 0:
            return
        with open(self.directory / "attempts.jsonl", "a") as attempts:
            attempts.write(
                json.dumps(
                    {
                        "attempt": attempt,
                        "start_step": start_step,
                        "world_size": self.world_size,
                        "time": time.time(),
                        "reason": reason,
                    }
                )
                + "\n"
            )

    def record(
        self, *, step: int, epoch: int, sample_ids: list[int], skipped: bool = False
    ) -> None:
        """Record that ``step`` consumed ``sample_ids`` on this rank: committed, or
        ``skipped`` by the non-finite guard (its update dropped, its data passed over)."""
        entry: dict[str, Any] = {
            "attempt": self.attempt,
            "step": step,
            "epoch": epoch,
            "sample_ids": sample_ids,
        }
        if skipped:
            entry["skipped_by_guard"] = True
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def new_attempt_id() -> str:
    """A fresh id for one start of training; every rank of that start must use the same."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


class NullLedger:
    """The ledger when ``data.ledger`` is off: records nothing."""

    def begin_attempt(self, *, attempt: str, start_step: int, reason: str = "start") -> None:
        return None

    def record(
        self, *, step: int, epoch: int, sample_ids: list[int], skipped: bool = False
    ) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass
class EpochAudit:
    epoch: int
    num_consumed: int
    complete: bool
    duplicates: dict[int, int] = field(default_factory=dict)
    missing: list[int] = field(default_factory=list)
    unexpected: list[int] = field(default_factory=list)
    tail: list[int] = field(default_factory=list)
    skipped_by_guard: list[int] = field(default_factory=list)  # passed over, not trained on


@dataclass
class SourceAudit:
    """What a mixture's run consumed of one source (its samples are in the epochs' check)."""

    name: str
    weight: float
    num_samples: int
    num_consumed: int

    @property
    def passes(self) -> float:
        return self.num_consumed / self.num_samples


@dataclass
class AuditReport:
    num_samples: int
    global_batch_size: int
    num_steps: int
    num_attempts: int
    epochs: list[EpochAudit]
    problems: list[str]
    skipped_steps: list[int] = field(default_factory=list)  # by the non-finite guard
    sources: list[SourceAudit] = field(default_factory=list)  # a mixture's, one per source

    @property
    def ok(self) -> bool:
        return not self.problems


def audit_ledger(run_dir: Path) -> AuditReport:
    """Check that every sample of every epoch was consumed exactly once across ranks/restarts,
    or skipped by the non-finite guard (listed as such, never counted as missing).

    A complete epoch must consume every sample except its reported tail; a partial (last)
    epoch must consume exactly the prefix of its permutation that its steps cover.

    Raises:
        DataError: when ``run_dir`` has no ledger.
    """
    directory = run_dir / "ledger"
    if not (directory / "meta.json").is_file():
        raise DataError(
            f"{run_dir}: no ledger found (expected {directory}/meta.json); train with "
            "--set data.ledger=true to record one"
        )
    meta = json.loads((directory / "meta.json").read_text())
    num_samples, batch, seed = meta["num_samples"], meta["global_batch_size"], meta["seed"]
    order = _order_of(meta)
    attempts = _read_jsonl(directory / "attempts.jsonl")
    steps, problems = _effective_steps(directory, attempts)
    steps_per_epoch = num_samples // batch
    # The run covered steps 0..last; each step belongs to epoch step // steps_per_epoch.
    num_run_steps = max(steps, default=-1) + 1
    by_epoch: dict[int, list[int]] = {
        epoch: [] for epoch in range(-(-num_run_steps // steps_per_epoch))
    }
    skipped_ids: dict[int, list[int]] = {epoch: [] for epoch in by_epoch}
    skipped_steps: list[int] = []
    for step in range(num_run_steps):
        if step not in steps:
            problems.append(f"step {step}: no rank recorded it (skipped or lost)")
            continue
        epoch, sample_ids, skipped = steps[step]
        if skipped:
            skipped_steps.append(step)
            skipped_ids[step // steps_per_epoch].extend(sample_ids)
        if epoch != step // steps_per_epoch:
            problems.append(
                f"step {step}: recorded in epoch {epoch}, expected {step // steps_per_epoch}"
            )
        if len(sample_ids) != batch:
            problems.append(f"step {step}: {len(sample_ids)} samples recorded, expected {batch}")
        by_epoch[step // steps_per_epoch].extend(sample_ids)
    epochs = []
    for epoch, consumed in by_epoch.items():
        permutation = epoch_permutation(
            seed=seed, epoch=epoch, num_samples=num_samples, order=order
        )
        epoch_steps = min(steps_per_epoch, num_run_steps - epoch * steps_per_epoch)
        complete = epoch_steps == steps_per_epoch
        expected = permutation[: epoch_steps * batch]
        audit = _audit_epoch(epoch, consumed, expected.tolist(), complete=complete)
        audit.tail = permutation[steps_per_epoch * batch :].tolist() if complete else []
        audit.skipped_by_guard = sorted(skipped_ids[epoch])
        problems.extend(_describe(audit))
        epochs.append(audit)
    return AuditReport(
        sources=_source_audits(order, by_epoch),
        num_samples=num_samples,
        global_batch_size=batch,
        num_steps=len(steps),
        num_attempts=len(attempts),
        epochs=epochs,
        problems=problems,
        skipped_steps=skipped_steps,
    )


def _audit_epoch(
    epoch: int, consumed: list[int], expected: list[int], *, complete: bool
) -> EpochAudit:
    # A mixture's epoch may hold a sample of a small source more than once: counts compare.
    counts, wanted = Counter(consumed), Counter(expected)
    return EpochAudit(
        epoch=epoch,
        num_consumed=len(consumed),
        complete=complete,
        duplicates={s: n for s, n in sorted(counts.items()) if n > max(1, wanted[s])},
        missing=sorted(sample for sample, n in wanted.items() if counts[sample] < n),
        unexpected=sorted(counts.keys() - wanted.keys()),
    )


def _source_audits(
    order: SampleOrder | MixtureOrder | None, by_epoch: dict[int, list[int]]
) -> list[SourceAudit]:
    if not isinstance(order, MixtureOrder):
        return []
    first = order.first_sample()
    consumed = [0] * len(order.names)
    for ids in by_epoch.values():
        sources = np.searchsorted(first, np.asarray(ids, dtype=np.int64), side="right") - 1
        for k, n in Counter(sources.tolist()).items():
            consumed[k] += n
    return [
        SourceAudit(name=name, weight=weight, num_samples=size, num_consumed=count)
        for name, weight, size, count in zip(
            order.names, order.weights, order.source_samples, consumed, strict=True
        )
    ]


def _describe(audit: EpochAudit) -> list[str]:
    problems = []
    if audit.duplicates:
        shown = ", ".join(f"{s}×{n}" for s, n in list(audit.duplicates.items())[:10])
        problems.append(
            f"epoch {audit.epoch}: {len(audit.duplicates)} samples consumed more "
            f"than once ({shown})"
        )
    if audit.missing:
        problems.append(
            f"epoch {audit.epoch}: {len(audit.missing)} samples never consumed "
            f"({', '.join(map(str, audit.missing[:10]))})"
        )
    if audit.unexpected:
        problems.append(
            f"epoch {audit.epoch}: {len(audit.unexpected)} samples consumed out of "
            f"order ({', '.join(map(str, audit.unexpected[:10]))})"
        )
    return problems


def _effective_steps(
    directory: Path, attempts: list[dict[str, Any]]
) -> tuple[dict[int, tuple[int, list[int], bool]], list[str]]:
    """Per step, the epoch, all ranks' sample ids and whether the guard skipped it, keeping
    only steps not rolled back."""
    order = {entry["attempt"]: number for number, entry in enumerate(attempts)}
    # A step of attempt i counts only if no later attempt restarted at or before it.
    limit: dict[str, float] = {}
    for number, entry in enumerate(attempts):
        later_starts = [later["start_step"] for later in attempts[number + 1 :]]
        limit[entry["attempt"]] = min(later_starts, default=float("inf"))
    steps: dict[int, tuple[int, list[int], bool]] = {}
    owner: dict[int, str] = {}
    skipped_on: dict[int, set[bool]] = {}
    problems: list[str] = []
    for rank_file in sorted(directory.glob("rank-*.jsonl")):
        for record in _read_jsonl(rank_file):
            attempt, step = record["attempt"], record["step"]
            if attempt not in order:
                problems.append(f"{rank_file.name}: step {step} from unknown attempt {attempt}")
                continue
            if step >= limit[attempt]:
                continue
            if step in owner and owner[step] != attempt:
                problems.append(f"step {step}: recorded by attempts {owner[step]} and {attempt}")
                continue
            owner[step] = attempt
            skipped = bool(record.get("skipped_by_guard", False))
            _, ids, _ = steps.setdefault(step, (record["epoch"], [], skipped))
            ids.extend(record["sample_ids"])
            skipped_on.setdefault(step, set()).add(skipped)
    for step, verdicts in sorted(skipped_on.items()):
        if len(verdicts) > 1:  # the guard's decision is agreed: a split means a diverged rank
            problems.append(f"step {step}: skipped by the guard on some ranks, committed on others")
    return steps, problems


def _order_of(meta: dict[str, Any]) -> SampleOrder | MixtureOrder | None:
    if "mixture" in meta:
        mixture = meta["mixture"]
        return MixtureOrder(
            names=tuple(mixture["names"]),
            weights=tuple(float(w) for w in mixture["weights"]),
            source_samples=tuple(int(n) for n in mixture["source_samples"]),
        )
    if "shuffle" not in meta:
        return None
    return SampleOrder(
        window_shards=int(meta["shuffle"]["window_shards"]),
        shard_samples=tuple(int(n) for n in meta["shuffle"]["shard_samples"]),
    )


def _write_meta(
    directory: Path,
    *,
    num_samples: int,
    global_batch_size: int,
    seed: int,
    order: SampleOrder | MixtureOrder | None,
) -> None:
    meta: dict[str, Any] = {
        "version": LEDGER_VERSION,
        "num_samples": num_samples,
        "global_batch_size": global_batch_size,
        "seed": seed,
    }
    if isinstance(order, MixtureOrder):
        meta["mixture"] = order.describe()
    elif order is not None and not order.is_global:  # the global order records nothing more
        meta["shuffle"] = order.describe()
    path = directory / "meta.json"
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != meta:
            raise DataError(
                f"{path}: this run dir's ledger was recorded with {existing}, this run has "
                f"{meta}; use a new --run-dir"
            )
        return
    path.write_text(json.dumps(meta, indent=2))


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write carries no committed step
    return records
