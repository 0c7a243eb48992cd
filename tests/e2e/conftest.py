"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.jobs import checkpoint_overrides, train


@pytest.fixture(scope="session")
def overrides(text_corpus: Path, data_cache: Path) -> list[str]:
    """The small deterministic job's settings (tests/e2e/jobs.py)."""
    return checkpoint_overrides(text_corpus, data_cache)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, overrides: list[str]) -> Path:
    """One uninterrupted 2-rank run of that job, trained once per session: the weights every
    interrupted run must end with. Tests read it, or copy it to change it."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = train(run_dir, overrides)
    assert result.returncode == 0, result.output
    return run_dir
