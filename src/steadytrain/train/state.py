"""TrainState: the counters that must survive a restart, beside the sampler's position."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TRAIN_STATE_VERSION = 1


@dataclass
class TrainState:
    """Progress in optimizer steps, samples and tokens (all global, across ranks)."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0

    def commit_step(self, *, num_samples: int, num_tokens: int) -> None:
        self.step += 1
        self.samples_seen += num_samples
        self.tokens_seen += num_tokens

    def state_dict(self) -> dict[str, Any]:
        return {"version": TRAIN_STATE_VERSION, **asdict(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != TRAIN_STATE_VERSION:
            raise ValueError(f"unsupported train state version {state.get('version')!r}")
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.tokens_seen = int(state["tokens_seen"])
