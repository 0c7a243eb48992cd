"""MLflow tracking of a run (``telemetry.mlflow_tracking_uri``), rank 0.

``MlflowTracker`` is a ``MetricSink`` beside ``metrics.jsonl`` and a step observer of the
events: the config's identity and operational fields and the run's facts become params, every
logged record becomes metrics at its step (per-rank lists as ``<field>/rank<r>``), and when the
run stops the events become a table (``events.json``), and a finished run's final weights,
``config.yaml`` and HTML report become artifacts. The MLflow run's id is kept in
``RUN_DIR/mlflow.json``, so a resumed run (same command again, or an automatic restart) goes
on in the same MLflow run; a param whose value changed on resume keeps its first value and
gets a ``param_changed.<name>`` tag with the new one (MLflow params never change).

Training never waits on the tracking server: one background thread makes every call after the
run is opened, from a bounded queue. A call that fails (server down, after MLflow's own
retries) is dropped with one ``mlflow_error`` event per spell; the run goes on. Only opening
the run happens before training, so a wrong URI stops the run at once with one line.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from steadytrain.config import ConfigError
from steadytrain.telemetry.observers import QuietObserver
from steadytrain.telemetry.sinks import numeric_fields, read_jsonl

LINK_FILE = "mlflow.json"  # in RUN_DIR: which MLflow run this run directory is
_QUEUE_LIMIT = 10_000  # calls waiting for the server; beyond it new ones are dropped
_CLOSE_TIMEOUT_S = 60.0  # how long the end of a run waits for the last calls
_PARAM_VALUE_LIMIT = 6000  # MLflow's limit on a param value
_BATCH_LIMIT = 100  # params per log_batch call (MLflow's limit; metrics allow 1000)
# How the run's end maps onto MLflow's run statuses.
_END_STATUS = {"train_end": "FINISHED", "preempted": "KILLED", "diverged": "FAILED"}


def resolve_tracking_uri(uri: str, *, base: Path | None = None) -> tuple[str, str | None]:
    """``(store URI, artifact location for new experiments or None)`` for a configured URI.

    A local folder (a plain path or ``file://``) holds a SQLite store ``mlflow.db`` and an
    ``artifacts/`` folder: MLflow's file store is in maintenance mode. Anything else with a
    scheme (``http://``, ``sqlite://``, ``databricks``) is passed to MLflow as it is.
    """
    if uri == "databricks" or ("://" in uri and not uri.startswith("file://")):
        return uri, None
    folder = Path(uri.removeprefix("file://")).expanduser()
    if not folder.is_absolute():
        folder = (base or Path.cwd()) / folder
    folder = folder.resolve()
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


class MlflowTracker(QuietObserver):
    """Opens (or reopens) the MLflow run of ``run_dir`` and logs to it from a thread.

    ``save_file(path, data)`` writes the link file atomically; ``write_report(run_dir)``
    writes the HTML report of a finished run and returns its folder.

    Raises:
        ConfigError: the mlflow package is missing, or the tracking URI cannot be used.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        run_dir: Path,
        params: dict[str, Any],
        tags: dict[str, str],
        emit: Callable[..., None],
        save_file: Callable[[Path, bytes], None],
        write_report: Callable[[Path], Path] | None = None,
    ) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError(
                "telemetry.mlflow_tracking_uri is set but the mlflow package is missing; "
                "install it (pip install 'steadytrain[mlflow]') or unset the field"
            ) from None
        self.run_dir = run_dir
        self._emit = emit
        self._save_file = save_file  # atomic and durable: the link must never be torn
        self._write_report = write_report
        store_uri, artifact_location = resolve_tracking_uri(tracking_uri)
        if store_uri.startswith("sqlite:///"):
            Path(store_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        _check_reachable(store_uri)
        self._client = MlflowClient(tracking_uri=store_uri)
        try:
            self.run_id, self.resumed = self._open_run(
                store_uri, experiment, artifact_location, tags
            )
            existing = self._client.get_run(self.run_id).data.params if self.resumed else {}
        except Exception as error:  # MLflow raises its own and its HTTP client's errors
            raise ConfigError(
                f"telemetry.mlflow_tracking_uri: cannot open an MLflow run at {tracking_uri} "
                f"({_first_line(error)}); check the URI and that the server is up"
            ) from None
        self._params = dict(existing)
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue(_QUEUE_LIMIT)
        self._failing = False
        self.failed_calls = 0
        self.dropped_calls = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="steadytrain-mlflow", daemon=True)
        self._thread.start()
        if self.resumed:  # tags name the run as it is now (a tag, unlike a param, may change)
            self._submit(partial(self._client.log_batch, self.run_id, tags=_run_tags(tags)))
        self.log_params(params)
        emit(
            "mlflow_run",
            run_id=self.run_id,
            resumed=self.resumed,
            tracking_uri=tracking_uri,
        )

    def _open_run(
        self,
        store_uri: str,
        experiment: str,
        artifact_location: str | None,
        tags: dict[str, str],
    ) -> tuple[str, bool]:
        link = _read_link(self.run_dir / LINK_FILE)
        if link is not None and link.get("tracking_uri") == store_uri:
            run = _find_run(self._client, str(link.get("run_id")))
            if run is not None:
                self._client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id, True
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else self._client.create_experiment(experiment, artifact_location=artifact_location)
        )
        run = self._client.create_run(experiment_id, tags=tags, run_name=self.run_dir.name)
        body = {
            "tracking_uri": store_uri,
            "experiment_id": experiment_id,
            "run_id": run.info.run_id,
        }
        self._save_file(self.run_dir / LINK_FILE, json.dumps(body).encode())
        return run.info.run_id, False

    # --- MetricSink ---------------------------------------------------------------------

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if not isinstance(step, int):
            return
        from mlflow.entities import Metric

        millis = int(float(record.get("time", time.time())) * 1000)
        metrics = [Metric(key, float(value), millis, step) for key, value in numeric_fields(record)]
        for start in range(0, len(metrics), 1000):
            chunk = metrics[start : start + 1000]
            self._submit(partial(self._client.log_batch, self.run_id, metrics=chunk))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)  # blocks only while the queue is full
        self._thread.join(timeout=_CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            self._emit(
                "mlflow_error",
                error=f"calls still pending after {_CLOSE_TIMEOUT_S:.0f} s; left unsent",
                pending=self._queue.qsize(),
            )
        elif self.failed_calls or self.dropped_calls:
            self._emit(
                "mlflow_incomplete", failed_calls=self.failed_calls, dropped=self.dropped_calls
            )

    # --- StepObserver ---------------------------------------------------------------------

    def event(self, kind: str, fields: dict[str, Any]) -> None:
        if kind == "train_start":
            self.log_params(_flat_facts(fields))
        elif kind in _END_STATUS:
            self._submit(partial(self._finish, kind, fields))

    # --- the calls -------------------------------------------------------------------------

    def log_params(self, params: dict[str, Any]) -> None:
        """Params not yet on the run; a changed one becomes a ``param_changed.<name>`` tag."""
        from mlflow.entities import Param, RunTag

        new: list[Param] = []
        changed: list[RunTag] = []
        for name, value in params.items():
            text = _param_text(value)
            if name not in self._params:
                new.append(Param(name, text))
            elif self._params[name] != text:
                changed.append(RunTag(f"param_changed.{name}", text))
            self._params.setdefault(name, text)
        for start in range(0, max(len(new), len(changed)), _BATCH_LIMIT):
            params_chunk = new[start : start + _BATCH_LIMIT]
            tags_chunk = changed[start : start + _BATCH_LIMIT]
            self._submit(
                partial(self._client.log_batch, self.run_id, params=params_chunk, tags=tags_chunk)
            )

    def _finish(self, kind: str, fields: dict[str, Any]) -> None:
        """At the run's end (in the thread): events table, artifacts, tags, then the status,
        which is set even when an upload before it failed."""
        client, run_id = self._client, self.run_id
        try:
            events = read_jsonl(self.run_dir / "events.jsonl")
            client.log_table(run_id, data=_event_table(events), artifact_file="events.json")
            client.set_tag(
                run_id, "steadytrain.stop_reason", "finished" if kind == "train_end" else kind
            )
            if kind == "train_end":
                config = self.run_dir / "config.yaml"
                if config.exists():
                    client.log_artifact(run_id, str(config))
                weights = fields.get("weights")
                if isinstance(weights, str) and Path(weights).exists():
                    client.log_artifact(run_id, weights, artifact_path="weights")
                if self._write_report is not None:
                    report_dir = self._write_report(self.run_dir)
                    client.log_artifacts(run_id, str(report_dir), artifact_path="report")
        finally:
            client.set_terminated(run_id, status=_END_STATUS[kind])

    def _submit(self, call: Callable[[], object]) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait(call)
        except queue.Full:
            self.dropped_calls += 1

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            try:
                call()
            except Exception as error:  # the tracking server's trouble is never training's
                self.failed_calls += 1
                if not self._failing:
                    self._failing = True
                    self._emit("mlflow_error", error=_first_line(error))
            else:
                self._failing = False


def _run_tags(tags: dict[str, str]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(name, value) for name, value in tags.items()]


def _check_reachable(store_uri: str) -> None:
    """A tracking server that does not answer fails in seconds, not after MLflow's retries."""
    if not store_uri.startswith(("http://", "https://")):
        return
    url = store_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=10):
            return
    except urllib.error.HTTPError:
        return  # it answers; whether it tracks is for MLflow's own calls to say
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(
            f"telemetry.mlflow_tracking_uri: no MLflow server answers at {store_uri} "
            f"({reason}); start it, fix the URI, or unset the field"
        ) from None


