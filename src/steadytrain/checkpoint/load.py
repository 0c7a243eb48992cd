"""Restore the newest good checkpoint: clean-up, an agreed candidate, checked reads, fallback.

Fallback policy: a checkpoint whose files do not read back as written (missing, truncated,
flipped bytes, malformed) is the checkpoint's fault, so it is reported and the next older one
is tried. Any other read error (an I/O error, out of memory, an object store that gave up) is
not: resume stops with that error rather than silently going back further.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from steadytrain.checkpoint.contents import (
    CheckpointContents,
    EventSink,
    RunIdentity,
    Stateful,
    explained_by,
    load_template,
)
from steadytrain.checkpoint.discovery import (
    find_restorable,
    recorded_overrides,
    remove_leftovers,
    verify_checkpoint,
)
from steadytrain.checkpoint.location import open_storage_for
from steadytrain.checkpoint.manifest import (
    Manifest,
    step_of,
)
from steadytrain.checkpoint.read import CorruptCheckpoint, read_parts
from steadytrain.checkpoint.snapshot import SHARED_STEM, rank_stem
from steadytrain.checkpoint.storage import CheckpointStorage
from steadytrain.config import (
    UserError,
    describe_changes,
    field_changes,
    identity_differences,
    identity_fields,
    operational_fields,
)
from steadytrain.distributed import broadcast_from_main, gather_from_all

T = TypeVar("T")


class CheckpointRefused(UserError):
    """The chosen checkpoint cannot be restored into this run."""


@dataclass(frozen=True)
class ResumeRequest:
    """How ``train`` was asked to resume: automatically, from a given path, or not at all.

    ``allow_changes``: identity fields (dotted names) that may differ from the checkpoint's.
    """

    enabled: bool = True
    from_path: str | None = None
    allow_changes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Restored:
    """What a resume restored."""

    location: str
    step: int
    saved_world_size: int
    per_rank_restored: bool  # False: the world size changed, per-rank parts were not loaded
    identity_changes: dict[str, tuple[Any, Any]]  # allowed changes at this start: old, new
    # This rank's seconds by phase (``RESTORE_PHASES``), of the attempt that succeeded.
    phase_seconds: dict[str, float] = field(default_factory=dict)


# The phases of a restore, in order: finding the checkpoint (rank 0 decides, the others wait),
# reading this rank's files and building its states (``read``; ``read_files``: the seconds
# storage reads and checksums took, mostly in a background thread while the states were
# built; ``read_wait``: the part of ``read`` spent waiting for that data), the agreement that
# every rank read intact (the wait for the slowest), loading the states into the parts, and
# the agreement that they fit.
RESTORE_PHASES = ("find", "read", "read_files", "read_wait", "agree_read", "apply", "agree_apply")


class _Clock:
    """Seconds per phase, each phase timed from the end of the previous one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.mark
        self.mark = now


def restore_checkpoint(
    storage: CheckpointStorage,
    contents: CheckpointContents,
    *,
    identity: RunIdentity,
    request: ResumeRequest,
    rank: int,
    events: EventSink,
) -> Restored | None:
    """Load the newest good checkpoint (or the requested one) into ``contents`` (a collective).

    Rank 0 picks the newest checkpoint whose manifest and file sizes check out; every rank
    then reads its files once, checking formats and checksums as it goes. Only when every
    rank read everything intact is any state applied; otherwise the checkpoint is reported
    and the next older one is tried. On success ``identity.overrides`` holds every identity
    change allowed so far, so later manifests list them.

    Returns what was restored, or None when training starts fresh.

    Raises:
        CheckpointRefused: the requested checkpoint is bad, the identity differs (beyond
            ``request.allow_changes`` and the changes the run's checkpoints record), storage
            cannot be read, or the state does not fit the parts. Raised on every rank.
    """
    if not request.enabled:
        return None
    clock = _Clock()
    source, only = storage, None
    if request.from_path is not None:
        parent, _, only = request.from_path.rstrip("/").rpartition("/")
        source = open_storage_for(parent or ".", identity.config)
    older_than: int | None = None
    while True:
        first = older_than is None  # one agreement: rank 0 cleans up first, then chooses
        choice = _decided_by_main(
            rank,
            functools.partial(
                _choose,
                source,
                only=only,
                older_than=older_than,
                events=events,
                clean_up=storage if first else None,
            ),
            what=f"{'cleaning up and ' if first else ''}finding a checkpoint in "
            f"{source.describe('')}",
        )
        if choice is None:
            return None
        name, manifest_json, history = choice
        manifest = Manifest.from_json(manifest_json)
        clock.lap("find")
        restored = _restore_from(
            source,
            name,
            manifest,
            contents,
            identity,
            request,
            history,
            rank=rank,
            events=events,
            clock=clock,
        )
        if restored is not None:
            return restored
        clock = _Clock()  # the phases of the attempt that succeeds
        older_than = step_of(name)


