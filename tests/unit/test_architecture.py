"""The dependency direction of ARCHITECTURE.md, read from the imports in src/steadytrain."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "steadytrain"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / "src" / PACKAGE

# Components that meet only in `train`: each may use config/dist, never one another.
LEAF_COMPONENTS = ("data", "model", "checkpoint", "fault", "telemetry", "plan")
ALLOWED = {
    "config": set(),
    "distributed": {"config"},
    **{component: {"config", "distributed"} for component in LEAF_COMPONENTS},
    # Serving loads what training wrote through the leaves' public names, never via train.
    "serve": {"config", "distributed", "checkpoint", "model", "telemetry"},
}


def component_of(module: str) -> str | None:
    """``steadytrain.data.sampler`` -> ``data``; the bare package -> ``""``; others -> None."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this_module = module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = this_module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # `from steadytrain import data` imports the subpackage `steadytrain.data`.
            if target == PACKAGE:
                found.update(f"{PACKAGE}.{alias.name}" for alias in node.names)
    return found


def source_files() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def component_edges() -> dict[tuple[str, str], list[str]]:
    """(importing component, imported component) -> the files that make that edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in source_files():
        source = component_of(module_name(path))
        assert source is not None
        for module in imported_modules(path):
            target = component_of(module)
            if target is None or target == source:
                continue
            edges.setdefault((source, target), []).append(str(path.relative_to(PACKAGE_DIR)))
    return edges


EDGES = component_edges()


def test_the_import_scan_sees_the_package() -> None:
    components = {component_of(module_name(path)) for path in source_files()}
    assert {"config", "distributed", "data", "model", "telemetry", "train", "cli"} <= components
    # Known edges, so a broken scan cannot pass the checks below by finding nothing.
    assert ("train", "data") in EDGES
    assert ("data", "config") in EDGES
    assert ("cli", "train") in EDGES  # a lazy import inside a function


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_component_imports_only_what_it_may(component: str) -> None:
    allowed = ALLOWED[component] | {""}  # the bare package holds only the version
    forbidden = {
        target: files
        for (source, target), files in EDGES.items()
        if source == component and target not in allowed
    }
    assert forbidden == {}, f"{component} may import only {sorted(ALLOWED[component])}"


def test_the_package_root_imports_no_component() -> None:
    root_files = [path for path in PACKAGE_DIR.glob("*.py") if path.name != "__main__.py"]
    for path in root_files:
        imported = {component_of(module) for module in imported_modules(path)}
        assert imported <= {None, ""}, f"{path.name} imports {imported - {None, ''}}"


def test_serve_never_imports_train() -> None:
    assert ("serve", "checkpoint") in EDGES  # the scan sees serve's imports
    assert ("serve", "train") not in EDGES


def test_nothing_imports_cli() -> None:
    # __main__ is the entry point `python -m steadytrain`, the one place that starts the CLI.
    importers = {
        source: files
        for (source, target), files in EDGES.items()
        if target == "cli" and source != "__main__"
    }
    assert importers == {}


def test_nothing_in_src_imports_tests() -> None:
    offenders = {
        str(path.relative_to(PACKAGE_DIR)): sorted(
            module for module in imported_modules(path) if module.split(".")[0] == "tests"
        )
        for path in source_files()
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def imported_names(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every import in ``path``; name is None for ``import module``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.extend((node.module, alias.name) for alias in node.names)
    return found


def exported_names(component: str) -> set[str]:
    init = PACKAGE_DIR / component / "__init__.py"
    tree = ast.parse(init.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets
        ):
            return set(ast.literal_eval(node.value))
    return set()


def internal_imports() -> dict[str, list[str]]:
    """Per file, what it imports from another component other than that component's exports."""
    offenders: dict[str, list[str]] = {}
    for path in source_files():
        source = component_of(module_name(path))
        for module, name in imported_names(path):
            parts = module.split(".")
            if parts[0] != PACKAGE or len(parts) < 2 or parts[1] == source:
                continue
            target = parts[1]
            if len(parts) > 2:
                offenders.setdefault(str(path.relative_to(PACKAGE_DIR)), []).append(module)
            elif name is not None and name not in exported_names(target):
                offenders.setdefault(str(path.relative_to(PACKAGE_DIR)), []).append(
                    f"{module}.{name}"
                )
    return offenders


def test_the_export_scan_sees_exports_and_imports() -> None:
    assert "restore_checkpoint" in exported_names("checkpoint")
    assert "ParallelModel" in exported_names("distributed")
    # A known import of an export, so the check below cannot pass by seeing no imports.
    session = PACKAGE_DIR / "train" / "session.py"
    assert ("steadytrain.checkpoint", "restore_checkpoint") in imported_names(session)


def test_only_exported_names_are_imported_across_components() -> None:
    # A package's internals stay inside it (STYLE rule 14): others use its __init__ exports.
    assert internal_imports() == {}
