"""Batched model calls' parts: right-padded rows, forward passes, sampling, byte tokens.

Rows of different lengths are right-padded: under causal attention no real token sees a
pad, so a row's results are those it gets alone (within float tolerance), and the pads'
waste is counted. Generation batched by decoding step is in decoding.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

PAD_TOKEN = 0  # any id works: no real token attends to a pad under causal attention


@dataclass(frozen=True)
class Sampling:
    """How one request picks its next tokens (temperature 0: greedy)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None


@dataclass
class Generation:
    """One sequence being generated: its prompt, its tokens so far and its random stream."""

    prompt: list[int]
    sampling: Sampling
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        seed = self.sampling.seed if self.sampling.seed is not None else secrets.randbits(63)
        # Its own stream: what it samples does not depend on which requests share its batch.
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.sampling.max_new_tokens

    def context(self, max_seq_len: int | None) -> list[int]:
        tokens = self.prompt + self.generated
        return tokens if max_seq_len is None else tokens[-max_seq_len:]


@dataclass(frozen=True)
class PaddedBatch:
    """Rows right-padded into one tensor; ``lengths`` are the real lengths."""

    tokens: torch.Tensor
    lengths: list[int]

    @property
    def num_padding(self) -> int:
        return self.tokens.numel() - sum(self.lengths)


def pad_rows(rows: Sequence[Sequence[int]], *, device: torch.device) -> PaddedBatch:
    """``rows`` of token ids as one (len(rows), longest) tensor, right-padded."""
    lengths = [len(row) for row in rows]
    tokens = torch.full((len(rows), max(lengths)), PAD_TOKEN, dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return PaddedBatch(tokens.to(device), lengths)


def forward_rows(model: nn.Module, batch: PaddedBatch) -> list[torch.Tensor]:
    """The model's output for each row, on the host, cut to the row's real length.

    The output must be (rows, sequence, ...) for a padded batch; rows of equal length may
    have any output shape.
    """
    output = model(batch.tokens)
    if len(set(batch.lengths)) == 1:
        return list(output.float().cpu())
    return [row[:length] for row, length in zip(output.float().cpu(), batch.lengths, strict=True)]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int]) -> list[float]:
    """log p(token t | tokens before t) for t = 1.. from one row's (sequence, vocab) logits."""
    if logits.dim() != 2 or logits.shape[0] != len(tokens):
        raise ValueError(
            f"the model's output has shape {tuple(logits.shape)}, not (sequence, vocabulary); "
            "ask for output=logits"
        )
    logprobs = F.log_softmax(logits[:-1].float(), dim=-1)
    following = torch.tensor(list(tokens[1:]), dtype=torch.long)
    return logprobs.gather(1, following[:, None])[:, 0].tolist()


def sample(logits: torch.Tensor, sampling: Sampling, *, generator: torch.Generator) -> int:
    """The next token from one row of logits: argmax at temperature 0, else top-k sampling."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    scaled = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scaled.numel():
        threshold = torch.topk(scaled, sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probabilities = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def byte_tokens(text: str) -> list[int]:
    """The default GPT's tokens: the text's UTF-8 bytes."""
    return list(text.encode("utf-8"))


def byte_text(tokens: Sequence[int]) -> str:
    """Tokens back to text; bytes that are not UTF-8 become U+FFFD."""
    return bytes(tokens).decode("utf-8", errors="replace")
