"""The batcher's timing rules, the model thread's failure isolation and the weights' checks,
with real threads, a real event loop, real files and a real (small, untrained) GPT; a failing
model at the model boundary."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from steadytrain.checkpoint import save_final_weights
from steadytrain.config import ConfigError, config_from_dict, dump_config
from steadytrain.model import GPT, KVCache
from steadytrain.serve import (
    FORWARD,
    GENERATE,
    Batcher,
    BatcherClosed,
    Faults,
    ForwardRequest,
    GenerateRequest,
    ModelWorker,
    Pending,
    QueueFull,
    Sampling,
    ServedModel,
    ServeFailure,
    ServeMetrics,
    ServeRefused,
    generate,
    load_run_config,
    load_served_model,
)
from steadytrain.serve.app import LoopReply, ServerState


class Collected:
    """A reply that records what the model's thread sent (a Reply at its Protocol)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.outcome: Any = None
        self.done = threading.Event()

    def token(self, token: int) -> None:
        self.tokens.append(token)

    def finish(self, result: Any) -> None:
        self.outcome = result
        self.done.set()

    def fail(self, error: ServeFailure) -> None:
        self.outcome = error
        self.done.set()


def pending(kind: str = FORWARD, *, timeout: float = 60.0, payload: Any = None) -> Pending:
    return Pending(kind, payload, Collected(), deadline=time.monotonic() + timeout)


def test_the_wait_counts_from_the_first_request_not_from_the_take() -> None:
    batcher = Batcher(max_queue=8, kinds=(FORWARD,))
    first = pending()
    batcher.put(first)
    time.sleep(0.3)  # the first request has waited longer than max_wait already
    started = time.monotonic()
    taken, _ = batcher.take(FORWARD, limit=4, max_wait_s=0.25)
    assert taken == [first]
    assert time.monotonic() - started < 0.1


def test_a_batch_waits_for_more_requests_until_the_wait_ends() -> None:
    batcher = Batcher(max_queue=8, kinds=(FORWARD,))
    first, second = pending(), pending()
    batcher.put(first)
    threading.Timer(0.05, batcher.put, args=(second,)).start()
    started = time.monotonic()
    taken, _ = batcher.take(FORWARD, limit=3, max_wait_s=0.4)
    elapsed = time.monotonic() - started
    assert taken == [first, second]
    assert 0.3 <= elapsed < 0.9  # the whole wait (no third came), counted from the first


def test_a_full_batch_and_a_zero_wait_do_not_wait() -> None:
    batcher = Batcher(max_queue=8, kinds=(FORWARD,))
    requests = [pending() for _ in range(3)]
    for request in requests:
        batcher.put(request)
    started = time.monotonic()
    full, _ = batcher.take(FORWARD, limit=2, max_wait_s=5.0)
    rest, _ = batcher.take(FORWARD, limit=8, max_wait_s=0.0)
    assert (full, rest) == (requests[:2], requests[2:])
    assert time.monotonic() - started < 0.1
    assert batcher.take(FORWARD, limit=8, max_wait_s=5.0)[0] == []  # nothing queued: no wait


def test_gone_and_expired_requests_are_dropped_before_a_batch_forms() -> None:
    batcher = Batcher(max_queue=8, kinds=(FORWARD,))
    gone, expired, live = pending(), pending(timeout=0.05), pending()
    for request in (gone, expired, live):
        batcher.put(request)
    gone.gone = True
    time.sleep(0.1)
    taken, dropped = batcher.take(FORWARD, limit=8, max_wait_s=0.0)
    assert taken == [live]
    assert (dropped.gone, dropped.expired) == ([gone], [expired])


def test_the_queue_is_bounded_and_a_discarded_request_frees_its_place() -> None:
    batcher = Batcher(max_queue=2, kinds=(FORWARD, GENERATE))
    first, second = pending(), pending()
    batcher.put(first)
    batcher.put(second)
    with pytest.raises(QueueFull):
        batcher.put(pending())
    batcher.put(pending(GENERATE))  # each kind has its own bound
    batcher.discard(first)
    batcher.put(pending())
    assert batcher.close("draining") and batcher.queued() == 0
    with pytest.raises(BatcherClosed, match="draining"):
        batcher.put(pending())