def _read_link(path: Path) -> dict[str, Any] | None:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _find_run(client: Any, run_id: str) -> Any:
    try:
        run = client.get_run(run_id)
    except Exception:  # deleted, or another store: a new MLflow run is opened
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


def _flat_facts(fields: dict[str, Any]) -> dict[str, Any]:
    """The ``train_start`` event's facts as params (the identity is logged from the config)."""
    facts: dict[str, Any] = {}
    for name, value in fields.items():
        if name in ("time", "event", "rank", "step", "identity"):
            continue
        if isinstance(value, dict):
            facts.update({f"{name}.{key}": item for key, item in value.items()})
        else:
            facts[name] = value
    return facts


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:_PARAM_VALUE_LIMIT]


def _event_table(events: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Events as MLflow table columns: time, rank, event, step and the rest as JSON."""
    table: dict[str, list[Any]] = {"time": [], "rank": [], "event": [], "step": [], "details": []}
    for record in events:
        table["time"].append(record.get("time"))
        table["rank"].append(record.get("rank"))
        table["event"].append(record.get("event"))
        table["step"].append(record.get("step"))
        rest = {k: v for k, v in record.items() if k not in ("time", "rank", "event", "step")}
        table["details"].append(json.dumps(rest, sort_keys=True))
    return table


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
