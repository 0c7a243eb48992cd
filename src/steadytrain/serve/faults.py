"""Faults for tests, injected only when ``STEADYTRAIN_SERVE_TEST_FAULTS`` is set.

The variable holds JSON: ``load_delay_s`` (before loading: time to see /readyz answer 503),
``step_delay_s`` (added to every model call: a slow model, so queues fill) and
``poison_prompt`` (a model call holding a request whose tokens begin with it raises).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from steadytrain.config import ConfigError

FAULTS_ENV = "STEADYTRAIN_SERVE_TEST_FAULTS"


class InjectedFault(RuntimeError):
    """The failure a poisoned request causes."""


@dataclass(frozen=True)
class Faults:
    load_delay_s: float = 0.0
    step_delay_s: float = 0.0
    poison_prompt: str | None = None

    @classmethod
    def from_environment(cls) -> Faults:
        """None injected unless ``STEADYTRAIN_SERVE_TEST_FAULTS`` is set.

        Raises:
            ConfigError: it is set to something other than a JSON object of these fields.
        """
        text = os.environ.get(FAULTS_ENV)
        if not text:
            return cls()
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as error:
            raise ConfigError(
                f"{FAULTS_ENV}: {error}; give a JSON object with load_delay_s, step_delay_s, "
                "poison_prompt (or unset it)"
            ) from None

    def before_load(self) -> None:
        time.sleep(self.load_delay_s)

    def before_model_call(self, rows: Sequence[Sequence[int]]) -> None:
        """Called in the model's thread before each model call, with its rows' tokens."""
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.poison_prompt is None:
            return
        poison = list(self.poison_prompt.encode("utf-8"))
        if any(list(row[: len(poison)]) == poison for row in rows):
            raise InjectedFault(f"injected fault: a poisoned request ({FAULTS_ENV})")
