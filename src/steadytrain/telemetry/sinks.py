"""Append-only JSON-lines files: ``metrics.jsonl`` (rank 0) and ``events.jsonl`` (any rank)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from steadytrain.telemetry.observers import StepObservers


class MetricSink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def numeric_fields(record: dict[str, Any]) -> list[tuple[str, float]]:
    """The numbers of a logged record as ``(name, value)``, for scalar stores (TensorBoard,
    MLflow): per-rank lists become ``<field>/rank<r>``; ``step``, ``time``, booleans, text
    and ``None`` are left out."""
    found: list[tuple[str, float]] = []
    for key, value in record.items():
        if key in ("step", "time"):
            continue
        if _is_number(value):
            found.append((key, float(value)))
        elif isinstance(value, list) and value and all(_is_number(v) for v in value):
            found.extend((f"{key}/rank{rank}", float(item)) for rank, item in enumerate(value))
    return found


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class JsonlSink:
    """One JSON object per line; each record is a single ``write`` on an O_APPEND file.

    Lines from several processes therefore never interleave, and a crash can only tear the
    last line, which readers skip.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(_finite(record), separators=(",", ":")) + "\n"
        os.write(self._fd, line.encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class NullSink:
    """A sink for ranks that do not write a given file."""

    def write(self, record: dict[str, Any]) -> None:
        return None

    def close(self) -> None:
        return None


class FanOutSink:
    """Writes every record to each of ``sinks`` in order (metrics.jsonl, then Prometheus)."""

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class EventLog:
    """Named events (start, epoch end, finish, ...) with time and rank."""

    def __init__(
        self, sink: MetricSink, *, rank: int, observers: StepObservers | None = None
    ) -> None:
        self._sink = sink
        self._rank = rank
        self.observers = observers or StepObservers()

    def emit(self, kind: str, **fields: Any) -> None:
        record = {"time": time.time(), "event": kind, "rank": self._rank, **fields}
        self._sink.write(record)
        self.observers.event(kind, record)

    def close(self) -> None:
        self._sink.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete records of a JSON-lines file (a torn last line is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/Inf; strict parsers reject them, so write null instead.
    return {
        key: (None if isinstance(value, float) and not math.isfinite(value) else value)
        for key, value in record.items()
    }