class FailsOn(GPT):
    """A GPT that raises for any call holding token 7 (a request that breaks the model)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _refuse_seven(tokens)
        return super().forward(tokens)

    def extend(self, cache: KVCache, **rows: Any) -> torch.Tensor:
        if rows.get("decode_tokens") is not None:
            _refuse_seven(rows["decode_tokens"])
        for prefill in rows.get("prefills", ()):
            _refuse_seven(prefill.tokens)
        return super().extend(cache, **rows)


def _refuse_seven(tokens: torch.Tensor) -> None:
    if (tokens == 7).any():
        raise RuntimeError("token 7 breaks this model")


def served(model: nn.Module, **serve: Any) -> ServedModel:
    config = config_from_dict({"serve": {"max_batch_size": 4, "max_wait_ms": 50, **serve}})
    return ServedModel(
        model=model,
        config=config,
        source="test",
        step=None,
        device=torch.device("cpu"),
        causal=True,
        generates=True,
        max_seq_len=32,
        vocab_size=256,
    )


def small_gpt(kind: type[GPT] = GPT) -> GPT:
    torch.manual_seed(0)
    return kind(max_seq_len=32, num_layers=1, width=32, num_heads=2).eval()


def test_a_failing_request_fails_alone_and_the_loop_keeps_serving() -> None:
    batcher = Batcher(max_queue=16, kinds=(FORWARD, GENERATE))
    worker = ModelWorker(served(small_gpt(FailsOn)), batcher, ServeMetrics(max_batch_size=4))
    worker.start()
    good = [pending(payload=ForwardRequest([1, 2, 3][: n + 1], "logprobs")) for n in range(3)]
    bad = pending(payload=ForwardRequest([1, 7], "logprobs"))
    making = [pending(GENERATE, payload=GenerateRequest([1, 2], Sampling(4, 0.0))) for _ in "ab"]
    poisoned = pending(GENERATE, payload=GenerateRequest([7], Sampling(4, 0.0)))
    for request in [*good[:2], bad, good[2], *making, poisoned]:
        batcher.put(request)
    for request in [*good, bad, *making, poisoned]:
        assert request.reply.done.wait(30)  # type: ignore[attr-defined]
    outcomes = {id(r): r.reply.outcome for r in [*good, bad, *making, poisoned]}  # type: ignore[attr-defined]
    for failed in (bad, poisoned):
        assert isinstance(outcomes[id(failed)], ServeFailure)
        assert outcomes[id(failed)].status == 500
        assert "token 7 breaks this model" in str(outcomes[id(failed)])
    assert [len(outcomes[id(r)]["logprobs"]) for r in good] == [0, 1, 2]
    # A prefill that failed with the poisoned one in it was run again for each alone.
    alone = generate(small_gpt(), [[1, 2]], sampling=Sampling(4, 0.0))[0]
    assert all(outcomes[id(r)]["tokens"] == alone for r in making)
    assert worker.alive
    worker.stop(timeout=5)
    assert not worker.alive


def test_batched_generation_gives_each_prompt_what_it_gets_alone() -> None:
    model = small_gpt()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    greedy = Sampling(max_new_tokens=30, temperature=0.0)  # past max_seq_len: the context slides
    sampled = Sampling(max_new_tokens=5, temperature=1.0, top_k=20, seed=3)
    for sampling in (greedy, sampled):
        alone = [generate(model, [p], sampling=sampling)[0] for p in prompts]
        together = generate(model, prompts, sampling=sampling, max_batch_size=2)
        assert together == alone


def test_a_reply_is_never_set_on_a_future_whose_client_has_gone() -> None:
    async def scenario() -> tuple[bool, Any]:
        loop = asyncio.get_running_loop()
        left, stayed = LoopReply(loop, stream=False), LoopReply(loop, stream=True)
        left.future.cancel()  # its client disconnected
        threading.Thread(target=left.finish, args=({"text": "x"},)).start()
        threading.Thread(target=stayed.finish, args=({"text": "y"},)).start()
        result = await asyncio.wait_for(stayed.future, 5)
        await asyncio.sleep(0.05)
        return left.future.cancelled(), result

    cancelled, result = asyncio.run(scenario())
    assert cancelled and result == {"text": "y"}


def test_a_running_generation_past_its_time_is_stopped_with_504() -> None:
    batcher = Batcher(max_queue=4, kinds=(FORWARD, GENERATE))
    slow = Faults(step_delay_s=0.05)  # about 20 decoding steps a second
    worker = ModelWorker(served(small_gpt()), batcher, ServeMetrics(max_batch_size=4), faults=slow)
    worker.start()
    late = pending(GENERATE, timeout=0.5, payload=GenerateRequest([1], Sampling(1000, 0.0)))
    batcher.put(late)
    assert late.reply.done.wait(10)  # type: ignore[attr-defined]
    outcome, tokens = late.reply.outcome, late.reply.tokens  # type: ignore[attr-defined]
    assert isinstance(outcome, ServeFailure) and outcome.status == 504
    assert 0 < len(tokens) < 100  # it ran, then was stopped, not left to run on
    worker.stop(timeout=5)


class BrokenReply(Collected):
    def finish(self, result: Any) -> None:
        raise RuntimeError("a bug in delivering results")


def test_readiness_fails_when_the_batch_loop_dies() -> None:
    batcher = Batcher(max_queue=4, kinds=(FORWARD, GENERATE))
    worker = ModelWorker(served(small_gpt()), batcher, ServeMetrics(max_batch_size=4))
    state = ServerState(served=worker.served, worker=worker)
    worker.start()
    assert state.not_ready() is None
    batcher.put(Pending(FORWARD, ForwardRequest([1, 2], "logits"), BrokenReply(), deadline=1e12))
    deadline = time.monotonic() + 10
    while worker.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    reason = state.not_ready()
    assert reason is not None and "a bug in delivering results" in reason
    with pytest.raises(BatcherClosed):  # new requests are refused rather than left waiting
        batcher.put(pending())


def test_weights_that_are_cut_short_or_do_not_fit_are_refused(tmp_path: Path) -> None:
    config = config_from_dict(
        {"run_dir": str(tmp_path), "data": {"seq_len": 32}, "model": {"kwargs": {"width": 32}}}
    )
    (tmp_path / "config.yaml").write_text(dump_config(config))
    weights = tmp_path / "final" / "model.safetensors"
    with pytest.raises(ServeRefused, match="missing, so the run has not finished"):
        load_served_model(load_run_config(tmp_path), run_dir=tmp_path)
    save_final_weights(small_gpt().state_dict(), weights)  # width 32, one layer: not this model
    with pytest.raises(ServeRefused, match="does not fit the model"):
        load_served_model(load_run_config(tmp_path), run_dir=tmp_path)
    model = GPT(max_seq_len=32, width=32)
    save_final_weights(model.state_dict(), weights)
    loaded = load_served_model(load_run_config(tmp_path), run_dir=tmp_path)
    assert loaded.generates and loaded.causal and loaded.max_seq_len == 32
    assert torch.equal(loaded.model.head.weight, model.head.weight)
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ServeRefused, match="offsets do not match the size"):
        load_served_model(load_run_config(tmp_path), run_dir=tmp_path)
    with pytest.raises(ConfigError, match="serve takes only serve"):
        load_run_config(tmp_path, ["train.lr=1"])
    with pytest.raises(ConfigError, match=r"no checkpoint at that step .*steps there: none"):
        load_served_model(load_run_config(tmp_path), run_dir=tmp_path, checkpoint_step=5)


def test_a_model_not_known_causal_batches_only_rows_of_equal_length() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 4)).eval()
    batcher = Batcher(max_queue=8, kinds=(FORWARD, GENERATE))
    metrics = ServeMetrics(max_batch_size=4)
    not_causal = dataclasses.replace(served(model), causal=False, generates=False)
    worker = ModelWorker(not_causal, batcher, metrics)
    rows = [[1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]]
    requests = [pending(payload=ForwardRequest(row, "logits")) for row in rows]
    for request in requests:
        batcher.put(request)
    worker.start()
    for request, row in zip(requests, rows, strict=True):
        assert request.reply.done.wait(10)  # type: ignore[attr-defined]
        with torch.inference_mode():
            alone = model(torch.tensor([row]))[0]
        result = torch.tensor(request.reply.outcome["logits"])  # type: ignore[attr-defined]
        assert torch.allclose(result, alone, atol=1e-6)
    labels = {"kind": FORWARD}
    assert metrics.registry.get_sample_value("steadytrain_serve_batch_size_count", labels) == 2
    assert metrics.registry.get_sample_value("steadytrain_serve_batch_size_sum", labels) == 3
    assert metrics.registry.get_sample_value("steadytrain_serve_padding_tokens_total", labels) == 0
    worker.stop(timeout=5)
