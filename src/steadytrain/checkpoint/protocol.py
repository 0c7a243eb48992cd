"""Saving, verifying, choosing and pruning checkpoints (Contract 3).

Commit order: every rank writes its own files durably into a staging location; the ranks
agree (a collective) that all parts are durable; only then does rank 0 write the manifest and
make the checkpoint visible. A failed part on any rank means nothing is committed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from steadytrain.checkpoint.codec import join_tensors, split_tensors
from steadytrain.checkpoint.manifest import (
    MANIFEST_NAME,
    Checksum,
    FileEntry,
    Manifest,
    ManifestError,
    checkpoint_name,
    checksum_matches,
    checksum_of,
    step_of,
)
from steadytrain.checkpoint.storage import (
    BytesPayload,
    CheckpointStorage,
    Payload,
    SizeMismatch,
    StorageError,
)
from steadytrain.checkpoint.tensorfile import (
    TensorFileError,
    byte_view,
    empty_tensors,
    header_size,
    parse_header,
    tensor_file,
    tensors_from_bytes,
)
from steadytrain.distributed import broadcast_from_main, gather_from_all

STATE_FORMAT_VERSION = 1
TENSOR_SUFFIX = ".safetensors"
HEAD_BYTES = 64 * 2**10  # read first: enough for the header of a file of many tensors


class EventSink(Protocol):
    def emit(self, kind: str, **fields: Any) -> None: ...


class CorruptCheckpoint(Exception):
    """A file of a checkpoint did not read back as written (one line: which and why)."""


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
    """Named states whose tensors are in host memory, ready to be written."""

    stem: str
    skeletons: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]

    def to_files(self) -> dict[str, Payload]:
        """``STEM.json`` (skeletons) + one safetensors file per part that has tensors.

        The safetensors payloads stream the snapshot's tensors; nothing is serialized ahead.
        """
        files: dict[str, Payload] = {}
        tensor_files: dict[str, str] = {}
        for part, tensors in self.tensors.items():
            if tensors:
                shared = self.stem == "shared"
                filename = (
                    f"{part}{TENSOR_SUFFIX}" if shared else f"{self.stem}-{part}{TENSOR_SUFFIX}"
                )
                files[filename] = tensor_file(tensors)
                tensor_files[part] = filename
        document = {
            "version": STATE_FORMAT_VERSION,
            "tensor_files": tensor_files,
            "parts": self.skeletons,
        }
        files[f"{self.stem}.json"] = BytesPayload(json.dumps(document).encode())
        return files


def snapshot_parts(
    parts: dict[str, Any],
    *,
    stem: str,
    copy: bool = True,
    reuse: PartsSnapshot | None = None,
    host: bool = True,
) -> PartsSnapshot:
    """Every tensor of ``parts`` in host memory; the rest becomes a JSON skeleton.

    ``copy=False`` keeps CPU tensors as they are (no copy): only for a save that finishes
    before training changes them again. ``reuse``: an earlier snapshot whose write is done;
    its tensors receive the copies where key, dtype and shape match. ``host=False`` (with
    ``copy=False``): a template, tensors left where they are.
    """
    skeletons: dict[str, Any] = {}
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for part, state in parts.items():
        spare = reuse.tensors.get(part) if reuse is not None else None
        skeletons[part], tensors[part] = split_tensors(state, copy=copy, reuse=spare, host=host)
    return PartsSnapshot(stem=stem, skeletons=skeletons, tensors=tensors)


def host_buffers_like(template: PartsSnapshot) -> PartsSnapshot:
    """Host memory for a snapshot shaped like ``template``, allocated and touched now.

    Passed as ``reuse`` to the next ``snapshot_parts``, it takes the copies without a page
    fault: a first async save need not allocate while training waits.
    """
    tensors = {
        part: {key: torch.zeros(t.shape, dtype=t.dtype) for key, t in part_tensors.items()}
        for part, part_tensors in template.tensors.items()
    }
    return PartsSnapshot(stem=template.stem, skeletons={}, tensors=tensors)


def encode_parts(parts: dict[str, Any], *, stem: str) -> dict[str, bytes]:
    """The files of ``snapshot_parts(...).to_files()`` as bytes (for tests and tools)."""
    return {
        filename: b"".join(payload.chunks())
        for filename, payload in snapshot_parts(parts, stem=stem).to_files().items()
    }


def decode_parts(
    read: Callable[[str], bytes],
    *,
    stem: str,
    read_tensor_file: Callable[[str], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Inverse of ``encode_parts``: JSON and safetensors only, never pickle.

    ``read(filename)`` returns a file's bytes; ``read_tensor_file(filename)`` (default: parse
    what ``read`` returns) a safetensors file's tensors.

    Raises:
        ManifestError: the state document is not one this version reads.
        TensorFileError: a tensor file is malformed, or the document names another file type.
    """
    document = json.loads(read(f"{stem}.json"))
    if not isinstance(document, dict) or document.get("version") != STATE_FORMAT_VERSION:
        version = document.get("version") if isinstance(document, dict) else None
        raise ManifestError(f"{stem}.json: unsupported state version {version!r}")
    tensors_of = read_tensor_file or (lambda filename: tensors_from_bytes(read(filename)))
    decoded = {}
    for part, skeleton in document["parts"].items():
        filename = document["tensor_files"].get(part)
        tensors = {}
        if filename is not None:
            if not (isinstance(filename, str) and filename.endswith(TENSOR_SUFFIX)):
                raise TensorFileError(f"{stem}.json names {filename!r}, not a safetensors file")
            tensors = tensors_of(filename)
        decoded[part] = join_tensors(skeleton, tensors)
    return decoded


