"""Token shards: prepare from text files, read memory-mapped windows, refuse bad input."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from steadytrain.config import DataError
from steadytrain.data import TokenWindowDataset, prepare_shards, read_index
from steadytrain.data.datasets import MixtureDataset
from steadytrain.data.shards import DOCUMENT_SEPARATOR, INDEX_FILE, ShardIndex, is_prepared

SEPARATOR = bytes([DOCUMENT_SEPARATOR])


def document_text(number: int, *, size: int = 300) -> bytes:
    """Distinct, recognisable ASCII for document ``number``."""
    line = f"document {number:03d}: the quick brown fox jumps over the lazy dog.\n".encode()
    return (line * (size // len(line) + 1))[:size]


def make_corpus(root: Path, num_files: int, *, size: int = 300) -> dict[str, bytes]:
    """Text files under ``root`` (one nested folder too); returns {relative path: bytes}."""
    contents = {}
    for number in range(num_files):
        relative = f"part{number % 2}/file{number:03d}.txt"
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        contents[relative] = document_text(number, size=size)
        path.write_bytes(contents[relative])
    return contents


def split_bytes(index: ShardIndex, split: str) -> bytes:
    return b"".join(shard.path.read_bytes() for shard in index.splits[split])


def split_documents(index: ShardIndex, split: str) -> list[bytes]:
    """The documents of a split, in order, each expected to end with the separator."""
    stream = split_bytes(index, split)
    if not stream:
        return []
    assert stream.endswith(SEPARATOR)
    return stream[:-1].split(SEPARATOR)


def staging_leftovers(parent: Path) -> list[Path]:
    return [path for path in parent.iterdir() if ".partial-" in path.name]


# --- prepare --------------------------------------------------------------------------------


def test_prepare_writes_index_and_shards_that_round_trip(tmp_path: Path) -> None:
    contents = make_corpus(tmp_path / "corpus", 12)
    output = tmp_path / "prepared"
    index = prepare_shards(str(tmp_path / "corpus"), output, val_fraction=0.0)

    assert is_prepared(output)
    on_disk = json.loads((output / INDEX_FILE).read_text())
    assert on_disk["vocab_size"] == 256
    assert on_disk["dtype"] == "uint8"
    assert on_disk["source"]["num_files"] == 12
    assert on_disk["source"]["num_bytes"] == sum(len(text) for text in contents.values())
    assert index.splits["val"] == []
    assert index.directory == output
    expected = b"".join(contents[name] + SEPARATOR for name in sorted(contents))
    assert split_bytes(index, "train") == expected
    assert index.num_tokens("train") == len(expected)
    # Reading the index again gives the same corpus.
    assert read_index(output) == index


def test_prepare_from_a_glob_takes_only_matching_files(tmp_path: Path) -> None:
    contents = make_corpus(tmp_path / "corpus", 6)
    (tmp_path / "corpus" / "notes.md").write_text("not text we asked for")
    index = prepare_shards(
        str(tmp_path / "corpus" / "**" / "*.txt"), tmp_path / "out", val_fraction=0.0
    )
    assert split_documents(index, "train") == [contents[name] for name in sorted(contents)]


def test_separator_bytes_inside_a_file_are_removed(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"ab\x00cd")
    (corpus / "b.txt").write_bytes(b"\x00\x00")  # empty once the separators are gone
    (corpus / "c.txt").write_bytes(b"ef")
    index = prepare_shards(str(corpus), tmp_path / "out", val_fraction=0.0)
    assert split_bytes(index, "train") == b"abcd\x00ef\x00"


def test_max_bytes_caps_the_corpus(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus", 5, size=100)
    index = prepare_shards(
        str(tmp_path / "corpus"), tmp_path / "out", val_fraction=0.0, max_bytes=250
    )
    documents = split_documents(index, "train")
    assert [len(document) for document in documents] == [100, 100, 50]


def held_out_names(index: ShardIndex, contents: dict[str, bytes]) -> set[str]:
    """Names of the files whose text landed in the validation split."""
    val = set(split_documents(index, "val"))
    return {name for name, text in contents.items() if text in val}


def test_validation_split_is_per_file_and_stable(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    contents = make_corpus(corpus, 40)
    first = prepare_shards(str(corpus), tmp_path / "a", val_fraction=0.3)
    train, val = split_documents(first, "train"), split_documents(first, "val")
    # Whole files, each in exactly one split.
    assert sorted(train + val) == sorted(contents.values())
    assert val, "with 40 files and 30% validation, some file should be held out"
    assert train
    held_out = held_out_names(first, contents)

    # Preparing again decides the same way.
    again = prepare_shards(str(corpus), tmp_path / "a2", val_fraction=0.3)
    assert held_out_names(again, contents) == held_out

    # More files, read through a glob of the same folder: the old files keep their split.
    old_names = set(contents)
    for number in range(100, 110):
        relative = f"part{number % 2}/file{number:03d}.txt"
        contents[relative] = document_text(number)
        (corpus / relative).write_bytes(contents[relative])
    grown = prepare_shards(str(corpus / "**" / "*.txt"), tmp_path / "b", val_fraction=0.3)
    assert held_out_names(grown, contents) & old_names == held_out


def test_validation_split_of_a_glob_is_stable_when_a_folder_is_added(tmp_path: Path) -> None:
    # The module promises a split "stable when files are added"; through a glob, adding a
    # file in a new sibling folder must not move the files that were already there.
    corpus = tmp_path / "corpus"
    contents: dict[str, bytes] = {}
    for number in range(40):
        relative = f"books/file{number:03d}.txt"
        (corpus / "books").mkdir(parents=True, exist_ok=True)
        contents[relative] = document_text(number)
        (corpus / relative).write_bytes(contents[relative])
    pattern = str(corpus / "**" / "*.txt")
    before = held_out_names(prepare_shards(pattern, tmp_path / "a", val_fraction=0.3), contents)

    (corpus / "articles").mkdir()
    (corpus / "articles" / "new.txt").write_bytes(document_text(999))
    after = held_out_names(prepare_shards(pattern, tmp_path / "b", val_fraction=0.3), contents)
    assert after == before


def test_small_shard_size_writes_several_shards(tmp_path: Path) -> None:
    contents = make_corpus(tmp_path / "corpus", 10, size=100)
    index = prepare_shards(
        str(tmp_path / "corpus"), tmp_path / "out", val_fraction=0.0, shard_tokens=250
    )
    shards = index.splits["train"]
    assert len(shards) >= 3
    for shard in shards:
        assert shard.path.stat().st_size == shard.num_tokens
        assert shard.path.read_bytes().endswith(SEPARATOR), "a document was cut between shards"
    assert split_documents(index, "train") == [contents[name] for name in sorted(contents)]


# --- refusals and atomicity -------------------------------------------------------------------


def test_existing_unprepared_directory_is_refused(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus", 3)
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="exists and is not a prepared corpus"):
        prepare_shards(str(tmp_path / "corpus"), output)
    assert (output / "keep.txt").read_text() == "mine"
    assert not is_prepared(output)


def test_existing_empty_directory_is_used(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus", 3)
    output = tmp_path / "out"
    output.mkdir()
    prepare_shards(str(tmp_path / "corpus"), output, val_fraction=0.0)
    assert is_prepared(output)


def test_prepared_directory_is_reused_untouched(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus", 4)
    output = tmp_path / "out"
    index = prepare_shards(str(tmp_path / "corpus"), output, val_fraction=0.0)
    before = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in output.iterdir()}
    # Even another (missing) corpus: a prepared directory is opened, not rebuilt.
    again = prepare_shards(str(tmp_path / "missing"), output, val_fraction=0.5)
    after = {path.name: (path.stat().st_mtime_ns, path.read_bytes()) for path in output.iterdir()}
    assert again == index
    assert after == before


def test_missing_corpus_is_refused(tmp_path: Path) -> None:
    output = tmp_path / "out"
    with pytest.raises(DataError, match="matches no files"):
        prepare_shards(str(tmp_path / "nowhere"), output)
    with pytest.raises(DataError, match="matches no files"):
        prepare_shards(str(tmp_path / "*.nothing"), output)
    assert not output.exists()
    assert staging_leftovers(tmp_path) == []


def test_corpus_without_text_leaves_no_prepared_directory(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "separators.txt").write_bytes(b"\x00\x00\x00")
    output = tmp_path / "out"
    with pytest.raises(DataError, match="no readable text"):
        prepare_shards(str(corpus), output)
    assert not output.exists()
    assert not is_prepared(output)
    assert staging_leftovers(tmp_path) == []


def test_read_index_detects_a_truncated_shard(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus", 4)
    output = tmp_path / "out"
    index = prepare_shards(str(tmp_path / "corpus"), output, val_fraction=0.0)
    shard = index.splits["train"][0].path
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DataError, match=shard.name):
        read_index(output)


def test_read_index_detects_a_missing_shard(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus", 4)
    index = prepare_shards(str(tmp_path / "corpus"), tmp_path / "out", val_fraction=0.0)
    index.splits["train"][0].path.unlink()
    with pytest.raises(DataError, match="missing"):
        read_index(tmp_path / "out")


def test_read_index_refuses_a_directory_without_index(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=INDEX_FILE):
        read_index(tmp_path)


def test_read_index_refuses_a_corrupt_or_foreign_index(tmp_path: Path) -> None:
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        read_index(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"format": "other", "version": 1}))
    with pytest.raises(DataError, match="prepare the corpus again"):
        read_index(tmp_path)


# --- the window dataset ------------------------------------------------------------------------


def expected_windows(index: ShardIndex, split: str, seq_len: int) -> list[bytes]:
    """Windows computed straight from the shard bytes: every seq_len, never across shards."""
    windows = []
    for shard in index.splits[split]:
        raw = shard.path.read_bytes()
        for start in range(0, len(raw) - seq_len, seq_len):
            windows.append(raw[start : start + seq_len + 1])
    return windows


@pytest.fixture
def sharded(tmp_path: Path) -> ShardIndex:
    """Several shards of uneven length (documents of varying size)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number in range(9):
        (corpus / f"doc{number}.txt").write_bytes(document_text(number, size=37 + 23 * number))
    index = prepare_shards(str(corpus), tmp_path / "out", val_fraction=0.0, shard_tokens=200)
    assert len(index.splits["train"]) >= 3
    return index


