"""The gates see everything: pytest collects every test file, ruff lints and formats every file.

Tools skip folders silently (pytest's ``norecursedirs`` and ruff's ``exclude`` both contain
``dist`` and ``build``), so a folder with such a name would drop out of CI without a failure.
These tests run the tools exactly as ``make test`` does and compare what they saw with the tree.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINTED = ("src", "tests", "benchmarks")
RUFF = Path(sys.executable).with_name("ruff")


def tree_files(*folders: str, pattern: str) -> set[str]:
    """Files matching ``pattern`` under ``folders``, relative to the root; hidden ones left out
    (scratch space and caches, which git ignores too)."""
    found = set()
    for folder in folders:
        for path in (ROOT / folder).rglob(pattern):
            relative = path.relative_to(ROOT)
            if not any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
                found.add(relative.as_posix())
    return found


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_make_test_runs_plain_pytest() -> None:
    # The collection check below runs the same invocation; it proves nothing if they differ.
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert recipe is not None, "Makefile has no test target"
    assert recipe.group(1).strip() == "$(BIN)/python -m pytest"


def test_pytest_collects_every_test_file() -> None:
    collected = run(
        sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    files = {line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line}
    expected = tree_files("tests", pattern="test_*.py")
    assert len(expected) > 10, "the tree scan found almost no test files"
    assert expected - files == set(), "test files pytest never collects"


def test_ruff_lints_every_python_file() -> None:
    shown = run(RUFF, "check", "--show-files", *LINTED)
    assert shown.returncode == 0, shown.stderr
    seen = {Path(line).resolve().relative_to(ROOT).as_posix() for line in shown.stdout.split()}
    expected = tree_files(*LINTED, pattern="*.py")
    assert "src/steadytrain/distributed/__init__.py" in expected
    assert expected - seen == set(), "files ruff does not lint"


def test_ruff_formats_every_python_file() -> None:
    # `ruff format --check` counts the files it looked at: formatted and not.
    checked = run(RUFF, "format", "--check", *LINTED)
    counts = re.findall(r"(\d+) files? (?:already formatted|would be reformatted)", checked.stdout)
    assert counts, checked.stdout + checked.stderr
    assert sum(int(count) for count in counts) == len(tree_files(*LINTED, pattern="*.py"))


def test_mypy_checks_the_whole_package() -> None:
    # mypy has no default excludes; what it checks is `files` minus `exclude` in pyproject.
    import tomllib

    settings = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert settings["files"] == ["src/steadytrain"]
    assert "exclude" not in settings


def test_make_bench_runs_every_benchmark() -> None:
    # A benchmark that `make bench` never starts goes stale unnoticed. Every script that runs on
    # its own is in the recipe, or is started by one that is (ddp_baseline.py by overhead*.py).
    recipe = re.search(r"^bench:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None, "Makefile has no bench target"
    started = set(re.findall(r"benchmarks/(\w+)\.py", recipe.group(1)))
    sources = {name: (ROOT / "benchmarks" / f"{name}.py").read_text() for name in started}
    scripts = {
        Path(path).stem
        for path in tree_files("benchmarks", pattern="*.py")
        if 'if __name__ == "__main__":' in (ROOT / path).read_text()
    }
    assert {"overhead", "serve", "data_stream"} <= scripts, "the tree scan found no benchmarks"
    left_out = {
        name
        for name in scripts - started
        if not any(f"{name}.py" in source for source in sources.values())
    }
    assert left_out == set(), "benchmarks `make bench` never runs"
