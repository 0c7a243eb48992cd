"""``benchmarks/data_stream.py`` end to end at its smallest: local and streamed runs read the
same samples, and the figures the write-up quotes come out of the JSON as documented (bytes
fetched by the cache agree with the downloads the store's request log shows)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env

pytestmark = pytest.mark.slow

SHARD_BYTES = 2**18 + 4  # 4 documents of 2**16 bytes, each with its separator
SMALL = {
    "--reps": "1",
    "--steps": "40",
    "--num-shards": "8",
    "--shard-mib": "0.25",
    "--seq-len": "512",
    "--global-batch": "16",
    "--micro-batch": "8",
    "--window": "2",
    "--prefetch": "2",
    "--latency-ms": "5",
}


def test_the_streaming_benchmark_reads_what_local_disk_reads_and_counts_its_bytes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "stream.json"
    command = [sys.executable, str(REPO / "benchmarks" / "data_stream.py")]
    command += [item for pair in SMALL.items() for item in pair]
    command += ["--step-ms", "0", "5", "--work-dir", str(tmp_path / "work"), "--json", str(out)]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=cli_env(), cwd=REPO
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "fetched ÷ consumed" in completed.stdout
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert sorted((run["step_ms"], run["side"]) for run in runs) == [
        (0.0, "local"),
        (0.0, "stream"),
        (5.0, "local"),
        (5.0, "stream"),
    ]
    assert len({run["sample_ids_sha256"] for run in runs}) == 1  # one sampler plan
    limit = (2 * 2 + 2) * SHARD_BYTES  # (2·window + prefetch) × the largest shard
    for run in runs:
        assert 0 < run["stall_fraction"] < 1 and run["samples_per_s"] > 0
        assert run["position"]["samples_consumed"] == 40 * 16
        if run["side"] == "local":
            continue
        fetched = run["cache_stats"]["bytes_fetched"]
        assert (
            fetched == run["downloads"] * SHARD_BYTES == run["cache_stats"]["misses"] * SHARD_BYTES
        )
        assert run["fetch_ratio"] == pytest.approx(fetched / run["bytes_consumed"])
        in_run = (fetched - run["bytes_fetched_not_read"]) / run["bytes_consumed"]
        assert run["fetch_ratio_in_run"] == pytest.approx(in_run)
        assert run["shards_fetched_again"] == 0 and run["prefetch_errors"] == []
        assert run["bytes_fetched_not_read"] == 0  # nothing fetched for steps after the run
        assert run["cache_limit_bytes"] == limit and 0 < run["peak_cache_bytes"] <= limit
        assert run["first_batch_s"] > 0 and run["resume_warm_s"] > 0 and run["resume_cold_s"] > 0
    streamed = [run for run in runs if run["side"] == "stream"]
    verdict = report["verdicts"]["fetch_ratio"]
    assert verdict["worst"] == max(run["fetch_ratio"] for run in streamed)
    assert verdict["met"] == (verdict["worst"] <= 1.1)
