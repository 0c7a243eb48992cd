"""safetensors files written and read as streams, so a checkpoint never sits in memory twice.

The layout is safetensors' own: an 8-byte little-endian header length, a JSON header
``{key: {"dtype", "shape", "data_offsets": [begin, end]}}`` padded with spaces so the data
starts 8-byte aligned, then every tensor's bytes back to back. Files written here load with
``safetensors.torch.load_file`` and the reverse (a unit test holds both directions).

Writing streams each tensor's memory straight to storage: no serialized copy of the whole
file is built, and tied tensors (one storage, two keys) are simply written twice. Reading
parses the header strictly, allocates every tensor once, and lets storage read the data
straight into them (``empty_tensors`` + ``byte_view``): one copy, from the file into the
tensors that are returned, as with ``torch.load``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

HEADER_ALIGNMENT = 8
CHUNK_BYTES = 8 * 2**20  # what one write or one checksum update sees
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
HUGE_PAGE_BYTES = 2 * 2**20
MAPPED_TENSOR_BYTES = 64 * 2**10  # tensors this large share the huge-page mapping

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
DTYPES: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}


class TensorFileError(ValueError):
    """Bytes that are not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorFile:
    """A safetensors file not yet written: its header and the tensors whose bytes follow it.

    It is a storage payload: ``chunks()`` yields the file's bytes, as often as it is asked
    (a retried upload starts again), without copying any tensor.
    """

    header: bytes
    tensors: tuple[torch.Tensor, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(tensor.nbytes for tensor in self.tensors)

    def chunks(self) -> Iterator[memoryview]:
        yield memoryview(self.header)
        for tensor in self.tensors:
            data = byte_view(tensor)
            for start in range(0, len(data), CHUNK_BYTES):
                yield data[start : start + CHUNK_BYTES]


def tensor_file(
    tensors: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None
) -> TensorFile:
    """Lay out ``tensors`` (CPU) as a safetensors file; nothing is copied.

    Larger element types come first (as safetensors orders them), so every tensor starts
    at an offset aligned to its element size. ``metadata`` goes to ``__metadata__``.
    """
    ordered = sorted(tensors.items(), key=lambda item: (-item[1].element_size(), item[0]))
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    contiguous = []
    for key, tensor in ordered:
        if tensor.device.type != "cpu":
            raise ValueError(f"{key}: tensor on {tensor.device}; copy it to host memory first")
        if tensor.dtype not in DTYPE_CODES:
            raise TypeError(f"{key}: dtype {tensor.dtype} cannot be checkpointed")
        tensor = tensor.detach().contiguous()  # a copy only if it was not
        contiguous.append(tensor)
        entries[key] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % HEADER_ALIGNMENT)
    return TensorFile(len(header).to_bytes(8, "little") + header, tuple(contiguous))


Entry = tuple[torch.dtype, list[int], int, int]


def header_size(first_bytes: bytes, size: int) -> int:
    """The JSON header's length, from the file's first 8 bytes; ``size`` is the file's.

    Raises:
        TensorFileError: when the file is too short for it.
    """
    if size < 8 or len(first_bytes) < 8:
        raise TensorFileError("not a safetensors file (too short)")
    length = int.from_bytes(first_bytes[:8], "little")
    if length <= 0 or length > MAX_HEADER_BYTES or 8 + length > size:
        raise TensorFileError("not a safetensors file (bad header length)")
    return length