def read_parts(
    storage: CheckpointStorage, name: str, manifest: Manifest, *, stem: str
) -> dict[str, Any]:
    """Read one stem's files once each, check them against the manifest, and decode them.

    A safetensors file's data goes straight from storage into the tensors that are returned,
    and its checksum is computed from them: verifying costs no second read.

    Raises:
        CorruptCheckpoint: a file is missing, unlisted, of another size or checksum, or
            malformed: the checkpoint's fault.
        OSError: any other storage error (I/O error, out of memory, an object store that
            gave up after its retries): not the checkpoint's fault.
    """

    def entry_of(filename: str) -> FileEntry:
        entry = manifest.files.get(filename)
        if entry is None:
            raise CorruptCheckpoint(f"{filename}: not listed in the manifest")
        return entry

    def read_document(filename: str) -> bytes:
        entry = entry_of(filename)
        try:
            data = storage.read_file(name, filename)
        except OSError as error:
            if _is_corruption(error):
                raise CorruptCheckpoint(f"{filename}: {error}") from None
            raise
        if len(data) != entry.size or not checksum_matches(entry.checksum, [data]):
            raise CorruptCheckpoint(f"{filename}: checksum mismatch (corrupted)")
        return data

    def read_tensor_file(filename: str) -> dict[str, torch.Tensor]:
        entry = entry_of(filename)
        try:
            head = _read_head(storage, name, filename, entry.size)
            entries, data_start = parse_header(head, entry.size)
            tensors = empty_tensors(entries)
            checksum = Checksum.like(entry.checksum)
            checksum.update(head)
            views = [byte_view(tensor) for tensor in tensors.values()]
            storage.read_into(name, filename, views, offset=data_start, on_data=checksum.update)
        except TensorFileError as error:
            raise CorruptCheckpoint(f"{filename}: {error}") from None
        except OSError as error:
            if _is_corruption(error):
                raise CorruptCheckpoint(f"{filename}: {error}") from None
            raise
        if checksum.value() != entry.checksum:
            raise CorruptCheckpoint(f"{filename}: checksum mismatch (corrupted)")
        return tensors

    try:
        return decode_parts(read_document, stem=stem, read_tensor_file=read_tensor_file)
    except (ManifestError, TensorFileError, ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpoint(f"{stem}: {error}") from None


def _read_head(storage: CheckpointStorage, name: str, filename: str, size: int) -> bytes:
    """A safetensors file's length prefix and JSON header, exactly.

    Raises:
        TensorFileError: when the length prefix is impossible for a file of ``size`` bytes.
    """
    head = storage.read_range(name, filename, 0, HEAD_BYTES)
    length = header_size(head, size)
    if len(head) < 8 + length:
        head = storage.read_range(name, filename, 0, 8 + length)
    return head[: 8 + length]


def _is_corruption(error: OSError) -> bool:
    """A missing or wrong-sized file is the checkpoint's fault; other storage errors are not."""
    missing = isinstance(error, FileNotFoundError) or isinstance(error.__cause__, FileNotFoundError)
    return missing or isinstance(error, SizeMismatch)


def rank_stem(rank: int) -> str:
    return f"rank-{rank:05d}"


def save_checkpoint(
    storage: CheckpointStorage,
    *,
    step: int,
    rank: int,
    files: Mapping[str, Payload | bytes],
    manifest: Manifest,
    events: EventSink,
    group: Any = None,
    failure: str | None = None,
) -> SaveOutcome:
    """Write this rank's ``files`` and commit the checkpoint if every rank succeeded.

    A collective: every rank must call it for the same step, even one whose files could not
    be prepared (it passes ``failure`` instead). Errors are reported in the outcome and as an
    event, never raised: training goes on, nothing is committed. Each file's checksum is
    computed from the very chunks written.
    """
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
            )
        else:
            events.emit("checkpoint_failed", step=step, reason=error)
    committed, error = broadcast_from_main((committed, error), group=group)  # collective
    return SaveOutcome(step=step, committed=committed, location=storage.describe(name), error=error)


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
    return manifest, problems


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
        parse_header(_read_head(storage, name, filename, size), size)
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