def test_windows_match_raw_bytes_and_never_cross_shards(sharded: ShardIndex) -> None:
    seq_len = 16
    dataset = TokenWindowDataset(sharded, split="train", seq_len=seq_len)
    expected = expected_windows(sharded, "train", seq_len)
    assert len(dataset) == len(expected)
    assert len(dataset) == sum((s.num_tokens - 1) // seq_len for s in sharded.splits["train"])
    for sample_id, window in enumerate(expected):
        sample = dataset[sample_id]
        assert sample.dtype == torch.int64
        assert sample.shape == (seq_len + 1,)
        assert bytes(sample.to(torch.uint8).tolist()) == window
    # Concatenating the shards would give more windows than the dataset has.
    total = sharded.num_tokens("train")
    assert len(dataset) < (total - 1) // seq_len


def test_a_micro_batch_read_at_once_is_the_windows_stacked(
    sharded: ShardIndex, tmp_path: Path
) -> None:
    """``read_samples`` (how the loader reads a micro-batch) gives, row by row, the raw-byte
    windows of ids from several shards in any order, repeats included; a mixture reads each
    row from its own source."""
    seq_len = 16
    dataset = TokenWindowDataset(sharded, split="train", seq_len=seq_len)
    expected = expected_windows(sharded, "train", seq_len)
    ids = [len(dataset) - 1, 0, 7, int(dataset.first_sample[1]), 7, int(dataset.first_sample[2])]
    batch = dataset.read_samples(ids)
    assert batch.dtype == torch.int64 and batch.shape == (len(ids), seq_len + 1)
    assert [bytes(row.to(torch.uint8).tolist()) for row in batch] == [expected[i] for i in ids]
    make_corpus(tmp_path / "other", 3, size=500)
    other_index = prepare_shards(str(tmp_path / "other"), tmp_path / "o", val_fraction=0.0)
    other = TokenWindowDataset(other_index, split="train", seq_len=seq_len)
    mixture = MixtureDataset([dataset, other])
    size = len(dataset)
    rows = mixture.read_samples([size + 2, 3, size, 0])
    expected_rows = [other[2], dataset[3], other[0], dataset[0]]
    assert all(torch.equal(row, want) for row, want in zip(rows, expected_rows, strict=True))
    with pytest.raises(IndexError):
        dataset.read_samples([0, len(dataset)])


def test_window_index_out_of_range(sharded: ShardIndex) -> None:
    dataset = TokenWindowDataset(sharded, split="train", seq_len=16)
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    with pytest.raises(IndexError):
        dataset[-1]


def test_empty_split_has_no_windows(sharded: ShardIndex) -> None:
    assert len(TokenWindowDataset(sharded, split="val", seq_len=16)) == 0


def test_dataset_pickles_without_the_memory_maps(tmp_path: Path) -> None:
    make_corpus(tmp_path / "corpus", 20, size=4000)
    index = prepare_shards(str(tmp_path / "corpus"), tmp_path / "out", val_fraction=0.0)
    dataset = TokenWindowDataset(index, split="train", seq_len=64)
    before = [dataset[i] for i in (0, len(dataset) // 2, len(dataset) - 1)]  # maps now open
    payload = pickle.dumps(dataset)
    assert index.num_tokens("train") > 80_000
    assert len(payload) < 4_000, f"pickle is {len(payload)} bytes: the corpus was copied"
    restored = pickle.loads(payload)
    assert len(restored) == len(dataset)
    after = [restored[i] for i in (0, len(dataset) // 2, len(dataset) - 1)]
    for one, two in zip(before, after, strict=True):
        assert torch.equal(one, two)
    assert np.array_equal(dataset[5].numpy(), restored[5].numpy())
