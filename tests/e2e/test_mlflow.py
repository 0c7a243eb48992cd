"""MLflow tracking against a real ``mlflow server``: one MLflow run across a resume."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient

from tests.helpers import TINY_CONFIG, as_set_args, events, free_port, run_steadytrain


def test_a_resumed_run_goes_on_in_one_mlflow_run_with_params_metrics_events_and_artifacts(
    restarted_run: Path, mlflow_server: str
) -> None:
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("restarted")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])  # both attempts: one MLflow run
    run_id = run.info.run_id
    assert json.loads((restarted_run / "mlflow.json").read_text())["run_id"] == run_id
    opened = events(restarted_run, "mlflow_run")
    assert [event["resumed"] for event in opened] == [False, True]
    assert {event["run_id"] for event in opened} == {run_id}
    assert not events(restarted_run, "mlflow_error")
    assert run.info.status == "FINISHED"

    # Params: identity and operational fields of the config, and the run's facts.
    params, tags = run.data.params, run.data.tags
    assert params["train.max_steps"] == "8"  # the first value stays; the change is a tag
    assert tags["param_changed.train.max_steps"] == "12"
    assert params["model.kwargs"] == json.dumps(
        {"num_heads": 2, "num_layers": 2, "width": 64}, sort_keys=True
    )
    assert params["log.every_steps"] == "2"
    assert params["world_size"] == "2" and params["versions.torch"]
    assert tags["steadytrain.run_dir"] == str(restarted_run.resolve())
    assert tags["steadytrain.stop_reason"] == "finished"

    # Metrics at every logged step of both attempts, per-rank lists per rank.
    loss_steps = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert loss_steps == {2, 4, 6, 8, 10, 12}
    assert {m.step for m in client.get_metric_history(run_id, "rank_own_s/rank1")} >= {10, 12}
    health = client.get_metric_history(run_id, "health_score")
    assert health and all(0 <= m.value <= 100 for m in health)

    # Artifacts: final weights, the config, the report, the events as a table.
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "events.json", "weights", "report"} <= artifacts
    assert [f.path for f in client.list_artifacts(run_id, "weights")] == [
        "weights/model.safetensors"
    ]
    report = {f.path for f in client.list_artifacts(run_id, "report")}
    assert "report/index.html" in report and "report/health.png" in report
    table_file = Path(client.download_artifacts(run_id, "events.json"))
    table = json.loads(table_file.read_text())
    kinds = [row[table["columns"].index("event")] for row in table["data"]]
    assert kinds.count("resume") == 1 and "nonfinite_step_skipped" in kinds
    assert "train_end" in kinds
    weights = Path(client.download_artifacts(run_id, "weights/model.safetensors"))
    assert weights.read_bytes() == (restarted_run / "final" / "model.safetensors").read_bytes()


def test_a_tracking_server_that_does_not_answer_stops_the_run_in_one_line(
    tmp_path: Path, overrides: list[str]
) -> None:
    run_dir = tmp_path / "run"
    result = run_steadytrain(
        "train",
        TINY_CONFIG,
        "--run-dir",
        run_dir,
        *as_set_args(
            [
                *overrides,
                "train.max_steps=2",
                f"telemetry.mlflow_tracking_uri=http://127.0.0.1:{free_port()}",
            ]
        ),
    )
    assert result.returncode == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "telemetry.mlflow_tracking_uri: no MLflow server answers" in lines[0]
    assert "Traceback" not in result.output
    assert not (run_dir / "checkpoints").exists()