def _restore_from(
    source: CheckpointStorage,
    name: str,
    manifest: Manifest,
    contents: CheckpointContents,
    identity: RunIdentity,
    request: ResumeRequest,
    history: list[dict[str, Any]],
    *,
    rank: int,
    events: EventSink,
    clock: _Clock,
) -> Restored | None:
    """Restore checkpoint ``name`` (a collective); None when it is corrupt and an older one
    should be tried.

    Raises:
        CheckpointRefused: see ``restore_checkpoint``.
    """
    is_main = rank == 0
    location = source.describe(name)
    try:
        changes = _check_compatible(
            manifest, identity, allowed=request.allow_changes, history=history, location=location
        )
    except CheckpointRefused as refused:
        refused.reported_elsewhere = not is_main  # every rank refuses; rank 0 says why
        raise
    if is_main:
        operational = identity_differences(
            manifest.operational, operational_fields(identity.config)
        )
        if operational:
            events.emit("config_changed", checkpoint=location, changes=operational)
    same_world_size = manifest.world_size == identity.world_size
    loaded, problem, corrupt = _read_checkpoint(
        source, name, manifest, contents, rank=rank, with_per_rank=same_world_size, clock=clock
    )
    clock.lap("read")
    # Collective: apply only what every rank read intact.
    failures = [
        (failed_rank, report[0], report[1])
        for failed_rank, report in enumerate(gather_from_all((problem, corrupt)))
        if report[0] is not None
    ]
    clock.lap("agree_read")
    if failures:
        # An error that is not the checkpoint's fault, on any rank, stops the resume.
        failed_rank, problem, corrupt = min(failures, key=lambda failure: failure[2])
        if not corrupt:
            raise CheckpointRefused(
                f"cannot read checkpoint {location} on rank {failed_rank} ({problem}); this is "
                "not the checkpoint's fault, so no older one is tried: fix the cause and rerun, "
                "or start fresh with --no-resume",
                reported_elsewhere=not is_main,
            )
        if request.from_path is not None:
            raise CheckpointRefused(
                f"--resume-from {location}: rank {failed_rank} could not read it ({problem})",
                reported_elsewhere=not is_main,
            )
        if is_main:
            events.emit(
                "checkpoint_rejected",
                checkpoint=name,
                problems=[f"rank {failed_rank}: {problem}"],
                action="falling back to an older checkpoint",
            )
        return None
    misfit = _apply(loaded, contents, location=location, changes=changes)
    clock.lap("apply")
    # Collective: a part that does not fit on any rank (its own RNG state, say) stops all.
    for failed_rank, problem in enumerate(gather_from_all(misfit)):
        if problem is not None:
            raise CheckpointRefused(problem, reported_elsewhere=rank != failed_rank)
    clock.lap("agree_apply")
    new_overrides = [
        {"step": manifest.step, "field": field, "old": old, "new": new}
        for field, (old, new) in changes.items()
        if not explained_by(history, field, old=old, new=new)
    ]
    identity.overrides = [*history, *new_overrides]
    if is_main:
        if new_overrides:
            events.emit(
                "identity_override", checkpoint=location, step=manifest.step, changes=new_overrides
            )
        events.emit(
            "resume",
            checkpoint=location,
            step=manifest.step,
            saved_world_size=manifest.world_size,
            world_size=identity.world_size,
        )
    return Restored(
        location=location,
        step=manifest.step,
        saved_world_size=manifest.world_size,
        per_rank_restored="per_rank" in loaded,
        identity_changes=changes,
        phase_seconds=clock.seconds,
    )


def _decided_by_main(rank: int, decide: Callable[[], T], *, what: str) -> T:
    """``decide()`` run on rank 0, its result on every rank (a collective).

    Any error on rank 0 refuses the resume on every rank as one line, so no rank is left
    waiting in a collective that rank 0 never joins.
    """
    value: T | None = None
    error: str | None = None
    if rank == 0:
        try:
            value = decide()
        except CheckpointRefused as refused:
            error = str(refused)
        except Exception as failure:  # storage that cannot be listed or read
            error = (
                f"{what}: {type(failure).__name__}: {failure}; fix the cause and rerun, or "
                "start fresh with --no-resume"
            )
    value, error = broadcast_from_main((value, error))
    if error is not None:
        raise CheckpointRefused(error, reported_elsewhere=rank != 0)
    return value  # type: ignore[return-value]


