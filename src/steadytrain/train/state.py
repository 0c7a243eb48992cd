"""TrainState: the counters that must survive a restart, beside the sampler's position."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

TRAIN_STATE_VERSION = 2


@dataclass
class TrainState:
    """Progress in steps, samples and tokens (all global, across ranks).

    ``step`` counts every step the data position moved through, the ones the non-finite guard
    skipped included, so the data order and the learning-rate schedule stay functions of it.
    """

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    num_skipped_steps: int = 0  # steps whose update the non-finite guard dropped
    num_rollbacks: int = 0  # rollbacks to an earlier checkpoint, over the whole run
    consecutive_nonfinite: int = 0  # the guard's current run of non-finite steps

    def commit_step(self, *, num_samples: int, num_tokens: int) -> None:
        self.step += 1
        self.samples_seen += num_samples
        self.tokens_seen += num_tokens

    def skip_step(self) -> None:
        self.step += 1
        self.num_skipped_steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"version": TRAIN_STATE_VERSION, **asdict(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") not in (1, TRAIN_STATE_VERSION):
            raise ValueError(f"unsupported train state version {state.get('version')!r}")
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.tokens_seen = int(state["tokens_seen"])
        self.num_skipped_steps = int(state.get("num_skipped_steps", 0))  # version 1: none
        self.num_rollbacks = int(state.get("num_rollbacks", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
