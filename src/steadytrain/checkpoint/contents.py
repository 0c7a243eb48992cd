"""What a checkpoint holds and which run it belongs to: the seam between ``train`` and here.

``train`` decides *what* goes into a checkpoint (named objects with ``state_dict()`` /
``load_state_dict()``); this package decides how it is written, committed, found and read.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

import steadytrain
from steadytrain.checkpoint.manifest import Manifest
from steadytrain.config import Config, identity_fields, identity_fingerprint, operational_fields


class Stateful(Protocol):
    """Anything a checkpoint can hold: a model, an optimizer, a sampler, counters…"""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


@runtime_checkable
class Templated(Protocol):
    """A part whose state before its first use does not show what a load fills."""

    def load_template(self) -> Any:
        """A state like ``state_dict()``'s, with every tensor a load will fill."""
        ...


def load_template(part: Stateful) -> Any:
    """The state a load of ``part`` fills: its tensors show the layout (sharded or not)."""
    return part.load_template() if isinstance(part, Templated) else part.state_dict()


class EventSink(Protocol):
    def emit(self, kind: str, **fields: Any) -> None: ...


@dataclass(frozen=True)
class CheckpointContents:
    """The parts of a checkpoint, by name.

    ``replicated`` parts are identical on every rank (model and optimizer under DDP): rank 0
    writes them once and every rank reads them. ``sharded``: their states hold DTensors
    (FSDP), whose local shards every rank writes beside them; a load lays them out as the
    parts' own states do, so a sharded checkpoint restores into a replicated run and back,
    at any world size. ``per_rank`` parts are each rank's own (its RNG streams): every rank
    writes its own, and they are restored only into the same world size, since one rank's
    streams cannot be split among another number of ranks.
    """

    replicated: Mapping[str, Stateful]
    per_rank: Mapping[str, Stateful]
    sharded: bool = False


@dataclass
class RunIdentity:
    """The run that checkpoints belong to: recorded in each manifest, checked by a resume."""

    config: Config
    world_size: int
    global_batch_size: int
    # Identity changes allowed so far (inherited from the restored checkpoint, plus this
    # start's own); every later manifest lists them.
    overrides: list[dict[str, Any]] = field(default_factory=list)

    def manifest(self, *, step: int) -> Manifest:
        """The manifest of a checkpoint of this run at ``step``, before its files are listed."""
        return Manifest(
            step=step,
            time=time.time(),
            identity_fingerprint=identity_fingerprint(self.config),
            identity=identity_fields(self.config),
            world_size=self.world_size,
            global_batch_size=self.global_batch_size,
            operational=operational_fields(self.config),
            identity_overrides=list(self.overrides),
            versions={
                "steadytrain": steadytrain.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        )


def explained_by(history: list[dict[str, Any]], field: str, *, old: Any, new: Any) -> bool:
    """Whether recorded overrides took ``field`` from ``old`` to ``new`` (in one or more steps)."""
    chain = [override for override in history if override["field"] == field]
    return bool(chain) and chain[-1]["new"] == new and any(o["old"] == old for o in chain)
