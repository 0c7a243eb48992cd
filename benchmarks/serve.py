"""Serving: ``steadytrain serve`` against the model's own in-process limit and against batch 1.

A short training of examples/tiny.yaml (or a run given with ``--run-dir``) is served as users
start it (``steadytrain serve RUN_DIR --port P``, subprocesses on loopback): with the run's
serve settings ("batched", the defaults unless ``--set`` says otherwise), with
``serve.max_batch_size=1`` ("batch_size_1"), and, at the lowest and highest concurrency
only, with uvicorn's pure-Python HTTP stack instead of httptools + uvloop ("batched_h11").
The physical limit is the same weights loaded the same way (``load_served_model``) and
called in this process without HTTP or queues: ``generate`` (the server's batching by
decoding step over the KV cache) and ``forward_rows`` + ``token_logprobs`` (what a
/v1/forward request costs the model), swept over batch sizes. The served side is driven by
closed-loop clients (serve_load.py, one lean HTTP/1.1 connection each) at each concurrency
level: /v1/generate with ``--new-tokens`` greedy tokens per request and /v1/forward
(log-probabilities of ``--forward-tokens`` tokens), plus /healthz (HTTP alone) on the batched
server. The blocks take turns in each round (the order flips every round); the client
shares the CPU with the server, so its CPU is measured beside the server's.

    .venv/bin/python benchmarks/serve.py [--rounds 3] [--seconds 3] [--run-dir RUN]
        [--json OUT] [--check] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from checkpoint_io import source_provenance
from checkpoint_io_measurements import ForeignCpu
from overhead import DEFAULT_CONFIG, alternating_orders, prepare_runs, train_logged, write_summary
from serve_load import Load, ServerProcess, drive, start_server, wait_ready
from serve_report import print_report, summarize
from steadytrain.model import GPT
from steadytrain.serve import (
    Sampling,
    ServedModel,
    forward_rows,
    generate,
    load_run_config,
    load_served_model,
    pad_rows,
    token_logprobs,
)

BLOCKS = ("in_process", "batched", "batch_size_1", "batched_h11")
# The batched server with uvicorn's pure-Python stack instead of httptools + uvloop
# (uvicorn[standard]), at one client and at the most clients only: what they buy.
PURE_PYTHON_HTTP = ["serve.http=h11", "serve.event_loop=asyncio"]
NUM_PROMPTS = 64
PROMPT_BYTES = 32
PROMPT_STRIDE = 211  # bytes between prompts' starts in the source text
QUICK = {
    "rounds": 1,
    "seconds": 0.3,
    "concurrency": [1, 4],
    "batch_sizes": [1, 4],
    "new_tokens": 8,
    "in_process_seconds": 0.2,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--rounds", type=int, default=3, help="interleaved repetitions")
    add("--seconds", type=float, default=3.0, help="timed load per concurrency level")
    add("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    add("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="in-process")
    add("--new-tokens", type=int, default=64, help="tokens generated per request (greedy)")
    add("--forward-tokens", type=int, default=64, help="tokens per /v1/forward request")
    add("--in-process-seconds", type=float, default=1.0, help="per in-process forward sweep")
    add("--train-steps", type=int, default=60, help="training steps when a run is trained")
    add("--run-dir", type=Path, default=None, help="serve this run (trained here if unfinished)")
    add("--work-dir", type=Path, default=None, help="default: a temporary directory")
    add("--set", dest="settings", action="append", default=[], help="serve.* for 'batched'")
    add("--server-env", action="append", default=[], help="KEY=VALUE for both servers")
    add("--json", type=Path, default=None, help="write every measurement here")
    add("--check", action="store_true", help="exit 1 when a target is missed")
    add("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if 1 not in args.concurrency or 1 not in args.batch_sizes:
        parser.error("--concurrency and --batch-sizes must include 1 (the low-load target)")
    return args


# ---------------------------------------------------------------------------------------------
# The run, the requests, and the in-process limit
# ---------------------------------------------------------------------------------------------


def trained_run(args: argparse.Namespace, *, work_dir: Path) -> tuple[Path, dict[str, Any]]:
    """``--run-dir`` if it has final weights; else a short training of the tiny config there."""
    run_dir = (args.run_dir or work_dir / "run").resolve()
    if (run_dir / "final" / "model.safetensors").is_file():
        return run_dir, {"trained_here": False}
    overrides = [
        f"train.max_steps={args.train_steps}",
        "log.every_steps=10",
        "train.eval_batches=0",
        "checkpoint.every_steps=0",
        "data.ledger=false",
    ]
    prepare_runs(DEFAULT_CONFIG, overrides, nproc=2)
    print(f"training {args.train_steps} steps of {DEFAULT_CONFIG.name} into {run_dir}", flush=True)
    records, launch = train_logged(
        config_path=DEFAULT_CONFIG, overrides=overrides, nproc=2, run_dir=run_dir
    )
    return run_dir, {
        "trained_here": True,
        "steps": args.train_steps,
        "final_loss": records[-1]["loss"],
        "seconds": launch["launch_seconds"],
    }


def source_text() -> str:
    """ASCII Python source (the os module) to cut prompts and forward rows from."""
    return Path(os.__file__).read_text(encoding="ascii", errors="ignore")


def requests_for(args: argparse.Namespace, served: ServedModel) -> dict[str, list[Any]]:
    text = source_text()
    forward_tokens = min(args.forward_tokens, served.max_seq_len or args.forward_tokens)
    starts = [number * PROMPT_STRIDE for number in range(NUM_PROMPTS)]
    return {
        "prompts": [text[start : start + PROMPT_BYTES] for start in starts],
        "rows": [list(text[start : start + forward_tokens].encode()) for start in starts],
    }


def in_process_generation(
    served: ServedModel,
    prompts: list[str],
    *,
    batch_size: int,
    new_tokens: int,
    seconds: float,
) -> dict[str, Any]:
    """Greedy generation of ``max(2·batch, 16)`` prompts at a time, batched by decoding step,
    repeated for at least ``seconds``; at batch 1 each generation is timed alone (the
    model's own latency distribution, as many as one served level sees)."""
    per_call = 1 if batch_size == 1 else max(2 * batch_size, 16)
    model = served.model
    assert isinstance(model, GPT)
    latencies, count = [], 0
    with ForeignCpu() as others:
        while count < 16 or sum(latencies) < seconds:
            group = [list(prompts[(count + n) % len(prompts)].encode()) for n in range(per_call)]
            started = time.perf_counter()
            generate(
                model,
                group,
                sampling=Sampling(max_new_tokens=new_tokens, temperature=0),
                max_batch_size=batch_size,
            )
            latencies.append(time.perf_counter() - started)
            count += per_call
    elapsed = sum(latencies)
    return {
        "batch_size": batch_size,
        "requests": count,
        "seconds": elapsed,
        "requests_per_s": count / elapsed,
        "tokens_per_s": count * new_tokens / elapsed,
        "seconds_per_request": elapsed / count,
        "foreign_cpu_share": others.share,
        **({"latencies_s": latencies} if batch_size == 1 else {}),
    }


def in_process_forward(
    served: ServedModel, rows: list[list[int]], *, batch_size: int, seconds: float
) -> dict[str, Any]:
    """What the server's model thread does for forward batches of ``batch_size`` requests
    (pad, forward, per-row log-probabilities), repeated for at least ``seconds``."""
    count, started = 0, time.perf_counter()
    with torch.inference_mode(), ForeignCpu() as others:
        while count == 0 or time.perf_counter() - started < seconds:
            group = [rows[(count + number) % len(rows)] for number in range(batch_size)]
            outputs = forward_rows(served.model, pad_rows(group, device=served.device))
            for output, row in zip(outputs, group, strict=True):
                token_logprobs(output, row)
            count += batch_size
        elapsed = time.perf_counter() - started
    return {
        "batch_size": batch_size,
        "requests": count,
        "seconds": elapsed,
        "requests_per_s": count / elapsed,
        "seconds_per_request": elapsed / count,
        "foreign_cpu_share": others.share,
    }


def expected_answers(args: argparse.Namespace, served: ServedModel, prompts: list[str]) -> Any:
    """Each prompt's greedy tokens in-process, for checking what the server answers."""
    assert isinstance(served.model, GPT)
    return generate(
        served.model,
        [list(prompt.encode()) for prompt in prompts],
        sampling=Sampling(max_new_tokens=args.new_tokens, temperature=0),
        max_batch_size=8,
    )


# ---------------------------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------------------------


def loads(
    args: argparse.Namespace, requests: dict[str, list[Any]], expected: list[list[int]]
) -> tuple[dict[str, Load], dict[str, int]]:
    """The three kinds of load, and the tally their answer checks keep."""
    tally = {"generate_checked": 0, "generate_differs": 0, "forward_checked": 0}
    forward_logprobs = len(requests["rows"][0]) - 1

    def check_generation(index: int, answer: dict[str, Any]) -> None:
        assert answer["num_tokens"] == args.new_tokens, answer
        tally["generate_checked"] += 1
        tally["generate_differs"] += answer["tokens"] != expected[index % len(expected)]

    def check_forward(index: int, answer: dict[str, Any]) -> None:
        assert len(answer["logprobs"]) == forward_logprobs, answer
        tally["forward_checked"] += 1

    bodies = [
        {"prompt": prompt, "max_new_tokens": args.new_tokens, "temperature": 0}
        for prompt in requests["prompts"]
    ]
    return {
        "generate": Load("generate", "/v1/generate", bodies, check_generation),
        "forward": Load(
            "forward",
            "/v1/forward",
            [{"tokens": row, "output": "logprobs"} for row in requests["rows"]],
            check_forward,
        ),
        "healthz": Load("", "/healthz", None),
    }, tally


def run_block(
    block: str,
    args: argparse.Namespace,
    *,
    served: ServedModel,
    requests: dict[str, list[Any]],
    servers: dict[str, ServerProcess],
    kinds: dict[str, Load],
) -> dict[str, list[dict[str, Any]]]:
    if block == "in_process":
        sizes = args.batch_sizes
        generation = [
            in_process_generation(
                served,
                requests["prompts"],
                batch_size=size,
                new_tokens=args.new_tokens,
                seconds=args.seconds if size == 1 else args.in_process_seconds,
            )
            for size in sizes
        ]
        forward = [
            in_process_forward(
                served, requests["rows"], batch_size=size, seconds=args.in_process_seconds
            )
            for size in sizes
        ]
        for g, f in zip(generation, forward, strict=True):
            print(
                f"    in-process batch {g['batch_size']:>3}: generate {g['tokens_per_s']:7.0f} "
                f"tokens/s, forward {f['requests_per_s']:7.0f} requests/s",
                flush=True,
            )
        return {"generate": generation, "forward": forward}
    measured: dict[str, list[dict[str, Any]]] = {}
    endpoints = ["generate", "forward"] + (["healthz"] if block == "batched" else [])
    for endpoint in endpoints:
        levels = args.concurrency
        if endpoint == "healthz" or block == "batched_h11":
            levels = sorted({min(args.concurrency), max(args.concurrency)})
        measured[endpoint] = []
        for concurrency in levels:
            result = drive(
                servers[block], kinds[endpoint], concurrency=concurrency, seconds=args.seconds
            )
            measured[endpoint].append(result)
            print(
                f"    {block:<12} {endpoint:<8} c={concurrency:<3} "
                f"{result['requests_per_s']:7.1f} requests/s, p50 {result['p50_s'] * 1e3:7.1f} "
                f"ms, p99 {result['p99_s'] * 1e3:7.1f} ms, client {result['client_cores']:.2f} "
                f"cores, server loop {result['server_event_loop_cores']:.2f} / model "
                f"{result['server_other_threads_cores']:.2f} cores",
                flush=True,
            )
    return measured


def measure(args: argparse.Namespace, *, work_dir: Path) -> dict[str, Any]:
    run_dir, training = trained_run(args, work_dir=work_dir)
    config = load_run_config(run_dir, args.settings)
    served = load_served_model(config, run_dir=run_dir)
    requests = requests_for(args, served)
    settings = {"batched": list(args.settings)}
    settings["batch_size_1"] = [*args.settings, "serve.max_batch_size=1"]
    settings["batched_h11"] = [*args.settings, *PURE_PYTHON_HTTP]
    env = dict(item.split("=", 1) for item in args.server_env)
    servers = {
        name: start_server(
            name, run_dir, settings=wanted, log_path=work_dir / f"{name}.log", env=env
        )
        for name, wanted in settings.items()
    }
    rounds = []
    try:
        for server in servers.values():
            wait_ready(server)
        expected = expected_answers(args, served, requests["prompts"])
        kinds, tally = loads(args, requests, expected)
        for number, order in alternating_orders(BLOCKS, args.rounds):
            print(f"  round {number + 1}: {', '.join(order)}", flush=True)
            measured = {"round": number + 1, "order": order}
            for block in order:
                measured[block] = run_block(
                    block, args, served=served, requests=requests, servers=servers, kinds=kinds
                )
            rounds.append(measured)
    finally:
        for server in servers.values():
            server.process.terminate()  # all drain at once
        exit_codes = {name: server.stop(signalled=True) for name, server in servers.items()}
    return {
        "benchmark": "serve",
        "settings": {
            "run_dir": str(run_dir),
            "training": training,
            "model": {"factory": config.model.factory, **config.model.kwargs},
            "max_seq_len": served.max_seq_len,
            "serve": {name: wanted for name, wanted in settings.items()},
            "server_env": env,
            "max_batch_size": config.serve.max_batch_size,
            "max_wait_ms": config.serve.max_wait_ms,
            "max_queue": config.serve.max_queue,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "batch_sizes": args.batch_sizes,
            "new_tokens": args.new_tokens,
            "prompt_bytes": PROMPT_BYTES,
            "forward_tokens": len(requests["rows"][0]),
            "quick": args.quick,
        },
        "machine": {
            "cpu_cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_after": os.getloadavg(),
            "source": source_provenance(),
        },
        "answers": tally,
        "server_exit_codes": exit_codes,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="steadytrain-serve-"))
    started = time.perf_counter()
    try:
        report = measure(args, work_dir=work_dir)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    report["seconds"] = time.perf_counter() - started
    report["summary"] = summarize(report)
    print_report(report)
    write_summary(args.json, report)
    met = all(verdict["met"] for verdict in report["summary"]["verdicts"].values())
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
