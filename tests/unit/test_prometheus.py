"""The Prometheus endpoint on its own (a real server on loopback), the example dashboard, and
the TensorBoard sink's refusal without its package."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from steadytrain.config import ConfigError
from steadytrain.telemetry import PrometheusSink, TensorBoardSink
from tests.helpers import REPO, prometheus_samples

DASHBOARD = REPO / "deploy" / "grafana" / "steadytrain.json"


@pytest.fixture
def sink() -> Iterator[PrometheusSink]:
    served = PrometheusSink(
        host="127.0.0.1",
        port=0,
        run={"run_dir": "runs/x", "identity_fingerprint": "abc", "world_size": "2"},
        seconds_since_step=lambda: 7.5,
        restarts=2,
    )
    yield served
    served.close()


def samples(sink: PrometheusSink) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    host, port = sink.address
    return prometheus_samples(f"http://{host}:{port}/metrics")


def test_a_logged_record_becomes_gauges_with_per_rank_labels(sink: PrometheusSink) -> None:
    before = samples(sink)
    assert math.isnan(before[("steadytrain_validation_loss", ())])  # not evaluated yet
    assert before[("steadytrain_restarts_total", ())] == 2
    assert before[("steadytrain_seconds_since_last_step", ())] == 7.5  # live at each scrape
    sink.write(
        {
            "step": 40,
            "loss": 2.5,
            "samples_per_second": 123.0,
            "grad_sync_share": 0.2,
            "forward_s": 0.04,
            "health_score": 90,
            "skipped_in_interval": 1,
            "stragglers": [1],
            "rank_own_s": [0.1, 0.2],
            "rank_hosts": ["a", "b"],
        }
    )
    sink.write({"step": 40, "val_loss": 3.0})  # a validation record: other fields stay
    after = samples(sink)
    assert after[("steadytrain_step", ())] == 40
    assert after[("steadytrain_loss", ())] == 2.5
    assert after[("steadytrain_validation_loss", ())] == 3.0
    assert after[("steadytrain_samples_per_second", ())] == 123.0
    assert after[("steadytrain_grad_sync_ratio", ())] == 0.2
    assert after[("steadytrain_phase_seconds", (("phase", "forward"),))] == 0.04
    assert after[("steadytrain_health_score", ())] == 90
    assert after[("steadytrain_skipped_steps_total", ())] == 1
    assert after[("steadytrain_rank_own_seconds", (("host", "b"), ("rank", "1")))] == 0.2
    assert after[("steadytrain_straggler", (("rank", "1"),))] == 1
    assert after[("steadytrain_straggler", (("rank", "0"),))] == 0
    labels = (("identity_fingerprint", "abc"), ("run_dir", "runs/x"), ("world_size", "2"))
    assert after[("steadytrain_run_info", labels)] == 1


def test_the_dashboard_queries_only_metrics_the_endpoint_serves(sink: PrometheusSink) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # Labelled series exist once a record has set them.
    sink.write({"forward_s": 0.1, "stragglers": [], "rank_own_s": [0.1], "rank_hosts": ["a"]})
    served = {name for name, _ in samples(sink)}
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"steadytrain_\w+", target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    assert queried <= served, sorted(queried - served)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_tensorboard_without_its_package_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"telemetry.tensorboard: true needs the tensorboard"):
        TensorBoardSink(tmp_path / "tensorboard")
