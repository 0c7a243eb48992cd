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
    LocalStorage,
    Manifest,
    SaveOutcome,
    decode_parts,
    find_restorable,
    rank_stem,
    save_checkpoint,
    verify_checkpoint,
)
from steadytrain.checkpoint.object_store import ObjectStorage, redact_url
from steadytrain.checkpoint.protocol import PartsSnapshot, snapshot_parts
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
from steadytrain.dist import (
    broadcast_from_main,
    capture_rng_state,
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
    """One rank's share of a checkpoint, copied to host memory at a step boundary."""

    step: int
    rank: int
    parts: list[PartsSnapshot]
    manifest: Manifest


def snapshot_training_state(parts: Any, state: TrainState) -> TrainingSnapshot:
    """Copy everything that must survive a restart to host memory (the blocking part)."""
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
        snapshots.append(snapshot_parts(shared, stem="shared"))
    snapshots.append(snapshot_parts({"rng": capture_rng_state()}, stem=rank_stem(runtime.rank)))
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
    """Serialize and commit a snapshot (a collective on ``group``)."""
    files: dict[str, bytes] = {}
    for part in snapshot.parts:
        files.update(part.to_files())
    return save_checkpoint(
        storage,
        step=snapshot.step,
        rank=snapshot.rank,
        files=files,
        manifest=snapshot.manifest,
        events=events,
        group=group,
    )


def restore_training_state(
    storage: CheckpointStorage, parts: Any, state: TrainState, *, request: ResumeRequest
) -> str | None:
    """Load the newest good checkpoint (or the requested one) into the parts (a collective).

    Returns the restored checkpoint's location, or None when training starts fresh.

    Raises:
        CheckpointRefused: the requested checkpoint is bad, or the identity differs.
    """
    runtime, config = parts.runtime, parts.config
    if not request.enabled:
        return None
    source, only = storage, None
    if request.from_path is not None:
        parent, _, only = request.from_path.rstrip("/").rpartition("/")
        source = _storage_at(parent or ".", config)
    choice: tuple[str, str] | None = None  # (name, manifest json)
    error: str | None = None
    if runtime.is_main:
        storage.remove_leftovers()
        try:
            choice = _choose(source, only=only, events=parts.events)
        except CheckpointRefused as refused:
            error = str(refused)
    choice, error = broadcast_from_main((choice, error))  # collective: one choice for all
    if error is not None:
        raise CheckpointRefused(error, reported_elsewhere=not runtime.is_main)
    if choice is None:
        return None
    name, manifest_json = choice
    manifest = Manifest.from_json(manifest_json)
    location = source.describe(name)
    _check_compatible(manifest, config, location=location, parts=parts)
    shared = decode_parts(lambda filename: source.read_file(name, filename), stem="shared")
    parts.model.unwrapped.load_state_dict(shared["model"])
    parts.optimizer.load_state_dict(shared["optimizer"])
    parts.scheduler.load_state_dict(shared["scheduler"])
    parts.sampler.load_state_dict(shared["sampler"])
    state.load_state_dict(shared["train"])
    _restore_rng(source, name, manifest, parts, state)
    if runtime.is_main:
        parts.events.emit(
            "resume",
            checkpoint=location,
            step=state.step,
            saved_world_size=manifest.world_size,
            world_size=runtime.world_size,
        )
    return location


def _choose(source: CheckpointStorage, *, only: str | None, events: Any) -> tuple[str, str] | None:
    if only is not None:
        manifest, problems = verify_checkpoint(source, only)
        if manifest is None or problems:
            raise CheckpointRefused(
                f"--resume-from {source.describe(only)}: not a good checkpoint "
                f"({'; '.join(problems)}); pick one that 'steadytrain checkpoints verify' "
                "reports as good"
            )
        return only, manifest.to_json()
    found = find_restorable(source, events=events, emit=True)
    if found is None:
        return None
    name, manifest = found
    return name, manifest.to_json()


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


def _restore_rng(
    source: CheckpointStorage, name: str, manifest: Manifest, parts: Any, state: TrainState
) -> None:
    runtime = parts.runtime
    if manifest.world_size == runtime.world_size:
        stem = rank_stem(runtime.rank)
        rank_state = decode_parts(lambda filename: source.read_file(name, filename), stem=stem)
        restore_rng_state(rank_state["rng"])
        return
    # Per-rank streams cannot be mapped onto another world size: reseed reproducibly.
    seed_all(rank_seed(parts.config.seed + state.step, rank=runtime.rank))
    if runtime.is_main:
        parts.events.emit(
            "rng_reseeded",
            reason="world size changed",
            saved_world_size=manifest.world_size,
            world_size=runtime.world_size,
        )


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
