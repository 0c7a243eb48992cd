"""What ``steadytrain checkpoints list|verify RUN_DIR`` reports about a run's checkpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from steadytrain.checkpoint.contents import explained_by
from steadytrain.checkpoint.discovery import recorded_overrides, verify_checkpoint
from steadytrain.checkpoint.location import checkpoint_storage
from steadytrain.checkpoint.manifest import MANIFEST_NAME, Manifest, ManifestError, step_of
from steadytrain.config import (
    ConfigError,
    describe_changes,
    field_changes,
    identity_fields,
    load_config,
)


@dataclass
class CheckpointStatus:
    name: str
    step: int
    location: str
    manifest: Manifest | None
    total_bytes: int
    problems: list[str] = field(default_factory=list)

    @property
    def good(self) -> bool:
        return self.manifest is not None and not self.problems


def inspect_checkpoints(run_dir: Path, *, verify: bool) -> list[CheckpointStatus]:
    """Every checkpoint of the run in ``run_dir``, oldest first.

    Without ``verify`` only manifests and file sizes are read; with it, every checksum is
    recomputed and the identity is compared with the run's ``config.yaml`` (differences the
    run's checkpoints record as accepted with ``--allow-change`` are not problems).

    Raises:
        ConfigError: when ``run_dir`` is not a run directory.
    """
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(
            f"{run_dir}: no config.yaml, so not a steadytrain run directory; pass the --run-dir "
            "of a training run"
        )
    config = load_config(config_path, overrides=[f"run_dir={json.dumps(str(run_dir))}"])
    storage = checkpoint_storage(config)
    history = recorded_overrides(storage) if verify else []
    statuses = []
    for name in storage.checkpoint_names():
        manifest: Manifest | None = None
        problems: list[str] = []
        if verify:
            manifest, problems = verify_checkpoint(storage, name)
        elif storage.file_size(name, MANIFEST_NAME) is None:
            problems = ["no manifest.json: the save never committed"]
        else:
            try:
                manifest = Manifest.from_json(storage.read_file(name, MANIFEST_NAME).decode())
            except (ManifestError, UnicodeDecodeError) as error:
                problems = [f"manifest.json unreadable: {error}"]
        if verify and manifest is not None:
            unexplained = {
                field: (old, new)
                for field, (old, new) in field_changes(
                    manifest.identity, identity_fields(config)
                ).items()
                if not explained_by(history, field, old=old, new=new)
            }
            problems += [
                f"identity differs from {config_path}: {difference}"
                for difference in describe_changes(unexplained)
            ]
        total = sum(entry.size for entry in manifest.files.values()) if manifest else 0
        statuses.append(
            CheckpointStatus(
                name=name,
                step=step_of(name) or 0,
                location=storage.describe(name),
                manifest=manifest,
                total_bytes=total,
                problems=problems,
            )
        )
    return statuses
