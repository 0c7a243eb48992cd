"""Shared fixtures: a small real-text corpus, a data cache, tiny settings for fast runs, and a
real S3 server with a fault-injecting proxy (from ``tests/s3.py``)."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3"]  # s3_endpoint, bucket, fault_proxy


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small corpus of real text: the first standard-library modules, copied."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for source in sorted(stdlib.glob("*.py"))[:40]:
        shutil.copy(source, root / source.name)
    return root


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def small_overrides(text_corpus: Path, data_cache: Path) -> list[str]:
    """``--set`` arguments for a fast run: tiny model, short sequences, small real corpus."""
    settings = [
        f"data.corpus={text_corpus}",
        f"data.cache_dir={data_cache}",
        "data.seq_len=32",
        "model.kwargs={num_layers: 1, width: 32, num_heads: 2}",
        "train.max_steps=6",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.eval_batches=2",
        "log.every_steps=2",
        "log.console=false",
    ]
    return settings
