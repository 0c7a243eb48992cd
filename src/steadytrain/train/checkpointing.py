"""Checkpoint the training state and restore it: the glue between ``train`` and ``checkpoint``.

What a checkpoint holds (Contract 3): model, optimizer, LR scheduler, sampler position,
step/sample/token counters, every rank's RNG states, and the config (identity fields and
fingerprint, plus the operational fields for the record).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import steadytrain
from steadytrain.checkpoint import (
    CheckpointStorage,
    CorruptCheckpoint,
    LocalStorage,
    Manifest,
    SaveOutcome,
    find_restorable,
    rank_stem,
    read_parts,
    save_checkpoint,
    step_of,
    verify_checkpoint,
)
from steadytrain.checkpoint.object_store import ObjectStorage, redact_url
from steadytrain.checkpoint.protocol import PartsSnapshot, snapshot_parts
from steadytrain.checkpoint.storage import Payload
from steadytrain.config import (
    Config,
    ConfigError,
    UserError,
    identity_differences,
    identity_fields,
    identity_fingerprint,
    operational_fields,
    usable_storage_options,
)
from steadytrain.distributed import (
    broadcast_from_main,
    capture_rng_state,
    gather_from_all,
    rank_seed,
    restore_rng_state,
    seed_all,
)
from steadytrain.train.state import TrainState


class CheckpointRefused(UserError):
    """The chosen checkpoint cannot be restored into this run."""


@dataclass
class ResumeRequest:
    """How ``train`` was asked to resume: automatically, from a given path, or not at all."""

    enabled: bool = True
    from_path: str | None = None


def open_storage(config: Config) -> CheckpointStorage:
    """The storage named by ``checkpoint.uri`` (default ``RUN_DIR/checkpoints``).

    Raises:
        ConfigError: when the object store's fsspec driver is missing or rejects the URL.
    """
    return _storage_at(config.checkpoint.uri or str(Path(config.run_dir) / "checkpoints"), config)


def _storage_at(uri: str, config: Config) -> CheckpointStorage:
    if "://" not in uri or uri.startswith("file://"):
        return LocalStorage(Path(uri.removeprefix("file://")).expanduser().resolve())
    try:
        return ObjectStorage(
            uri,
            storage_options=usable_storage_options(config.checkpoint.storage_options),
            max_attempts=config.checkpoint.max_attempts,
        )
    except ImportError as error:
        raise ConfigError(
            f"checkpoint.uri: {redact_url(uri)} needs an fsspec driver that is not installed "
            f"({error}); install it, e.g. pip install 'steadytrain[s3]'"
        ) from None
    except (ValueError, TypeError) as error:
        raise ConfigError(f"checkpoint.uri: {redact_url(uri)} is not usable ({error})") from None


def check_free_space(storage: CheckpointStorage, parts: Any) -> str | None:
    """Refuse to start when the destination cannot hold two checkpoints; else maybe warn.

    The size is estimated from the parameters: weights plus two AdamW moments, in their dtype.

    Returns:
        A warning when fewer than ``keep_last + 1`` checkpoints fit, else None.

    Raises:
        ConfigError: when fewer than two fit.
    """
    free = storage.free_bytes()
    if free is None:
        return None
    parameters = list(parts.model.unwrapped.parameters())
    estimate = 3 * sum(p.numel() * p.element_size() for p in parameters) + 2**20
    keep = parts.config.checkpoint.keep_last
    where = storage.describe("")
    if free < 2 * estimate:
        raise ConfigError(
            f"checkpoint.uri: {where} has {free / 2**20:,.0f} MiB free, less than two "
            f"checkpoints of about {estimate / 2**20:,.0f} MiB; free space or choose another "
            "checkpoint.uri"
        )
    if free < (keep + 1) * estimate:
        return (
            f"{where} has room for only {free // estimate} checkpoints of about "
            f"{estimate / 2**20:,.0f} MiB (checkpoint.keep_last={keep} needs {keep + 1})"
        )
    return None


@dataclass
class TrainingSnapshot:
    """One rank's share of a checkpoint, in host memory at a step boundary."""

    step: int
    rank: int
    parts: list[PartsSnapshot]
    manifest: Manifest