def _choose(
    source: CheckpointStorage,
    *,
    only: str | None,
    older_than: int | None,
    events: EventSink,
    clean_up: CheckpointStorage | None = None,
) -> tuple[str, str, list[dict[str, Any]]] | None:
    """The next checkpoint to try: its name, manifest (JSON) and the run's recorded
    identity changes; first the leftovers of crashed saves are removed from ``clean_up``."""
    if clean_up is not None:
        remove_leftovers(clean_up, events=events)
    if only is not None:
        manifest, problems = verify_checkpoint(source, only, read_files=False)
        if manifest is None or problems:
            raise CheckpointRefused(
                f"--resume-from {source.describe(only)}: not a good checkpoint "
                f"({'; '.join(problems)}); pick one that 'steadytrain checkpoints verify' "
                "reports as good"
            )
        return only, manifest.to_json(), recorded_overrides(source)
    found = find_restorable(
        source, events=events, emit=True, read_files=False, older_than=older_than
    )
    if found is None:
        return None
    name, manifest = found
    return name, manifest.to_json(), recorded_overrides(source)


def _check_compatible(
    manifest: Manifest,
    identity: RunIdentity,
    *,
    allowed: tuple[str, ...],
    history: list[dict[str, Any]],
    location: str,
) -> dict[str, tuple[Any, Any]]:
    """Refuse a checkpoint of another identity; returns the accepted changes (old, new).

    A change is accepted when ``--allow-change`` names its field, or when the run's
    checkpoints record it (a fallback to a checkpoint from before an accepted change).

    Raises:
        CheckpointRefused: an identity field differs and was not allowed to, or the global
            batch differs.
    """
    changes = field_changes(manifest.identity, identity_fields(identity.config))
    refused = {
        field: (old, new)
        for field, (old, new) in changes.items()
        if field not in allowed and not explained_by(history, field, old=old, new=new)
    }
    if refused:
        raise CheckpointRefused(
            f"checkpoint {location} belongs to a run with another identity ("
            + "; ".join(describe_changes(refused))
            + "); restore it with the same settings, accept a deliberate change with "
            "--allow-change FIELD, or start fresh with --no-resume or a new --run-dir"
        )
    if (
        manifest.global_batch_size != identity.global_batch_size
        and "train.global_batch_size" not in changes
    ):
        raise CheckpointRefused(
            f"checkpoint {location}: global batch {manifest.global_batch_size} differs from "
            f"{identity.global_batch_size}"
        )
    return changes


def _read_checkpoint(
    source: CheckpointStorage,
    name: str,
    manifest: Manifest,
    contents: CheckpointContents,
    *,
    rank: int,
    with_per_rank: bool,
    clock: _Clock,
) -> tuple[dict[str, dict[str, Any]], str | None, bool]:
    """This rank's share of a checkpoint, read once and checked: the replicated parts, and its
    own parts when the world size is unchanged.

    Never raises, so that every rank reaches the agreement after it. Returns what was read
    (``{"replicated": …, "per_rank": …}``), the problem if any, and whether the problem is
    the checkpoint's fault (corruption) rather than this machine's (an I/O error, out of
    memory).
    """
    stems = {"replicated": (SHARED_STEM, contents.replicated)}
    if with_per_rank:
        stems["per_rank"] = (rank_stem(rank), contents.per_rank)
    loaded: dict[str, dict[str, Any]] = {}
    try:
        for kind, (stem, expected) in stems.items():
            states = read_parts(
                source,
                name,
                manifest,
                stem=stem,
                templates=functools.partial(_templates, expected),
                rank=rank if with_per_rank else None,  # saved at this world size
                timings=clock.seconds,
            )
            missing = sorted(set(expected) - set(states))
            if missing:
                return {}, f"{stem}.json: no {', '.join(missing)} state", True
            loaded[kind] = states
    except CorruptCheckpoint as corrupt:
        return {}, str(corrupt), True
    except Exception as error:
        return {}, f"{type(error).__name__}: {error}", False
    return loaded, None, False


def _templates(parts: Mapping[str, Stateful]) -> dict[str, Any]:
    return {name: load_template(part) for name, part in parts.items()}


def _apply(
    loaded: dict[str, dict[str, Any]],
    contents: CheckpointContents,
    *,
    location: str,
    changes: Mapping[str, Any],
) -> str | None:
    """Load every part's state; returns the problem when a state does not fit its part.

    That happens when an accepted identity change cannot apply (another model shape, other
    data); without accepted changes the identity check has ruled it out.
    """
    targets: list[tuple[Mapping[str, Stateful], dict[str, Any]]] = [
        (contents.replicated, loaded["replicated"])
    ]
    if "per_rank" in loaded:
        targets.append((contents.per_rank, loaded["per_rank"]))
    for parts, states in targets:
        for name, part in parts.items():
            try:
                part.load_state_dict(states[name])
            except (RuntimeError, ValueError, KeyError, TypeError, UserError) as error:
                accepted = ", ".join(changes) or "none"
                first_line = (str(error).strip().splitlines() or [""])[0]
                return (
                    f"checkpoint {location}: its {name} state does not fit this run "
                    f"({type(error).__name__}: {first_line}); identity changes accepted: "
                    f"{accepted}; undo the change or start fresh with --no-resume"
                )
    return None
