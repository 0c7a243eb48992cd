"""Find, verify and prune a storage's checkpoints; clean up what crashed saves left behind."""

from __future__ import annotations

import json
from typing import Any

from steadytrain.checkpoint.contents import EventSink
from steadytrain.checkpoint.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    checksum_matches,
    step_of,
)
from steadytrain.checkpoint.sharded import index_problems
from steadytrain.checkpoint.snapshot import SHARED_STEM, TENSOR_SUFFIX, rank_stem
from steadytrain.checkpoint.storage import CheckpointStorage
from steadytrain.checkpoint.tensorfile import Entry, TensorFileError, header_size, parse_header
from steadytrain.config import ConfigError

HEAD_BYTES = 64 * 2**10  # read first: enough for the header of a file of many tensors
SHARED_FILE = f"{SHARED_STEM}.json"


def verify_checkpoint(
    storage: CheckpointStorage, name: str, *, read_files: bool = True
) -> tuple[Manifest | None, list[str]]:
    """Check completeness, and (unless ``read_files=False``) every file's checksum and format.

    Returns the manifest (if readable) and the problems found. ``read_files=False`` reads the
    manifest and the files' sizes only: what a resume checks before ``read_parts`` checks
    formats and checksums during its one read of the data.
    """
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
        elif not read_files:
            continue
        elif not checksum_matches(entry.checksum, storage.read_chunks(name, filename)):
            problems.append(f"{filename}: checksum mismatch (corrupted)")
        elif (problem := _format_problem(storage, name, filename, size)) is not None:
            problems.append(f"{filename}: {problem}")
    if read_files and not problems and SHARED_FILE in manifest.files:
        problems.extend(_chunk_index_problems(storage, name, manifest))
    return manifest, problems


def _chunk_index_problems(storage: CheckpointStorage, name: str, manifest: Manifest) -> list[str]:
    """A sharded checkpoint's chunk index against the files (read and checked already)."""
    shared = json.loads(storage.read_file(name, SHARED_FILE))
    if not isinstance(shared, dict) or not shared.get("sharded"):
        return []
    documents = {}
    for rank in range(manifest.world_size):
        filename = f"{rank_stem(rank)}.json"
        if filename not in manifest.files:
            return [f"{filename}: missing from the manifest of a sharded checkpoint"]
        documents[filename] = json.loads(storage.read_file(name, filename))

    def header(filename: str) -> dict[str, Entry] | None:
        entry = manifest.files.get(filename) if isinstance(filename, str) else None
        if entry is None or not filename.endswith(TENSOR_SUFFIX):
            return None
        return parse_header(read_head(storage, name, filename, entry.size), entry.size)[0]

    return index_problems(shared, documents, header)


def _format_problem(storage: CheckpointStorage, name: str, filename: str, size: int) -> str | None:
    """Structural check, so a file that is not what its name says is never loaded.

    safetensors: a header that describes the file exactly. JSON: parses. Anything else is
    not part of the format.
    """
    if filename.endswith(".json"):
        try:
            json.loads(storage.read_file(name, filename))
        except (ValueError, UnicodeDecodeError):
            return "not valid JSON"
        return None
    if not filename.endswith(TENSOR_SUFFIX):
        return "unexpected file type (only .safetensors and .json are loaded)"
    try:
        parse_header(read_head(storage, name, filename, size), size)
    except TensorFileError as error:
        return str(error)
    return None


def find_restorable(
    storage: CheckpointStorage,
    *,
    events: EventSink,
    emit: bool,
    read_files: bool = True,
    older_than: int | None = None,
) -> tuple[str, Manifest] | None:
    """The newest checkpoint (before step ``older_than``, if given) that verifies.

    Newer ones that do not verify are reported as ``checkpoint_rejected`` events when ``emit``.
    """
    for name in reversed(storage.checkpoint_names()):
        if older_than is not None and (step_of(name) or 0) >= older_than:
            continue
        manifest, problems = verify_checkpoint(storage, name, read_files=read_files)
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

    Only committed checkpoints (those with a manifest) count toward ``keep_last``, so
    uncommitted directories never crowd good ones out; those older than ``newest_good`` are
    deleted (they can never be loaded). ``newest_good`` (just verified or committed) is never
    deleted, so a good one always stays.
    """
    names = storage.checkpoint_names()
    committed = [name for name in names if storage.file_size(name, MANIFEST_NAME) is not None]
    keep = set(committed[-keep_last:]) | {newest_good}
    if keep_every:
        keep |= {name for name in committed if (step_of(name) or 0) % keep_every == 0}
    is_committed, newest_step = set(committed), step_of(newest_good) or 0
    doomed = [
        name
        for name in names
        if name not in keep and (name in is_committed or (step_of(name) or 0) < newest_step)
    ]
    for name in doomed:
        storage.delete(name)
    return doomed


def recorded_overrides(storage: CheckpointStorage) -> list[dict[str, Any]]:
    """Every identity change accepted during the run, as its readable manifests record them
    (each lists those before it too), oldest first, without repeats."""
    seen: dict[str, dict[str, Any]] = {}
    for name in storage.checkpoint_names():
        if storage.file_size(name, MANIFEST_NAME) is None:
            continue
        try:
            manifest = Manifest.from_json(storage.read_file(name, MANIFEST_NAME).decode())
        except (ManifestError, UnicodeDecodeError, OSError):
            continue  # reported where the checkpoint itself is checked
        for override in manifest.identity_overrides:
            seen.setdefault(json.dumps(override, sort_keys=True), override)
    return sorted(seen.values(), key=lambda override: override["step"])


def read_head(storage: CheckpointStorage, name: str, filename: str, size: int) -> bytes:
    """A safetensors file's length prefix and JSON header, exactly.

    Raises:
        TensorFileError: when the length prefix is impossible for a file of ``size`` bytes.
    """
    head = storage.read_range(name, filename, 0, HEAD_BYTES)
    length = header_size(head, size)
    if len(head) < 8 + length:
        head = storage.read_range(name, filename, 0, 8 + length)
    return head[: 8 + length]


def remove_leftovers(storage: CheckpointStorage, *, events: EventSink) -> None:
    """Delete what crashed saves left behind, and say so in events (rank 0, no save in flight).

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


def check_free_space(
    storage: CheckpointStorage, *, checkpoint_bytes: int, keep_last: int
) -> str | None:
    """Refuse to start when the destination cannot hold two checkpoints; else maybe warn.

    Args:
        checkpoint_bytes: the expected size of one checkpoint.
        keep_last: how many checkpoints retention keeps.

    Returns:
        A warning when fewer than ``keep_last + 1`` checkpoints fit, else None.

    Raises:
        ConfigError: when fewer than two fit.
    """
    free = storage.free_bytes()
    if free is None:
        return None
    where = storage.describe("")
    if free < 2 * checkpoint_bytes:
        raise ConfigError(
            f"checkpoint.uri: {where} has {free / 2**20:,.0f} MiB free, less than two "
            f"checkpoints of about {checkpoint_bytes / 2**20:,.0f} MiB; free space or choose "
            "another checkpoint.uri"
        )
    if free < (keep_last + 1) * checkpoint_bytes:
        return (
            f"{where} has room for only {free // checkpoint_bytes} checkpoints of about "
            f"{checkpoint_bytes / 2**20:,.0f} MiB (checkpoint.keep_last={keep_last} needs "
            f"{keep_last + 1})"
        )
    return None