def snapshot_training_state(
    parts: Any,
    state: TrainState,
    *,
    copy: bool,
    reuse: list[PartsSnapshot] | None = None,
    host: bool = True,
) -> TrainingSnapshot:
    """Everything that must survive a restart, in host memory (the blocking part of a save).

    ``copy=True`` (async saves) copies every tensor, so training may go on while it is
    written, into the tensors of ``reuse`` (the previous snapshot's parts, written already,
    or ``host_buffers_like`` them) where they match; ``copy=False`` (synchronous saves) writes
    CPU tensors from where they are. ``host=False`` with ``copy=False``: a template of the
    snapshot's layout, nothing copied.
    """
    spares = {part.stem: part for part in reuse or []}
    runtime = parts.runtime
    snapshots = []
    if runtime.is_main:
        # Replicated under DDP: rank 0's copy is everyone's.
        shared = {
            "model": parts.model.unwrapped.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "sampler": parts.sampler.state_dict(),
            "train": state.state_dict(),
        }
        snapshots.append(
            snapshot_parts(shared, stem="shared", copy=copy, reuse=spares.get("shared"), host=host)
        )
    rng = {"rng": capture_rng_state()}
    stem = rank_stem(runtime.rank)
    snapshots.append(snapshot_parts(rng, stem=stem, copy=copy, reuse=spares.get(stem), host=host))
    return TrainingSnapshot(
        step=state.step,
        rank=runtime.rank,
        parts=snapshots,
        manifest=_manifest(
            parts.config, runtime.world_size, parts.layout.global_batch_size, step=state.step
        ),
    )


def write_snapshot(
    storage: CheckpointStorage, snapshot: TrainingSnapshot, *, events: Any, group: Any = None
) -> SaveOutcome:
    """Write and commit a snapshot (a collective on ``group``, even when this rank's files
    cannot be laid out: then the save fails on every rank)."""
    files: dict[str, Payload] = {}
    failure = None
    try:
        for part in snapshot.parts:
            files.update(part.to_files())
    except (TypeError, ValueError) as error:  # e.g. a dtype safetensors cannot hold
        files, failure = {}, str(error)
    return save_checkpoint(
        storage,
        step=snapshot.step,
        rank=snapshot.rank,
        files=files,
        manifest=snapshot.manifest,
        events=events,
        group=group,
        failure=failure,
    )


def restore_training_state(
    storage: CheckpointStorage, parts: Any, state: TrainState, *, request: ResumeRequest
) -> str | None:
    """Load the newest good checkpoint (or the requested one) into the parts (a collective).

    Rank 0 picks the newest checkpoint whose manifest and file sizes check out; every rank
    then reads its files once, checking formats and checksums as it goes. Only when every rank read
    everything intact is any state applied; otherwise the checkpoint is reported and the next
    older one is tried.

    Returns the restored checkpoint's location, or None when training starts fresh.

    Raises:
        CheckpointRefused: the requested checkpoint is bad, or the identity differs.
    """
    runtime = parts.runtime
    if not request.enabled:
        return None
    source, only = storage, None
    if request.from_path is not None:
        parent, _, only = request.from_path.rstrip("/").rpartition("/")
        source = _storage_at(parent or ".", parts.config)
    if runtime.is_main:
        _remove_leftovers(storage, events=parts.events)
    older_than: int | None = None
    while True:
        name, manifest = _agree_on_candidate(source, only=only, older_than=older_than, parts=parts)
        if name is None or manifest is None:
            return None
        location = source.describe(name)
        _check_compatible(manifest, parts.config, location=location, parts=parts)
        loaded, problem, corrupt = _read_checkpoint(source, name, manifest, parts)
        # Collective: apply only what every rank read intact.
        failures = [
            (rank, report[0], report[1])
            for rank, report in enumerate(gather_from_all((problem, corrupt)))
            if report[0] is not None
        ]
        if not failures:
            _apply(loaded, manifest, parts, state)
            break
        rank, problem, corrupt = failures[0]
        if not corrupt:
            raise CheckpointRefused(
                f"cannot read checkpoint {location} on rank {rank} ({problem}); this is not "
                "the checkpoint's fault, so no older one is tried: fix the cause and rerun, or "
                "start fresh with --no-resume",
                reported_elsewhere=not runtime.is_main,
            )
        if only is not None:
            raise CheckpointRefused(
                f"--resume-from {location}: rank {rank} could not read it ({problem})",
                reported_elsewhere=not runtime.is_main,
            )
        if runtime.is_main:
            parts.events.emit(
                "checkpoint_rejected",
                checkpoint=name,
                problems=[f"rank {rank}: {problem}"],
                action="falling back to an older checkpoint",
            )
        older_than = step_of(name)
    if runtime.is_main:
        parts.events.emit(
            "resume",
            checkpoint=location,
            step=state.step,
            saved_world_size=manifest.world_size,
            world_size=runtime.world_size,
        )
    return location


def _remove_leftovers(storage: CheckpointStorage, *, events: Any) -> None:
    """Delete what crashed saves left behind, and say so in events.

    A step without a manifest (an object-store upload cut short) is a rejected checkpoint;
    staging directories are debris.
    """
    debris = []
    for name in storage.remove_leftovers():
        if step_of(name) is None:
            debris.append(name)
            continue
        events.emit(
            "checkpoint_rejected",
            checkpoint=name,
            problems=["no manifest.json: the save never committed"],
            action="removed",
        )
    if debris:
        events.emit("checkpoint_debris_removed", names=debris)


