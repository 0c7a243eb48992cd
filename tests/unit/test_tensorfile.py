"""The streamed safetensors writer and the strict reader: layout, interoperability, refusals."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from steadytrain.checkpoint.tensorfile import (
    DTYPE_CODES,
    TensorFileError,
    parse_header,
    prefault,
    tensor_file,
    tensors_from_bytes,
)


def every_dtype() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for dtype in DTYPE_CODES:
        values = torch.randn(3, 5, generator=generator) * 50
        if dtype.is_complex:
            tensors[str(dtype)] = torch.complex(values, -values).to(dtype)
        else:
            tensors[str(dtype)] = values.to(dtype)
    return tensors


def file_bytes(tensors: dict[str, torch.Tensor], **kwargs: object) -> bytes:
    return b"".join(tensor_file(tensors, **kwargs).chunks())  # type: ignore[arg-type]


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, tensor in expected.items():
        got = actual[key]
        assert (got.dtype, got.shape) == (tensor.dtype, tensor.shape), key
        # Bitwise: compare the bytes, so NaNs and negative zeros count too.
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def test_every_dtype_and_shape_round_trips_bit_exactly() -> None:
    base = torch.arange(24.0).reshape(4, 6)
    tensors = {
        **every_dtype(),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 7),
        "transposed": base.t(),  # not contiguous: written in logical order
        "sliced": base[1:3, ::2],
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
    }

    restored = tensors_from_bytes(file_bytes(tensors))

    assert_same(restored, {key: value.contiguous() for key, value in tensors.items()})
    for tensor in restored.values():  # each restored tensor owns exactly its own memory
        assert tensor.untyped_storage().nbytes() == tensor.nbytes


def test_tied_tensors_are_written_under_each_name() -> None:
    weight = torch.randn(4, 3)
    restored = tensors_from_bytes(file_bytes({"embed.weight": weight, "head.weight": weight}))
    assert torch.equal(restored["embed.weight"], weight)
    assert torch.equal(restored["head.weight"], weight)
    assert restored["embed.weight"].data_ptr() != restored["head.weight"].data_ptr()


def test_layout_is_aligned_streamed_without_copies_and_repeatable() -> None:
    tensors = {"bytes": torch.ones(3, dtype=torch.uint8), "big": torch.randn(1000, 600)}
    written = tensor_file(tensors)

    first, second = b"".join(written.chunks()), b"".join(written.chunks())
    assert first == second and len(first) == written.size
    entries, data_start = parse_header(first, len(first))
    assert data_start % 8 == 0
    assert list(entries) == ["big", "bytes"]  # wider element types first
    assert entries["big"][2] % 4 == 0
    # The payload streams the caller's memory: no serialized copy exists.
    assert written.tensors[0].data_ptr() == tensors["big"].data_ptr()
    assert max(len(chunk) for chunk in written.chunks()) <= 8 * 2**20


def test_files_load_with_the_safetensors_library_and_back(tmp_path: Path) -> None:
    tensors = {key: value for key, value in every_dtype().items() if "complex" not in key}
    tensors["scalar"] = torch.tensor(7, dtype=torch.int64)
    ours = tmp_path / "ours.safetensors"
    ours.write_bytes(file_bytes(tensors, metadata={"format": "pt"}))

    assert_same(load_file(ours), tensors)
    with safe_open(str(ours), framework="pt") as opened:
        assert opened.metadata() == {"format": "pt"}

    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs), metadata={"source": "safetensors"})
    assert_same(tensors_from_bytes(theirs.read_bytes()), tensors)


def header_of(entries: object, data: bytes = b"") -> bytes:
    text = json.dumps(entries).encode()
    return len(text).to_bytes(8, "little") + text + data


F32_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

MALFORMED = {
    "too short": (b"\x01\x00", "too short"),
    "header longer than the file": ((10**6).to_bytes(8, "little") + b"{}", "bad header length"),
    "zero header length": ((0).to_bytes(8, "little") + b"\x00" * 8, "bad header length"),
    "header not JSON": ((4).to_bytes(8, "little") + b"\xff{[x", "unreadable header"),
    "header not an object": (header_of([1, 2]), "not an object"),
    "unknown dtype": (header_of({"w": {**F32_ENTRY, "dtype": "F99"}}, b"\0" * 8), "bad entry"),
    "entry not an object": (header_of({"w": "pickle"}), "bad entry"),
    "negative shape": (header_of({"w": {**F32_ENTRY, "shape": [-2]}}, b"\0" * 8), "bad shape"),
    "size does not match shape": (
        header_of({"w": {**F32_ENTRY, "shape": [3]}}, b"\0" * 8),
        "size does not match its shape",
    ),
    "gap": (
        header_of({"w": {**F32_ENTRY, "data_offsets": [4, 12]}}, b"\0" * 12),
        "gap or overlaps",
    ),
    "overlap": (
        header_of(
            {"a": F32_ENTRY, "b": {**F32_ENTRY, "data_offsets": [4, 12]}},
            b"\0" * 12,
        ),
        "gap or overlaps",
    ),
    "trailing bytes": (header_of({"w": F32_ENTRY}, b"\0" * 9), "offsets do not match the size"),
    "data cut short": (header_of({"w": F32_ENTRY}, b"\0" * 7), "offsets do not match the size"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_files_are_refused_naming_the_problem(case: str) -> None:
    data, problem = MALFORMED[case]
    with pytest.raises(TensorFileError, match=problem):
        tensors_from_bytes(data)


def test_a_header_cut_short_is_refused() -> None:
    data = header_of({"w": F32_ENTRY}, b"\0" * 8)
    with pytest.raises(TensorFileError, match="header cut short"):
        parse_header(data[:12], len(data))


def test_unsupported_dtypes_are_refused() -> None:
    with pytest.raises(TypeError, match="cannot be checkpointed"):
        tensor_file({"w": torch.zeros(2, dtype=torch.complex128)})


def test_large_files_read_into_one_mapping_as_separate_exact_storages() -> None:
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "big": torch.randn(700, 1000, generator=generator),  # 2.8 MB: the mapping path
        "matrix": torch.randn(512, 512, generator=generator),  # 1 MiB: in the mapping too
        "half": torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        "scalar": torch.tensor(5, dtype=torch.int64),
        "empty": torch.empty(0, 3),
    }

    restored = tensors_from_bytes(file_bytes(tensors))

    assert_same(restored, tensors)
    for tensor in restored.values():
        assert tensor.untyped_storage().nbytes() == tensor.nbytes
    big = restored["big"]
    for small in ("half", "scalar"):  # not in the mapping: keeping one never keeps it alive
        address = restored[small].data_ptr()
        assert not big.data_ptr() - 2**21 <= address < big.data_ptr() + big.nbytes + 2**21
    matrix = restored["matrix"]
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux: large tensors share one aligned mapping
        first, second = sorted((big, matrix), key=lambda tensor: tensor.data_ptr())
        assert first.data_ptr() % 2**21 == 0
        assert second.data_ptr() == first.data_ptr() + -(-first.nbytes // 64) * 64
    prefault(restored.values())  # faults pages in, writes nothing
    assert_same(restored, tensors)
    restored["big"].zero_()  # the tensors do not overlap
    assert_same(
        {"matrix": matrix, "half": restored["half"]}, {k: tensors[k] for k in ("matrix", "half")}
    )
    assert restored["scalar"].item() == 5
