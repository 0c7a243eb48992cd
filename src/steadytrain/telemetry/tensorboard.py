"""TensorBoard scalars of the logged records (``telemetry.tensorboard: true``), rank 0.

A ``MetricSink`` beside ``metrics.jsonl``: every number of a logged record becomes a scalar
``steadytrain/<field>`` at the record's step, and per-rank lists become ``<field>/rank<r>``
(``rank_own_s/rank1``), under ``RUN_DIR/tensorboard/``. A resumed run appends to the same
folder; TensorBoard shows both attempts on one step axis. Needs the ``tensorboard`` package
(``pip install steadytrain[tensorboard]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steadytrain.config import ConfigError


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "telemetry.tensorboard: true needs the tensorboard package; install it "
                "(pip install 'steadytrain[tensorboard]') or set telemetry.tensorboard: false"
            ) from None
        self.log_dir = log_dir
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        for key, value in record.items():
            if key in ("step", "time"):
                continue
            if _is_number(value):
                self._writer.add_scalar(f"steadytrain/{key}", value, global_step=step)
            elif isinstance(value, list) and value and all(_is_number(v) for v in value):
                for rank, item in enumerate(value):
                    self._writer.add_scalar(f"{key}/rank{rank}", item, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
