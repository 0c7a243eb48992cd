"""Saving, verifying, choosing and pruning checkpoints (Contract 3).

Commit order: every rank writes its own files durably into a staging location; the ranks
agree (a collective) that all parts are durable; only then does rank 0 write the manifest and
make the checkpoint visible. A failed part on any rank means nothing is committed.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from steadytrain.checkpoint.codec import (
    join_tensors,
    split_tensors,
    tensors_from_bytes,
    tensors_to_bytes,
)
from steadytrain.checkpoint.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    checkpoint_name,
    sha256_of,
    step_of,
)
from steadytrain.checkpoint.storage import CheckpointStorage, StorageError
from steadytrain.dist import broadcast_from_main, gather_from_all

STATE_FORMAT_VERSION = 1


class EventSink(Protocol):
    def emit(self, kind: str, **fields: Any) -> None: ...


@dataclass
class SaveOutcome:
    step: int
    committed: bool
    location: str
    seconds_blocked: float = 0.0
    error: str | None = None
    pruned: list[str] = field(default_factory=list)


@dataclass
class PartsSnapshot:
    """Named states copied to host memory: the only part of a save that blocks training."""

    stem: str
    skeletons: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]

    def to_files(self) -> dict[str, bytes]:
        """``STEM.json`` (skeletons) + one safetensors file per part that has tensors."""
        files: dict[str, bytes] = {}
        tensor_files: dict[str, str] = {}
        for part, tensors in self.tensors.items():
            if tensors:
                shared = self.stem == "shared"
                filename = f"{part}.safetensors" if shared else f"{self.stem}-{part}.safetensors"
                files[filename] = tensors_to_bytes(tensors)
                tensor_files[part] = filename
        document = {
            "version": STATE_FORMAT_VERSION,
            "tensor_files": tensor_files,
            "parts": self.skeletons,
        }
        files[f"{self.stem}.json"] = json.dumps(document).encode()
        return files


def snapshot_parts(parts: dict[str, Any], *, stem: str) -> PartsSnapshot:
    """Copy every tensor of ``parts`` to host memory; the rest becomes a JSON skeleton."""
    skeletons: dict[str, Any] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for part, state in parts.items():
        skeletons[part], tensors[part] = split_tensors(state)
    return PartsSnapshot(stem=stem, skeletons=skeletons, tensors=tensors)


def encode_parts(parts: dict[str, Any], *, stem: str) -> dict[str, bytes]:
    """Files for a set of named states: ``STEM.json`` (skeleton) + one safetensors per part."""
    return snapshot_parts(parts, stem=stem).to_files()


def decode_parts(read: Callable[[str], bytes], *, stem: str) -> dict[str, Any]:
    """Inverse of ``encode_parts``: JSON and safetensors only, never pickle."""
    document = json.loads(read(f"{stem}.json"))
    if document.get("version") != STATE_FORMAT_VERSION:
        raise ManifestError(f"{stem}.json: unsupported state version {document.get('version')!r}")
    decoded = {}
    for part, skeleton in document["parts"].items():
        filename = document["tensor_files"].get(part)
        tensors = tensors_from_bytes(read(filename)) if filename else {}
        decoded[part] = join_tensors(skeleton, tensors)
    return decoded


def rank_stem(rank: int) -> str:
    return f"rank-{rank:05d}"


def save_checkpoint(
    storage: CheckpointStorage,
    *,
    step: int,
    rank: int,
    files: dict[str, bytes],
    manifest: Manifest,
    events: EventSink,
    group: Any = None,
) -> SaveOutcome:
    """Write this rank's ``files`` and commit the checkpoint if every rank succeeded.

    A collective: every rank must call it for the same step. Storage errors are reported in
    the outcome and as an event, never raised: training goes on, nothing is committed.
    """
    name = checkpoint_name(step)
    token = broadcast_from_main(uuid.uuid4().hex[:8], group=group)  # collective
    error: str | None = None
    entries: dict[str, FileEntry] = {}
    location = ""
    try:
        location = storage.staging_location(name, token=token)
        for filename, data in files.items():
            storage.write_file(location, filename, data)
            entries[filename] = FileEntry(size=len(data), sha256=sha256_of(data))
    except (StorageError, OSError) as caught:
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
            )
        else:
            events.emit("checkpoint_failed", step=step, reason=error)
    committed, error = broadcast_from_main((committed, error), group=group)  # collective
    return SaveOutcome(step=step, committed=committed, location=storage.describe(name), error=error)


def _commit(
    storage: CheckpointStorage,
    location: str,
    name: str,
    manifest: Manifest,
    reports: list[tuple[str | None, dict[str, FileEntry]]],
    errors: list[str],
) -> tuple[bool, str | None]:
    if errors:
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


def verify_checkpoint(storage: CheckpointStorage, name: str) -> tuple[Manifest | None, list[str]]:
    """Check completeness and checksums; returns the manifest (if readable) and problems."""
    if storage.file_size(name, MANIFEST_NAME) is None:
        return None, ["no manifest.json: the save never committed"]
    try:
        manifest = Manifest.from_json(storage.read_file(name, MANIFEST_NAME).decode())
    except (ManifestError, UnicodeDecodeError, OSError) as error:
        return None, [f"manifest.json unreadable: {error}"]
    problems = []
    if manifest.step != step_of(name):
        problems.append(f"manifest says step {manifest.step}, directory says {step_of(name)}")
    for filename, entry in sorted(manifest.files.items()):
        size = storage.file_size(name, filename)
        if size is None:
            problems.append(f"{filename}: missing")
        elif size != entry.size:
            problems.append(f"{filename}: {size} bytes, manifest says {entry.size}")
        elif _sha256_streamed(storage, name, filename) != entry.sha256:
            problems.append(f"{filename}: checksum mismatch (corrupted)")
        elif (problem := _format_problem(storage, name, filename, size)) is not None:
            problems.append(f"{filename}: {problem}")
    return manifest, problems


def _format_problem(storage: CheckpointStorage, name: str, filename: str, size: int) -> str | None:
    """Cheap structural check, so a file that is not what its name says is never loaded.

    safetensors: an 8-byte header length, a JSON header whose offsets fit the file. JSON:
    parses. Anything else is not part of our format.
    """
    if filename.endswith(".json"):
        try:
            json.loads(storage.read_file(name, filename))
        except (ValueError, UnicodeDecodeError):
            return "not valid JSON"
        return None
    if not filename.endswith(".safetensors"):
        return "unexpected file type (only .safetensors and .json are loaded)"
    head = next(storage.read_chunks(name, filename), b"")
    if len(head) < 8:
        return "not a safetensors file (too short)"
    header_size = int.from_bytes(head[:8], "little")
    if header_size <= 0 or 8 + header_size > size:
        return "not a safetensors file (bad header length)"
    header_bytes = head[8 : 8 + header_size]
    if len(header_bytes) < header_size:
        header_bytes = storage.read_file(name, filename)[8 : 8 + header_size]
    try:
        header = json.loads(header_bytes)
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        return "not a safetensors file (unreadable header)"
    if max(ends, default=0) != size - 8 - header_size:
        return "not a safetensors file (offsets do not match the size)"
    return None


def find_restorable(
    storage: CheckpointStorage, *, events: EventSink, emit: bool
) -> tuple[str, Manifest] | None:
    """The newest checkpoint that verifies; newer ones that do not are reported as events."""
    for name in reversed(storage.checkpoint_names()):
        manifest, problems = verify_checkpoint(storage, name)
        if manifest is not None and not problems:
            return name, manifest
        if emit:
            events.emit(
                "checkpoint_rejected",
                checkpoint=name,
                problems=problems,
                action="falling back to an older checkpoint",
            )
    return None


def prune_checkpoints(
    storage: CheckpointStorage, *, keep_last: int, keep_every: int, newest_good: str
) -> list[str]:
    """Delete committed checkpoints beyond the newest ``keep_last`` (milestones kept).

    ``newest_good`` (just verified or committed) is never deleted, so a good one always stays.
    """
    names = storage.checkpoint_names()
    keep = set(names[-keep_last:]) | {newest_good}
    if keep_every:
        keep |= {name for name in names if (step_of(name) or 0) % keep_every == 0}
    doomed = [name for name in names if name not in keep]
    for name in doomed:
        storage.delete(name)
    return doomed


def _sha256_streamed(storage: CheckpointStorage, name: str, filename: str) -> str:
    digest = hashlib.sha256()
    for chunk in storage.read_chunks(name, filename):
        digest.update(chunk)
    return digest.hexdigest()
