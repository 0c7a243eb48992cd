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
from steadytrain.telemetry.sinks import numeric_fields


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
        for key, value in numeric_fields(record):
            tag = key if "/rank" in key else f"steadytrain/{key}"
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
