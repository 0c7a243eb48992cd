"""Generation over the KV cache against the model's own full forward pass (the whole context
recomputed at every step): same logits within float tolerance, same greedy tokens, for
sequences of different lengths that join and leave the batch at different steps, past the
model's context, and for GPTs of other shapes; and what the metrics are told it cost."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from steadytrain.model import GPT, KVCache
from steadytrain.serve import DecodingBatch, Generation, Sampling, generate

GREEDY = Sampling(max_new_tokens=1, temperature=0.0)


def full_recompute(model: GPT, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy tokens with no cache: the last max_seq_len tokens through forward() each step."""
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(num_tokens):
            logits = model(torch.tensor([tokens[-model.max_seq_len :]]))
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def gpt(**kwargs: int) -> GPT:
    torch.manual_seed(0)
    return GPT(**kwargs).eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_seq_len": 32, "num_layers": 2, "width": 32, "num_heads": 2},
        # Other shapes; a context over 64, so the cache grows while rows hold positions.
        {"max_seq_len": 80, "num_layers": 3, "width": 48, "num_heads": 4},
    ],
)
def test_cached_steps_match_the_full_forward_as_rows_join_and_leave(
    kwargs: dict[str, int],
) -> None:
    model = gpt(**kwargs)
    window = model.max_seq_len
    generator = torch.Generator().manual_seed(1)
    # (prompt length, new tokens, step it joins at); the third and fifth outgrow the context.
    plan = [(3, 20, 0), (1, 6, 0), (window - 5, 12, 2), (12, 9, 4), (7, window, 5), (2, 4, 9)]
    prompts = [
        torch.randint(0, 256, (length,), generator=generator).tolist() for length, *_ in plan
    ]
    generations = [
        Generation(prompt, Sampling(max_new_tokens=new, temperature=0.0))
        for prompt, (_, new, _) in zip(prompts, plan, strict=True)
    ]
    batch = DecodingBatch(model, max_rows=4)
    waiting = list(zip(generations, [start for *_, start in plan], strict=True))
    number = 0
    with torch.inference_mode():
        while waiting or batch.rows:
            while waiting and waiting[0][1] <= number and len(batch.rows) < batch.max_rows:
                batch.join(waiting.pop(0)[0])
            if batch.rows:
                contexts = [torch.tensor([g.context(window)]) for g in batch.rows]
                expected = torch.stack([model(context)[0, -1] for context in contexts])
                step = batch.step()
                assert torch.allclose(step.logits, expected, atol=1e-5), number
                assert step.tokens == expected.argmax(dim=1).tolist()
                for done in [g for g in batch.rows if g.done]:
                    batch.leave(done)
            number += 1
    for prompt, generation, (_, new, _) in zip(prompts, generations, plan, strict=True):
        assert generation.generated == full_recompute(model, prompt, new)


def test_in_process_generation_matches_the_full_forward_alone() -> None:
    model = gpt(max_seq_len=32, num_layers=2, width=32, num_heads=2)
    prompts = [[5, 6, 7], [1], list(range(40, 70)), [9, 9, 9, 9, 9, 9]]
    batched = generate(model, prompts, sampling=Sampling(40, temperature=0.0), max_batch_size=3)
    assert batched == [full_recompute(model, prompt, 40) for prompt in prompts]


def test_a_step_reports_its_padding_and_masked_positions() -> None:
    model = gpt(max_seq_len=64, num_layers=1, width=32, num_heads=2)
    batch = DecodingBatch(model, max_rows=4)
    with torch.inference_mode():
        first, second = Generation([1] * 10, GREEDY), Generation([2] * 6, GREEDY)
        batch.join(first)
        batch.join(second)
        cost = batch.step().cost  # one prefill: 6 is at least half of 10
        assert (cost.model_calls, cost.positions, cost.padding) == (1, 20, 4)
        assert (cost.attended, cost.masked) == (0, 0)
        third = Generation([3] * 4, GREEDY)  # under half of 10 and 6's: a prefill of its own
        batch.join(third)
        cost = batch.step([first, second, third]).cost
        # 10 + 1 and 6 + 1 positions attended over a span of 11; third prefilled in the same
        # pass, in a group of its own.
        assert (cost.model_calls, cost.positions, cost.padding) == (1, 2 + 4, 0)
        assert (cost.attended, cost.masked) == (2 * 11, 11 - 7)
        batch.leave(first)  # the last row (third) moves into its place
        assert batch.rows == [third, second] and batch.cache.lengths[:3] == [4, 7, 0]
        cost = batch.step().cost
        assert (cost.model_calls, cost.positions, cost.attended, cost.masked) == (1, 2, 16, 3)


def test_a_failed_step_leaves_its_rows_to_be_prefilled_again() -> None:
    class FailsOnce(GPT):
        failures = 1

        def extend(self, cache: KVCache, **rows: Any) -> torch.Tensor:
            if rows.get("decode_rows") and self.failures:  # the first step from the cache
                self.failures -= 1
                raise RuntimeError("one failure")
            return super().extend(cache, **rows)

    torch.manual_seed(0)
    model = FailsOnce(max_seq_len=32, num_layers=1, width=32, num_heads=2).eval()
    prompts = [[4, 5, 6], [7, 8]]
    generations = [Generation(prompt, Sampling(12, temperature=0.0)) for prompt in prompts]
    batch = DecodingBatch(model, max_rows=2)
    with torch.inference_mode():
        for generation in generations:
            batch.join(generation)
        batch.step()
        with pytest.raises(RuntimeError, match="one failure"):
            batch.step()
        assert batch.cache.lengths[:2] == [0, 0]
        for generation in generations:  # each alone, as the server retries a failed batch
            batch.step([generation])
        while not generations[0].done:
            batch.step()
    for prompt, generation in zip(prompts, generations, strict=True):
        assert generation.generated == full_recompute(model, prompt, 12)
