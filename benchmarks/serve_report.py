"""benchmarks/serve.py's figures from its rounds: medians, pooled percentiles, the ratios
and the verdicts against the issue's targets, and the printed report."""

from __future__ import annotations

import statistics
from typing import Any

from serve_load import percentile

TARGET_GENERATION_RATIO = 0.8  # served generation at saturation ÷ the in-process limit
LATENCY_SLACK_S = 0.005  # low-load p99 ≤ max_wait_ms + one in-process generation + 5 ms
SERVERS = ("batched", "batch_size_1", "batched_h11")
# Per-level figures taken as the median over rounds (latency percentiles are pooled instead).
MEDIAN_KEYS = (
    "requests_per_s",
    "client_cores",
    "server_event_loop_cores",
    "server_other_threads_cores",
    "client_cpu_s_per_request",
    "server_event_loop_cpu_s_per_request",
    "machine_busy_share",
)
SERVER_KEYS = (
    "model_s_per_call",
    "model_s_per_request",
    "mean_batch_size",
    "queue_wait_s",
    "padding_share",
    "masked_share",
)


def _median(values: list[Any]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _in_process_rows(rounds: list[dict[str, Any]], endpoint: str) -> list[dict[str, Any]]:
    by_size: dict[int, list[dict[str, Any]]] = {}
    for measured in rounds:
        for row in measured["in_process"][endpoint]:
            by_size.setdefault(row["batch_size"], []).append(row)
    rows = []
    for size, runs in sorted(by_size.items()):
        row: dict[str, Any] = {"batch_size": size, "rounds": len(runs)}
        for key in ("requests_per_s", "tokens_per_s", "seconds_per_request"):
            if key in runs[0]:
                row[key] = statistics.median(run[key] for run in runs)
        row["foreign_cpu_share_max"] = max(run.get("foreign_cpu_share") or 0.0 for run in runs)
        alone = [latency for run in runs for latency in run.get("latencies_s", [])]
        if alone:  # batch 1, each call timed alone: the model's own median and tail
            row["p50_s"] = percentile(alone, 0.5)
            row["p99_s"] = percentile(alone, 0.99)
        rows.append(row)
    return rows


def _served_rows(
    rounds: list[dict[str, Any]], server: str, endpoint: str, *, new_tokens: int
) -> list[dict[str, Any]]:
    by_level: dict[int, list[dict[str, Any]]] = {}
    for measured in rounds:
        for run in measured[server].get(endpoint, []):
            by_level.setdefault(run["concurrency"], []).append(run)
    rows = []
    for concurrency, runs in sorted(by_level.items()):
        latencies = [latency for run in runs for latency in run["latencies_s"]]
        row: dict[str, Any] = {
            "concurrency": concurrency,
            "rounds": len(runs),
            "requests": len(latencies),
            "p50_s": percentile(latencies, 0.5),
            "p99_s": percentile(latencies, 0.99),
            "not_ok": sum(n for run in runs for s, n in run["statuses"].items() if s != "200"),
            "foreign_cpu_share_max": max(run.get("foreign_cpu_share", 0.0) for run in runs),
        }
        for key in MEDIAN_KEYS:
            row[key] = _median([run.get(key) for run in runs])
        if endpoint == "generate":
            row["tokens_per_s"] = row["requests_per_s"] * new_tokens
        for key in SERVER_KEYS:
            row[key] = _median([run["server"][key] for run in runs if "server" in run])
        rows.append(row)
    return rows


def _one_call_s(row: dict[str, Any]) -> float:
    """One in-process call at batch 1: the median of those timed alone (generation), else
    the mean (forward, timed in a loop)."""
    alone = row.get("latencies_s")
    return percentile(alone, 0.5) if alone else row["seconds_per_request"]


def _round_low_load(measured: dict[str, Any], endpoint: str, wait_s: float) -> dict[str, float]:
    """One round's p99 at one client against the bound from the same round's model time."""
    one = next(row for row in measured["in_process"][endpoint] if row["batch_size"] == 1)
    at_one = next(run for run in measured["batched"][endpoint] if run["concurrency"] == 1)
    return {
        "p99_s": at_one["p99_s"],
        "bound_s": wait_s + _one_call_s(one) + LATENCY_SLACK_S,
    }


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Medians per batch size and per concurrency level, the ratios, and the verdicts."""
    settings, rounds = report["settings"], report["rounds"]
    in_process = {
        endpoint: _in_process_rows(rounds, endpoint) for endpoint in ("generate", "forward")
    }
    served = {
        server: {
            endpoint: _served_rows(rounds, server, endpoint, new_tokens=settings["new_tokens"])
            for endpoint in ("generate", "forward", "healthz")
            if rounds[0].get(server, {}).get(endpoint)
        }
        for server in SERVERS
        if server in rounds[0]
    }
    limits = {
        endpoint: max(rows, key=lambda row: row["requests_per_s"])
        for endpoint, rows in in_process.items()
    }
    ratios: dict[str, Any] = {}
    for endpoint in ("generate", "forward"):
        batched = max(served["batched"][endpoint], key=lambda row: row["requests_per_s"])
        single = max(served["batch_size_1"][endpoint], key=lambda row: row["requests_per_s"])
        per_level = {
            str(b["concurrency"]): b["requests_per_s"] / s["requests_per_s"]
            for b, s in zip(
                served["batched"][endpoint], served["batch_size_1"][endpoint], strict=True
            )
        }
        ratios[endpoint] = {
            "saturation_over_limit": batched["requests_per_s"] / limits[endpoint]["requests_per_s"],
            "saturation_concurrency": batched["concurrency"],
            "limit_batch_size": limits[endpoint]["batch_size"],
            "batch_1_saturation_over_limit": single["requests_per_s"]
            / limits[endpoint]["requests_per_s"],
            "batched_over_batch_1_at_saturation": batched["requests_per_s"]
            / single["requests_per_s"],
            "batched_over_batch_1_per_concurrency": per_level,
        }
    # The "one generation": the median of the in-process generations at batch 1.
    wait_s = settings["max_wait_ms"] / 1e3
    low_load = {}
    for endpoint in ("generate", "forward"):
        alone = next(row for row in in_process[endpoint] if row["batch_size"] == 1)
        one_s = alone.get("p50_s", alone["seconds_per_request"])
        at_one = served["batched"][endpoint][0]
        own_p99 = alone.get("p99_s")
        low_load[endpoint] = {
            "p99_s": at_one["p99_s"],
            "p50_s": at_one["p50_s"],
            "one_in_process_s": one_s,
            "bound_s": wait_s + one_s + LATENCY_SLACK_S,
            "batch_1_p99_s": served["batch_size_1"][endpoint][0]["p99_s"],
            "in_process_p99_s": own_p99,
            # Like against like: the served p99 against the model's own p99 alone, so that
            # the machine's tail is on both sides and what is left is the server's.
            "same_percentile_bound_s": None
            if own_p99 is None
            else wait_s + own_p99 + LATENCY_SLACK_S,
            "per_round": [_round_low_load(measured, endpoint, wait_s) for measured in rounds],
        }
    http_stack = _http_stack(served)
    generation = ratios["generate"]["saturation_over_limit"]
    verdicts = {
        "generation_throughput": {
            "value": generation,
            "target": TARGET_GENERATION_RATIO,
            "met": generation >= TARGET_GENERATION_RATIO,
        },
        "generation_low_load_p99": {
            "value": low_load["generate"]["p99_s"],
            "target": low_load["generate"]["bound_s"],
            "met": low_load["generate"]["p99_s"] <= low_load["generate"]["bound_s"],
        },
    }
    return {
        "in_process": in_process,
        "limits": limits,
        "served": served,
        "ratios": ratios,
        "low_load": low_load,
        "http_stack": http_stack,
        "verdicts": verdicts,
    }


def _http_stack(served: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """httptools + uvloop (batched) against h11 + asyncio (batched_h11), level by level."""
    if "batched_h11" not in served:
        return {}
    compared: dict[str, list[dict[str, Any]]] = {}
    for endpoint, rows in served["batched_h11"].items():
        fast = {row["concurrency"]: row for row in served["batched"][endpoint]}
        compared[endpoint] = [
            {
                "concurrency": pure["concurrency"],
                "requests_per_s_ratio": fast[pure["concurrency"]]["requests_per_s"]
                / pure["requests_per_s"],
                "p50_s": fast[pure["concurrency"]]["p50_s"],
                "h11_p50_s": pure["p50_s"],
                "event_loop_cpu_s_per_request": fast[pure["concurrency"]][
                    "server_event_loop_cpu_s_per_request"
                ],
                "h11_event_loop_cpu_s_per_request": pure["server_event_loop_cpu_s_per_request"],
            }
            for pure in rows
            if pure["concurrency"] in fast
        ]
    return compared


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:.1f}"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def print_report(report: dict[str, Any]) -> None:
    settings, summary, machine = report["settings"], report["summary"], report["machine"]
    print(
        f"\n{machine['cpu_cores']} cores, Python {machine['python']}, torch {machine['torch']} "
        f"({machine['torch_threads']} threads); model {settings['model']}, context "
        f"{settings['max_seq_len']}; {settings['new_tokens']} new tokens after "
        f"{settings['prompt_bytes']}-byte prompts, forward rows of {settings['forward_tokens']} "
        f"tokens; batched server: max_batch_size {settings['max_batch_size']}, max_wait_ms "
        f"{settings['max_wait_ms']:g}; {settings['rounds']} round(s) of {settings['seconds']:g} s "
        f"per level; {report['seconds']:.0f} s"
    )
    print("\nIn-process (medians over rounds)\n")
    print(
        "| batch | generate tokens/s | generate requests/s | ms per generation "
        "| forward requests/s | others' CPU |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for g, f in zip(
        summary["in_process"]["generate"], summary["in_process"]["forward"], strict=True
    ):
        print(
            f"| {g['batch_size']} | {g['tokens_per_s']:.0f} | {g['requests_per_s']:.1f} | "
            f"{g['seconds_per_request'] * 1e3:.1f} | {f['requests_per_s']:.0f} | "
            f"{max(g['foreign_cpu_share_max'], f['foreign_cpu_share_max']):.0%} |"
        )
    print("\nServed (requests/s: median over rounds; p50/p99 over all rounds' requests)\n")
    print(
        "| server | endpoint | clients | requests/s | p50 ms | p99 ms | mean batch | model ms "
        "/ request | queue wait ms | padding | masked | client cores | server loop cores | "
        "server model cores | others' CPU |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for server, endpoints in summary["served"].items():
        for endpoint, rows in endpoints.items():
            for row in rows:
                flag = f" ({row['not_ok']} not 200)" if row["not_ok"] else ""
                padding, masked = row["padding_share"], row["masked_share"]
                print(
                    f"| {server} | {endpoint} | {row['concurrency']} | "
                    f"{row['requests_per_s']:.1f}{flag} | {_ms(row['p50_s'])} | "
                    f"{_ms(row['p99_s'])} | {_num(row['mean_batch_size'])} | "
                    f"{_ms(row['model_s_per_request'])} | {_ms(row['queue_wait_s'])} | "
                    f"{'–' if padding is None else f'{padding:.0%}'} | "
                    f"{'–' if masked is None else f'{masked:.0%}'} | "
                    f"{_num(row['client_cores'])} | {_num(row['server_event_loop_cores'])} | "
                    f"{_num(row['server_other_threads_cores'])} | "
                    f"{row['foreign_cpu_share_max']:.0%} |"
                )
    print()
    for endpoint, ratio in summary["ratios"].items():
        per_level = ", ".join(
            f"c={level} {value:.2f}"
            for level, value in ratio["batched_over_batch_1_per_concurrency"].items()
        )
        print(
            f"{endpoint}: served at saturation (c={ratio['saturation_concurrency']}) ÷ "
            f"in-process limit (batch {ratio['limit_batch_size']}) = "
            f"{ratio['saturation_over_limit']:.3f} (batch 1 served: "
            f"{ratio['batch_1_saturation_over_limit']:.3f}); batched ÷ batch 1: "
            f"{ratio['batched_over_batch_1_at_saturation']:.2f} at saturation ({per_level})"
        )
    for endpoint, low in summary["low_load"].items():
        print(
            f"{endpoint} at c=1: p99 {_ms(low['p99_s'])} ms (p50 {_ms(low['p50_s'])}) against "
            f"max_wait + one in-process call ({_ms(low['one_in_process_s'])} ms) + 5 ms = "
            f"{_ms(low['bound_s'])} ms; batch-1 server p99 {_ms(low['batch_1_p99_s'])} ms; "
            f"in-process p99 alone {_ms(low['in_process_p99_s'])} ms (same percentile: "
            f"max_wait + it + 5 ms = {_ms(low['same_percentile_bound_s'])} ms); per round "
            "p99/bound: "
            + ", ".join(f"{_ms(r['p99_s'])}/{_ms(r['bound_s'])}" for r in low["per_round"])
        )
    for endpoint, levels in summary["http_stack"].items():
        print(
            f"{endpoint}, httptools + uvloop against h11 + asyncio: "
            + "; ".join(
                f"c={level['concurrency']} requests/s x{level['requests_per_s_ratio']:.2f}, "
                f"p50 {_ms(level['p50_s'])} against {_ms(level['h11_p50_s'])} ms, event loop "
                f"{_ms(level['event_loop_cpu_s_per_request'])} against "
                f"{_ms(level['h11_event_loop_cpu_s_per_request'])} ms of CPU per request"
                for level in levels
            )
        )
    answers = report["answers"]
    print(
        f"answers checked: {answers['generate_checked']} generations "
        f"({answers['generate_differs']} differ from in-process greedy), "
        f"{answers['forward_checked']} forwards; servers exited {report['server_exit_codes']}"
    )
    for name, verdict in summary["verdicts"].items():
        comparison = "≥" if name == "generation_throughput" else "≤"
        print(
            f"{name}: {verdict['value']:.4f} (target {comparison} {verdict['target']:.4f}): "
            f"{'met' if verdict['met'] else 'MISSED'}"
        )
