"""``benchmarks/serve.py --quick`` on the session's reference run: both servers answer what the
model answers alone, and the figures the write-up quotes are computed from what was measured
(throughput, pooled percentiles, the in-process limit, the ratios and the verdicts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, cli_env

pytestmark = pytest.mark.slow


def test_the_serving_benchmark_derives_its_ratios_from_its_measurements(
    reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "serve.json"
    command = [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--quick"]
    command += ["--run-dir", str(reference), "--work-dir", str(tmp_path), "--json", str(out)]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=cli_env(), cwd=REPO
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "generation_throughput:" in completed.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["training"] == {"trained_here": False}
    exit_codes = report["server_exit_codes"]
    assert exit_codes == {"batched": 0, "batch_size_1": 0, "batched_h11": 0}  # drained
    answers = report["answers"]
    assert answers["generate_checked"] > 0 and answers["forward_checked"] > 0
    assert answers["generate_differs"] == 0  # greedy: what generate() gives in-process

    (measured,) = report["rounds"]
    for server in ("batched", "batch_size_1", "batched_h11"):
        for endpoint, runs in measured[server].items():
            assert [run["concurrency"] for run in runs] == [1, 4]
            for run in runs:
                assert run["statuses"] == {"200": run["requests"]}, (server, endpoint)
                assert run["requests_per_s"] == pytest.approx(run["answered"] / run["seconds"])
                assert run["p99_s"] == pytest.approx(
                    np.percentile(run["latencies_s"], 99), abs=1e-5
                )
                assert run["client_cores"] > 0 and run["server_event_loop_cores"] >= 0
    # The server's own metrics: batch 1 never batches; 4 clients generating share batches.
    assert {run["server"]["mean_batch_size"] for run in measured["batch_size_1"]["generate"]} == {
        1.0
    }
    batched_generate = {run["concurrency"]: run for run in measured["batched"]["generate"]}
    assert batched_generate[4]["server"]["mean_batch_size"] > 1

    summary = report["summary"]
    limits = summary["limits"]
    for endpoint in ("generate", "forward"):
        in_process = measured["in_process"][endpoint]
        best = max(in_process, key=lambda row: row["requests_per_s"])
        assert limits[endpoint]["batch_size"] == best["batch_size"]
        served = {
            server: max(run["requests_per_s"] for run in measured[server][endpoint])
            for server in ("batched", "batch_size_1")
        }
        ratio = summary["ratios"][endpoint]
        assert ratio["saturation_over_limit"] == pytest.approx(
            served["batched"] / best["requests_per_s"]
        )
        assert ratio["batched_over_batch_1_at_saturation"] == pytest.approx(
            served["batched"] / served["batch_size_1"]
        )
        one = next(row for row in in_process if row["batch_size"] == 1)
        low = summary["low_load"][endpoint]
        at_one = next(run for run in measured["batched"][endpoint] if run["concurrency"] == 1)
        assert low["p99_s"] == pytest.approx(np.percentile(at_one["latencies_s"], 99))
        wait_s = report["settings"]["max_wait_ms"] / 1e3
        # One generation: the median of those timed alone; a forward: the mean of a loop.
        one_s = np.median(one.get("latencies_s", [one["seconds_per_request"]]))
        assert low["bound_s"] == pytest.approx(wait_s + one_s + 0.005)
        if endpoint == "generate":
            own_p99 = np.percentile(one["latencies_s"], 99)
            assert low["same_percentile_bound_s"] == pytest.approx(wait_s + own_p99 + 0.005)
    for endpoint, levels in summary["http_stack"].items():  # against the pure-Python stack
        pure = {run["concurrency"]: run for run in measured["batched_h11"][endpoint]}
        fast = {run["concurrency"]: run for run in measured["batched"][endpoint]}
        assert [level["concurrency"] for level in levels] == [1, 4]
        for level in levels:
            ratio = fast[level["concurrency"]]["requests_per_s"]
            ratio /= pure[level["concurrency"]]["requests_per_s"]
            assert level["requests_per_s_ratio"] == pytest.approx(ratio)
    verdicts = summary["verdicts"]
    assert verdicts["generation_throughput"]["met"] == (
        summary["ratios"]["generate"]["saturation_over_limit"] >= 0.8
    )
    low = summary["low_load"]["generate"]
    assert verdicts["generation_low_load_p99"]["met"] == (low["p99_s"] <= low["bound_s"])