def parse_header(head: bytes, size: int) -> tuple[dict[str, Entry], int]:
    """Parse and check a header: every tensor fits, and together they fill the data exactly.

    ``head`` is the file's beginning, at least the length and the whole JSON header;
    ``size`` is the file's size.

    Returns:
        ``{key: (dtype, shape, begin, end)}`` with offsets relative to the data, and the
        offset where the data starts.

    Raises:
        TensorFileError: naming what is wrong.
    """
    length = header_size(head, size)
    if len(head) < 8 + length:
        raise TensorFileError("not a safetensors file (header cut short)")
    try:
        header = json.loads(head[8 : 8 + length])
    except (ValueError, UnicodeDecodeError):
        raise TensorFileError("not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise TensorFileError("not a safetensors file (header is not an object)")
    entries = {key: _entry(key, entry) for key, entry in header.items() if key != "__metadata__"}
    expected = 0
    for key, (_, _, begin, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if begin != expected:
            raise TensorFileError(f"not a safetensors file ({key!r} leaves a gap or overlaps)")
        expected = end
    if expected != size - 8 - length:
        raise TensorFileError("not a safetensors file (offsets do not match the size)")
    return entries, 8 + length


def empty_tensors(entries: dict[str, Entry]) -> dict[str, torch.Tensor]:
    """One new tensor per header entry, in file order, for the data to be read into.

    Tensors of ``MAPPED_TENSOR_BYTES`` or more, when together at least ``HUGE_PAGE_BYTES``,
    are placed in one private anonymous mapping, 2 MiB-aligned and advised to use transparent
    huge pages where the OS offers them (Linux): filling new memory costs a page fault per
    page, and in 2 MiB pages that ran ~4x faster than in 4 KiB pages on the benchmark
    machine. Each is still its own storage of its exact size; the mapping is released with the
    last of them. The threshold is per tensor and small: a model's 1 MiB weight matrices must
    be in it (leaving them out cost a fifth of the load speed), while tiny ones (0-d optimizer
    steps, biases, norms) get ordinary allocations, so that keeping one of them never keeps
    the mapping alive.
    """
    ordered = sorted(entries.items(), key=lambda item: item[1][2])
    large = [key for key, (_, _, begin, end) in ordered if end - begin >= MAPPED_TENSOR_BYTES]
    mapped_bytes = sum(_aligned(entries[key][3] - entries[key][2]) for key in large)
    mapped = _huge_page_region(mapped_bytes) if mapped_bytes >= HUGE_PAGE_BYTES else None
    tensors = {}
    for key, (dtype, shape, begin, end) in ordered:
        if mapped is None or key not in large:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        region, offset = mapped
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(region, dtype=dtype, count=count, offset=offset)
        tensors[key] = flat.view(shape)
        mapped = region, offset + _aligned(end - begin)
    return tensors


MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable without writing them
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PAGE_BYTES = mmap.PAGESIZE


def prefault(tensors: Iterable[torch.Tensor]) -> None:
    """Fault in the pages of the mapped (large) ``tensors`` before data is written to them,
    in order, ``CHUNK_BYTES`` at a time; nothing is written. A no-op where the OS cannot.

    Run in a thread beside a read into the same tensors, it takes the page faults of new
    memory off the reading thread, so that they overlap the wait for the disk: on the
    benchmark VM, whose host takes freed memory back, two fresh processes reading 156 MB each
    into new memory took 0.17-0.73 s alone and 0.16-0.33 s beside it. The call into the C
    library releases the GIL.
    """
    if _LIBC is None:
        return
    spans: list[list[int]] = []
    for tensor in tensors:
        if tensor.nbytes < MAPPED_TENSOR_BYTES:
            continue
        start = tensor.data_ptr() - tensor.data_ptr() % _PAGE_BYTES
        end = tensor.data_ptr() + tensor.nbytes
        if spans and spans[-1][0] <= start <= spans[-1][1] + _PAGE_BYTES:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    for start, end in spans:
        for offset in range(start, end, CHUNK_BYTES):
            length = ctypes.c_size_t(min(CHUNK_BYTES, end - offset))
            if _LIBC.madvise(ctypes.c_void_p(offset), length, MADV_POPULATE_WRITE) != 0:
                return  # an older kernel: the read faults the pages in itself


def _huge_page_region(size: int) -> tuple[mmap.mmap, int] | None:
    """A mapping with ``size`` usable bytes from a 2 MiB-aligned offset (returned with it), or
    None where the OS has no transparent huge pages to advise."""
    if size == 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    region = mmap.mmap(-1, size + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):
        region.madvise(mmap.MADV_HUGEPAGE)
    start = -torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE_BYTES
    return region, start


def _aligned(size: int) -> int:
    return -(-size // 64) * 64


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a whole safetensors file held in memory (each with its own storage).

    Raises:
        TensorFileError: when it is malformed.
    """
    entries, data_start = parse_header(data, len(data))
    tensors = empty_tensors(entries)
    for key, tensor in tensors.items():
        begin, end = entries[key][2:]
        byte_view(tensor)[:] = data[data_start + begin : data_start + end]
    return tensors


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy (numpy has no bfloat16: via uint8)."""
    if tensor.numel() == 0:
        return memoryview(bytearray())
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def _entry(key: str, entry: object) -> Entry:
    if not isinstance(entry, dict):
        raise TensorFileError(f"not a safetensors file (bad entry for {key!r})")
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = [int(dim) for dim in entry["shape"]]
        begin, end = (int(offset) for offset in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise TensorFileError(f"not a safetensors file (bad entry for {key!r})") from None
    if min(shape, default=0) < 0 or not 0 <= begin <= end:
        raise TensorFileError(f"not a safetensors file (bad shape or offsets for {key!r})")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise TensorFileError(f"not a safetensors file ({key!r}: size does not match its shape)")
    return dtype, shape, begin, end
