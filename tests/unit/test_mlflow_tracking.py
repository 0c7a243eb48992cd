"""The MLflow tracker on a real local store (a folder): params, metrics, events, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from steadytrain.config import ConfigError, load_config
from steadytrain.telemetry import MlflowTracker, resolve_tracking_uri
from tests.helpers import free_port


def test_tracking_uri_forms(tmp_path: Path) -> None:
    folder = tmp_path / "track"
    assert resolve_tracking_uri(str(folder)) == (
        f"sqlite:///{folder}/mlflow.db",
        (folder / "artifacts").as_uri(),
    )
    assert resolve_tracking_uri(f"file://{folder}")[0] == f"sqlite:///{folder}/mlflow.db"
    assert resolve_tracking_uri("track", base=tmp_path)[0] == f"sqlite:///{folder}/mlflow.db"
    for uri in ("http://mlflow:5000", "https://host/path", "sqlite:///x.db", "databricks"):
        assert resolve_tracking_uri(uri) == (uri, None)


def test_a_password_in_the_tracking_uri_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("telemetry: {mlflow_tracking_uri: 'https://me:hunter2@mlflow.example'}\n")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD"):
        load_config(path)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, **fields: Any) -> None:
        self.events.append((kind, fields))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


def open_tracker(
    run_dir: Path, folder: Path, emit: Recorder, write_report: Any = None, **params: Any
) -> MlflowTracker:
    def save_file(path: Path, data: bytes) -> None:
        path.write_bytes(data)

    return MlflowTracker(
        write_report=write_report,
        tracking_uri=str(folder),
        experiment="unit",
        run_dir=run_dir,
        params={"train.lr": 0.001, "model.kwargs": {"width": 8}, **params},
        tags={"steadytrain.run_dir": str(run_dir)},
        emit=emit,
        save_file=save_file,
    )


def test_records_events_and_a_resume_go_to_one_run_in_a_local_folder(tmp_path: Path) -> None:
    run_dir, folder = tmp_path / "run", tmp_path / "track"
    run_dir.mkdir()
    emit = Recorder()
    first = open_tracker(run_dir, folder, emit)
    now = time.time()
    first.write({"step": 2, "time": now, "loss": 2.5, "rank_own_s": [0.1, 0.3], "ok": True})
    first.write({"step": 4, "time": now + 1, "loss": 2.0, "rank_own_s": [0.1, 0.2]})
    first.write({"event": "not a step"})  # no step: not a metric
    (run_dir / "events.jsonl").write_text(
        json.dumps({"time": now, "rank": 0, "event": "train_start", "step": 0}) + "\n"
    )
    first.event("train_start", {"world_size": 2, "versions": {"torch": "2.x"}, "identity": {}})
    first.event("preempted", {"step": 4})
    first.close()
    assert emit.kinds() == ["mlflow_run"], emit.events

    client = MlflowClient(tracking_uri=resolve_tracking_uri(str(folder))[0])
    run = client.get_run(first.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["steadytrain.stop_reason"] == "preempted"
    assert run.data.params == {
        "train.lr": "0.001",
        "model.kwargs": '{"width": 8}',
        "world_size": "2",
        "versions.torch": "2.x",
    }
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [
        (2, 2.5),
        (4, 2.0),
    ]
    assert client.get_metric_history(first.run_id, "rank_own_s/rank1")[-1].value == 0.2
    assert "ok" not in run.data.metrics
    artifacts = [f.path for f in client.list_artifacts(first.run_id)]
    assert artifacts == ["events.json"]  # the weights and report only when a run finishes

    # The same run directory opens the same MLflow run; a changed param becomes a tag.
    second = open_tracker(run_dir, folder, emit, **{"train.lr": 0.0005})
    assert second.run_id == first.run_id and second.resumed
    assert client.get_run(first.run_id).info.status == "RUNNING"
    second.close()
    resumed = client.get_run(first.run_id)
    assert resumed.data.params["train.lr"] == "0.001"
    assert resumed.data.tags["param_changed.train.lr"] == "0.0005"


def test_a_failing_call_is_one_event_and_training_goes_on(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    emit = Recorder()
    tracker = open_tracker(run_dir, tmp_path / "track", emit)
    tracker.write({"step": 1, "time": time.time(), "bad name!": 1.0})  # MLflow refuses it
    tracker.write({"step": 2, "time": time.time(), "bad name!": 2.0})
    tracker.write({"step": 3, "time": time.time(), "loss": 1.0})
    tracker.close()
    errors = [fields for kind, fields in emit.events if kind == "mlflow_error"]
    assert len(errors) == 1 and "bad name!" in errors[0]["error"]
    assert emit.events[-1] == ("mlflow_incomplete", {"failed_calls": 2, "dropped": 0})
    client = MlflowClient(tracking_uri=resolve_tracking_uri(str(tmp_path / "track"))[0])
    assert client.get_run(tracker.run_id).data.metrics == {"loss": 1.0}


def test_no_server_at_the_tracking_url_is_a_config_error_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match="no MLflow server answers"):
        MlflowTracker(
            tracking_uri=f"http://127.0.0.1:{free_port()}",
            experiment="unit",
            run_dir=tmp_path,
            params={},
            tags={},
            emit=Recorder(),
            save_file=lambda path, data: None,
        )
    assert time.monotonic() - started < 30


def test_a_finished_run_is_marked_finished_even_when_its_report_cannot_be_written(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "events.jsonl").write_text("")
    (run_dir / "config.yaml").write_text("seed: 1\n")

    def no_report(run_dir: Path) -> Path:
        raise ConfigError(f"{run_dir} has no logged step yet")

    emit = Recorder()
    tracker = open_tracker(run_dir, tmp_path / "track", emit, write_report=no_report)
    tracker.event("train_end", {"weights": str(run_dir / "missing.safetensors")})
    tracker.close()
    assert [kind for kind in emit.kinds() if kind.startswith("mlflow_e")] == ["mlflow_error"]
    client = MlflowClient(tracking_uri=resolve_tracking_uri(str(tmp_path / "track"))[0])
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(tracker.run_id)} == {"config.yaml", "events.json"}
