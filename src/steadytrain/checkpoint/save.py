"""Save a checkpoint and commit it only when every rank's part is durable (Contract 3).

Commit order: every rank writes its own files durably into a staging location; the ranks
agree (a collective) that all parts are durable; only then does rank 0 write the manifest and
make the checkpoint visible. A failed part on any rank means nothing is committed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

from torch.distributed import ProcessGroup

from steadytrain.checkpoint.contents import EventSink
from steadytrain.checkpoint.manifest import (
    Checksum,
    FileEntry,
    Manifest,
    checkpoint_name,
    checksum_of,
)
from steadytrain.checkpoint.snapshot import CheckpointSnapshot
from steadytrain.checkpoint.storage import BytesPayload, CheckpointStorage, Payload, StorageError
from steadytrain.distributed import broadcast_from_main, gather_from_all


@dataclass(frozen=True)
class SaveTimings:
    """What training waited for before a save's own write, as the checkpointer timed it.

    ``save_checkpoint`` adds its own write time and puts all of them in the
    ``checkpoint_saved`` event (docs/checkpoints.md).
    """

    asynchronous: bool  # written in the background while training goes on
    waited_s: float  # waiting for the previous background save to finish
    snapshot_s: float  # taking the snapshot (for an async save: copying to host memory)


@dataclass
class SaveOutcome:
    step: int
    committed: bool
    location: str
    seconds_blocked: float = 0.0
    error: str | None = None
    pruned: list[str] = field(default_factory=list)


def write_snapshot(
    storage: CheckpointStorage,
    snapshot: CheckpointSnapshot,
    *,
    events: EventSink,
    group: ProcessGroup | None = None,
    timings: SaveTimings | None = None,
) -> SaveOutcome:
    """Write and commit a snapshot (a collective on ``group``, even when this rank's files
    cannot be laid out: then the save fails on every rank); ``timings`` as in
    ``save_checkpoint``."""
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
        timings=timings,
    )


def save_checkpoint(
    storage: CheckpointStorage,
    *,
    step: int,
    rank: int,
    files: Mapping[str, Payload | bytes],
    manifest: Manifest,
    events: EventSink,
    group: ProcessGroup | None = None,
    failure: str | None = None,
    timings: SaveTimings | None = None,
) -> SaveOutcome:
    """Write this rank's ``files`` and commit the checkpoint if every rank succeeded.

    A collective: every rank must call it for the same step, even one whose files could not
    be prepared (it passes ``failure`` instead). Errors are reported in the outcome and as an
    event, never raised: training goes on, nothing is committed. Each file's checksum is
    computed from the very chunks written.

    The ``checkpoint_saved`` event holds ``write_s``, the seconds from this call to the
    commit (every rank's part durable, the manifest written); with ``timings`` also
    ``async_save``, ``waited_s`` and ``blocked_s``, the seconds training was blocked besides
    the wait: the snapshot, and for a synchronous save the write as well.
    """
    started = time.perf_counter()
    name = checkpoint_name(step)
    token = broadcast_from_main(uuid.uuid4().hex[:8], group=group)  # collective
    error = f"rank {rank}: {failure}" if failure is not None else None
    entries: dict[str, FileEntry] = {}
    location = ""
    if error is None:
        try:
            location = storage.staging_location(name, token=token)
            for filename, data in files.items():
                payload = _Checksummed(BytesPayload(data) if isinstance(data, bytes) else data)
                storage.write_file(location, filename, payload)
                entries[filename] = FileEntry(size=payload.size, checksum=payload.checksum())
        except Exception as caught:  # storage errors, and payloads that fail to produce bytes
            error = f"rank {rank}: {caught}"
    # Agreement: the checkpoint is committed only if every rank's part is durable.
    reports = gather_from_all((error, entries), group=group)  # collective
    errors = [report_error for report_error, _ in reports if report_error]
    committed = False
    if rank == 0:
        committed, error = _commit(storage, location, name, manifest, reports, errors)
        if committed:
            events.emit(
                "checkpoint_saved",
                step=step,
                location=storage.describe(name),
                num_files=sum(len(files) for _, files in reports),
                **_timing_fields(timings, write_s=time.perf_counter() - started),
            )
        else:
            events.emit("checkpoint_failed", step=step, reason=error)
    committed, error = broadcast_from_main((committed, error), group=group)  # collective
    return SaveOutcome(step=step, committed=committed, location=storage.describe(name), error=error)


def _timing_fields(timings: SaveTimings | None, *, write_s: float) -> dict[str, object]:
    if timings is None:
        return {"write_s": write_s}
    blocked_s = timings.snapshot_s + (0.0 if timings.asynchronous else write_s)
    return {
        "async_save": timings.asynchronous,
        "waited_s": timings.waited_s,
        "blocked_s": blocked_s,
        "write_s": write_s,
    }


class _Checksummed:
    """A payload that checksums its bytes as storage takes them.

    Each pass over ``chunks()`` starts a new checksum (a retried upload starts over); the last
    complete pass is the one that counts.
    """

    def __init__(self, payload: Payload) -> None:
        self._payload = payload
        self._checksum: str | None = None

    @property
    def size(self) -> int:
        return self._payload.size

    def chunks(self) -> Iterator[memoryview]:
        running = Checksum()
        for chunk in self._payload.chunks():
            running.update(chunk)
            yield chunk
        self._checksum = running.value()

    def checksum(self) -> str:
        """The checksum of the last complete pass (one more pass if storage made none)."""
        return self._checksum or checksum_of(self._payload.chunks())


def _commit(
    storage: CheckpointStorage,
    location: str,
    name: str,
    manifest: Manifest,
    reports: list[tuple[str | None, dict[str, FileEntry]]],
    errors: list[str],
) -> tuple[bool, str | None]:
    if errors:
        if location:  # empty when rank 0 never got as far as staging
            storage.discard(location)
        return False, "; ".join(errors)
    all_files: dict[str, FileEntry] = {}
    for _, entries in reports:
        all_files.update(entries)
    try:
        storage.commit(location, name, replace(manifest, files=all_files).to_json().encode())
    except (StorageError, OSError) as caught:
        storage.discard(location)
        return False, f"commit: {caught}"
    return True, None