def _agree_on_candidate(
    source: CheckpointStorage, *, only: str | None, older_than: int | None, parts: Any
) -> tuple[str | None, Manifest | None]:
    """Rank 0's choice of the next checkpoint to try, on every rank (a collective)."""
    choice: tuple[str, str] | None = None  # (name, manifest json)
    error: str | None = None
    if parts.runtime.is_main:
        try:
            choice = _choose(source, only=only, older_than=older_than, events=parts.events)
        except CheckpointRefused as refused:
            error = str(refused)
    choice, error = broadcast_from_main((choice, error))
    if error is not None:
        raise CheckpointRefused(error, reported_elsewhere=not parts.runtime.is_main)
    if choice is None:
        return None, None
    return choice[0], Manifest.from_json(choice[1])


def _choose(
    source: CheckpointStorage, *, only: str | None, older_than: int | None, events: Any
) -> tuple[str, str] | None:
    if only is not None:
        manifest, problems = verify_checkpoint(source, only, read_files=False)
        if manifest is None or problems:
            raise CheckpointRefused(
                f"--resume-from {source.describe(only)}: not a good checkpoint "
                f"({'; '.join(problems)}); pick one that 'steadytrain checkpoints verify' "
                "reports as good"
            )
        return only, manifest.to_json()
    found = find_restorable(
        source, events=events, emit=True, read_files=False, older_than=older_than
    )
    if found is None:
        return None
    name, manifest = found
    return name, manifest.to_json()


def _read_checkpoint(
    source: CheckpointStorage, name: str, manifest: Manifest, parts: Any
) -> tuple[dict[str, Any], str | None, bool]:
    """This rank's share of a checkpoint, read once and checked: the shared state, and its
    own RNG states when the world size is unchanged.

    Never raises, so that every rank reaches the agreement after it. Returns what was read,
    the problem if any, and whether the problem is the checkpoint's fault (corruption) rather
    than this machine's (an I/O error, out of memory).
    """
    runtime = parts.runtime
    loaded: dict[str, Any] = {}
    try:
        loaded["shared"] = read_parts(source, name, manifest, stem="shared")
        if manifest.world_size == runtime.world_size:
            stem = rank_stem(runtime.rank)
            rank_parts = read_parts(source, name, manifest, stem=stem)
            if "rng" not in rank_parts:
                return {}, f"{stem}.json: no RNG state", True
            loaded["rng"] = rank_parts["rng"]
    except CorruptCheckpoint as corrupt:
        return {}, str(corrupt), True
    except Exception as error:
        return {}, f"{type(error).__name__}: {error}", False
    return loaded, None, False


def _apply(loaded: dict[str, Any], manifest: Manifest, parts: Any, state: TrainState) -> None:
    shared = loaded["shared"]
    parts.model.unwrapped.load_state_dict(shared["model"])
    parts.optimizer.load_state_dict(shared["optimizer"])
    parts.scheduler.load_state_dict(shared["scheduler"])
    parts.sampler.load_state_dict(shared["sampler"])
    state.load_state_dict(shared["train"])
    if "rng" in loaded:
        restore_rng_state(loaded["rng"])
        return
    # Per-rank streams cannot be mapped onto another world size: reseed reproducibly.
    seed_all(rank_seed(parts.config.seed + state.step, rank=parts.runtime.rank))
    if parts.runtime.is_main:
        parts.events.emit(
            "rng_reseeded",
            reason="world size changed",
            saved_world_size=manifest.world_size,
            world_size=parts.runtime.world_size,
        )


def _check_compatible(manifest: Manifest, config: Config, *, location: str, parts: Any) -> None:
    differences = identity_differences(manifest.identity, identity_fields(config))
    if differences:
        raise CheckpointRefused(
            f"checkpoint {location} belongs to a run with another identity ("
            + "; ".join(differences)
            + "); restore it with the same settings, or start fresh with --no-resume or a new "
            "--run-dir",
            reported_elsewhere=not parts.runtime.is_main,
        )
    if manifest.global_batch_size != parts.layout.global_batch_size:
        raise CheckpointRefused(
            f"checkpoint {location}: global batch {manifest.global_batch_size} differs from "
            f"{parts.layout.global_batch_size}",
            reported_elsewhere=not parts.runtime.is_main,
        )
    if parts.runtime.is_main:
        changed = identity_differences(manifest.operational, operational_fields(config))
        if changed:
            parts.events.emit("config_changed", checkpoint=location, changes=changed)


def _manifest(config: Config, world_size: int, global_batch_size: int, *, step: int) -> Manifest:
    return Manifest(
        step=step,
        time=time.time(),
        identity_fingerprint=identity_fingerprint(config),
        identity=identity_fields(config),
        world_size=world_size,
        global_batch_size=global_batch_size,
        operational=operational_fields(config),
        versions={
            "steadytrain": steadytrain.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    )
