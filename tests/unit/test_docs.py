"""Documentation that is generated must match the code that generates it."""

from __future__ import annotations

from steadytrain.config.reference import render_reference
from tests.helpers import REPO


def test_config_reference_is_current() -> None:
    documented = (REPO / "docs" / "config.md").read_text()
    assert documented == render_reference(), (
        "docs/config.md is stale: run python -m steadytrain.config.reference > docs/config.md"
    )


def test_readme_opens_with_the_two_setup_commands() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    commands = [line.strip() for line in lines[:12] if line.strip().startswith("make ")]
    assert [command.split()[:2] for command in commands] == [["make", "demo"], ["make", "test"]]


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (REPO / ".ci" / "run").read_text()
