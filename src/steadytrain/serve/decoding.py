"""Generation batched by decoding step over one KV cache: sequences join and leave between
steps, and each step adds one token to each.

A sequence that joins is prefilled (its prompt run once, its keys and values kept in a cache
row); after that a step computes one new position per sequence, at the sequence's own
position, its attention masked to its own length. Joining sequences are prefilled together,
right-padded, in groups where no row is padded past twice its length, in the same pass
through the layers as the running sequences' step (one model call per step). The model's
``max_seq_len`` bounds the context: a sequence longer than it keeps its last ``max_seq_len``
tokens, which with learned positions means running that window again at every step (such
rows are all ``max_seq_len`` long, so they batch without padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from steadytrain.model import GPT, KVCache, Prefill
from steadytrain.serve.generation import Generation, Sampling, pad_rows, sample


@dataclass
class StepCost:
    """What one step computed, for the metrics: positions run through the whole model
    (prefill rows padded to their group's longest, one per cached row), and positions of
    the cache the cached rows' attention read (up to the longest row: the rest masked)."""

    model_calls: int = 0
    positions: int = 0
    padding: int = 0
    attended: int = 0
    masked: int = 0


@dataclass
class Step:
    """One new token for each sequence stepped, the logits it came from, and the cost."""

    tokens: list[int]
    logits: torch.Tensor  # (sequences, vocab), on the host
    cost: StepCost = field(default_factory=StepCost)


class DecodingBatch:
    """Up to ``max_rows`` generations sharing one KV cache (row ``i`` is ``rows[i]``)."""

    def __init__(self, model: GPT, *, max_rows: int) -> None:
        self.model = model
        self.max_rows = max_rows
        self.cache = KVCache(model, num_rows=max_rows)
        self.rows: list[Generation] = []
        self._row_of: dict[int, int] = {}  # id(generation) -> its row in ``rows``

    def join(self, generation: Generation) -> None:
        """Give ``generation`` a cache row; its next step prefills it."""
        if len(self.rows) >= self.max_rows:
            raise ValueError(f"the batch holds {self.max_rows} sequences already")
        if not generation.prompt:
            raise ValueError("a prompt needs at least one token")
        self.cache.lengths[len(self.rows)] = 0
        self._row_of[id(generation)] = len(self.rows)
        self.rows.append(generation)

    def leave(self, generation: Generation) -> None:
        """Free ``generation``'s row; the last row moves into it, so rows stay packed."""
        row, last = self._row(generation), len(self.rows) - 1
        if row != last:
            self.cache.move(last, row)
            self.rows[row] = self.rows[last]
            self._row_of[id(self.rows[row])] = row
        self.cache.lengths[last] = 0
        self.rows.pop()
        del self._row_of[id(generation)]

    def step(self, generations: Sequence[Generation] | None = None) -> Step:
        """One new token for each of ``generations`` (default: every row), appended to it.

        If a model call raises, the sequences stepped lose their cached positions (their
        next step prefills them again), so a retry of any of them alone starts clean.
        """
        chosen = list(self.rows if generations is None else generations)
        rows = [self._row(generation) for generation in chosen]
        try:
            logits, cost = self._logits(chosen, rows)
            tokens = _sample_all(logits, chosen)
        except BaseException:
            for row in rows:
                self.cache.lengths[row] = 0
            raise
        for generation, token in zip(chosen, tokens, strict=True):
            generation.generated.append(token)
        return Step(tokens, logits, cost)

    def _logits(self, chosen: list[Generation], rows: list[int]) -> tuple[torch.Tensor, StepCost]:
        window = self.model.max_seq_len
        cached, fresh = [], []
        for index, (generation, row) in enumerate(zip(chosen, rows, strict=True)):
            total = len(generation.prompt) + len(generation.generated)
            if self.cache.lengths[row] == 0 or total > window:
                fresh.append(index)
            else:  # the cache holds all but the last token, which this step feeds
                assert self.cache.lengths[row] == total - 1, (self.cache.lengths[row], total)
                cached.append(index)
        cached.sort(key=lambda index: rows[index])  # rows 0..n-1 in order: read as views
        cost = StepCost(model_calls=1)
        device = self.model.head.weight.device
        order = list(cached)  # the logits' order: decoding rows, then each prefill's
        prefills = []
        for group in _prefill_groups([chosen[index].context(window) for index in fresh]):
            indices = [fresh[member] for member in group]
            batch = pad_rows([chosen[index].context(window) for index in indices], device=device)
            prefills.append(
                Prefill([rows[index] for index in indices], batch.tokens, batch.lengths)
            )
            order.extend(indices)
            cost.positions += batch.tokens.numel()
            cost.padding += batch.num_padding
        if cached:
            lengths = [self.cache.lengths[rows[index]] + 1 for index in cached]
            cost.positions += len(cached)
            cost.attended += max(lengths) * len(cached)
            cost.masked += max(lengths) * len(cached) - sum(lengths)
        logits = self.model.extend(
            self.cache,
            decode_rows=[rows[index] for index in cached],
            decode_tokens=torch.tensor(
                [chosen[index].generated[-1] for index in cached], device=device
            )
            if cached
            else None,
            prefills=prefills,
        )
        # One host copy per step: sampling runs on each request's own CPU generator.
        logits = logits.float().cpu()
        if order != list(range(len(chosen))):
            logits = logits[torch.tensor(order).argsort()]
        return logits, cost

    def _row(self, generation: Generation) -> int:
        row = self._row_of.get(id(generation))  # ids of live rows only: no stale match
        if row is None:
            raise ValueError("that generation has not joined this batch")
        return row


def _prefill_groups(contexts: list[list[int]]) -> list[list[int]]:
    """Indices of ``contexts`` grouped longest first, a row joining a group only when it is
    at least half the group's longest: padding stays under half of each prefill."""
    order = sorted(range(len(contexts)), key=lambda index: -len(contexts[index]))
    groups: list[list[int]] = []
    for index in order:
        if groups and 2 * len(contexts[index]) >= len(contexts[groups[-1][0]]):
            groups[-1].append(index)
        else:
            groups.append([index])
    return groups


def _sample_all(logits: torch.Tensor, generations: list[Generation]) -> list[int]:
    greedy = logits.argmax(dim=1).tolist()  # one call for every temperature-0 row
    return [
        greedy[index]
        if generation.sampling.temperature == 0
        else sample(logits[index], generation.sampling, generator=generation.generator)
        for index, generation in enumerate(generations)
    ]


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    *,
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    max_batch_size: int = 8,
) -> list[list[int]]:
    """Generate for every prompt in-process, batched by decoding step as the server does:
    up to ``max_batch_size`` sequences at a time, a finished one replaced by the next prompt
    between steps. Returns the new tokens of each prompt, in order.

    What a benchmark compares the server with: the same batching, without HTTP or queues.
    """
    samplings = [sampling] * len(prompts) if isinstance(sampling, Sampling) else list(sampling)
    waiting = [Generation(list(p), s) for p, s in zip(prompts, samplings, strict=True)]
    results = list(waiting)
    batch = DecodingBatch(model, max_rows=max_batch_size)
    with torch.inference_mode():
        while waiting or batch.rows:
            while waiting and len(batch.rows) < max_batch_size:
                batch.join(waiting.pop(0))
            batch.step()
            for generation in [g for g in batch.rows if g.done]:
                batch.leave(generation)
    return [g.generated for g in results]
