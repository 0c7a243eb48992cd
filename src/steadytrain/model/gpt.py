"""The default model: a small byte-level GPT (pre-norm transformer decoder).

``GPT.prefill`` and ``GPT.decode`` are a second way through the same weights, for serving:
they keep each sequence's attention keys and values in a ``KVCache`` so that a decoding step
computes one new position per sequence. Training calls only ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, *, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))

    def prefill(
        self, x: torch.Tensor, *, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """``forward`` of whole sequences from position 0, keeping their keys and values in
        cache rows ``rows`` (what ``forward`` computes, in evaluation)."""
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        keys[rows, :, :seq] = k
        values[rows, :, :seq] = v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))

    def decode(
        self, x: torch.Tensor, *, keys: torch.Tensor, values: torch.Tensor, step: DecodeStep
    ) -> torch.Tensor:
        """One new position per row (``x`` is (rows, 1, width)) at the row's own position,
        attending to the row's cached positions before it and itself."""
        batch, _, width = x.shape
        q, k, v = _linear(self.qkv, x).split(width, dim=2)
        q, k, v = (t.view(batch, 1, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        row_keys, row_values = keys[step.rows], values[step.rows]  # views for a slice
        row_keys[step.index, :, step.positions] = k[:, :, 0]
        row_values[step.index, :, step.positions] = v[:, :, 0]
        if not isinstance(step.rows, slice):  # a gathered copy: write the new position back
            keys[step.rows, :, step.positions] = k[:, :, 0]
            values[step.rows, :, step.positions] = v[:, :, 0]
        y = F.scaled_dot_product_attention(
            q, row_keys[:, :, : step.span], row_values[:, :, : step.span], attn_mask=step.mask
        )
        return _linear(self.proj, y.transpose(1, 2).reshape(batch, 1, width))


@dataclass(frozen=True)
class DecodeStep:
    """Where one cached decoding step reads and writes, shared by every layer."""

    rows: torch.Tensor | slice  # cache rows; a slice for packed rows 0..n-1 (read as views)
    index: torch.Tensor  # 0..n-1
    positions: torch.Tensor  # each row's new position
    span: int  # positions the attention reads: the longest row's, new one included
    mask: torch.Tensor | None  # (n, 1, 1, span): a row's own positions; None when all end together


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The module's own function without nn.Module's call machinery, which is a large share of
    # a one-position step's time.
    assert isinstance(module, nn.Linear)
    return F.linear(x, module.weight, module.bias)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


class Block(nn.Module):
    def __init__(self, *, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width=width, num_heads=num_heads, dropout=dropout)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def prefill(self, x: torch.Tensor, **cached: torch.Tensor) -> torch.Tensor:
        x = x + self.attention.prefill(self.attention_norm(x), **cached)
        return x + self.mlp(self.mlp_norm(x))

    def decode(self, x: torch.Tensor, **cached: Any) -> torch.Tensor:
        x = x + self.attention.decode(_layer_norm(self.attention_norm, x), **cached)
        up, gelu, down = self.mlp
        assert isinstance(gelu, nn.GELU)
        hidden = F.gelu(_linear(up, _layer_norm(self.mlp_norm, x)), approximate=gelu.approximate)
        return x + _linear(down, hidden)


class GPT(nn.Module):
    """Maps (batch, seq) token ids to (batch, seq, vocab_size) logits."""

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        max_seq_len: int = 1024,
        num_layers: int = 2,
        width: int = 128,
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(
                f"model.kwargs: width {width} is not divisible by num_heads {num_heads}"
            )
        self.max_seq_len = max_seq_len
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_seq_len, width)
        self.blocks = nn.ModuleList(
            Block(width=width, num_heads=num_heads, dropout=dropout) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual projections keeps early activations bounded.
        for name, parameter in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * num_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        if seq > self.max_seq_len:
            raise ValueError(
                f"sequence of {seq} exceeds the model's max_seq_len {self.max_seq_len}"
            )
        positions = torch.arange(seq, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x))

    @torch.inference_mode()
    def prefill(
        self, tokens: torch.Tensor, *, lengths: Sequence[int], cache: KVCache, rows: Sequence[int]
    ) -> torch.Tensor:
        """Run right-padded sequences from position 0, keeping them in ``cache`` rows ``rows``
        (``lengths`` positions each); returns each one's logits after its last real token,
        (len(rows), vocab_size).

        Under causal attention the pads after a row's end change none of its positions; they
        are written to the cache past the row's length, where the next step overwrites them.
        """
        batch, seq = tokens.shape
        if seq > self.max_seq_len:
            raise ValueError(
                f"sequence of {seq} exceeds the model's max_seq_len {self.max_seq_len}"
            )
        cache.reserve(seq)
        index = torch.tensor(list(rows), device=tokens.device)
        positions = torch.arange(seq, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block, keys, values in zip(self._blocks, cache.keys, cache.values, strict=True):
            x = block.prefill(x, keys=keys, values=values, rows=index)
        last = torch.tensor([length - 1 for length in lengths], device=tokens.device)
        for row, length in zip(rows, lengths, strict=True):
            cache.lengths[row] = length
        x = x[torch.arange(batch, device=tokens.device), last]
        return self.head(self.final_norm(x))

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, *, cache: KVCache, rows: Sequence[int]) -> torch.Tensor:
        """One token per cache row in ``rows`` (``tokens`` is (len(rows),)), at the position
        after what the row holds; returns the logits after it, (len(rows), vocab_size).

        Rows of different lengths are batched with per-row positions and an attention mask.
        """
        lengths = [cache.lengths[row] for row in rows]
        if max(lengths) >= self.max_seq_len:
            raise ValueError(
                f"a cached row holds {max(lengths)} positions: no room for another within "
                f"the model's max_seq_len {self.max_seq_len}"
            )
        cache.reserve(max(lengths) + 1)
        device = tokens.device
        positions = torch.tensor(lengths, device=device)
        span = max(lengths) + 1
        mask = None
        if min(lengths) != max(lengths):
            mask = (torch.arange(span, device=device) <= positions[:, None])[:, None, None, :]
        packed = list(rows) == list(range(len(rows)))  # else a retry of some rows: gathered
        step = DecodeStep(
            rows=slice(0, len(rows)) if packed else torch.tensor(list(rows), device=device),
            index=torch.arange(len(rows), device=device),
            positions=positions,
            span=span,
            mask=mask,
        )
        x = F.embedding(tokens, self.token_embedding.weight)
        x = (x + F.embedding(positions, self.position_embedding.weight))[:, None, :]
        for block, keys, values in zip(self._blocks, cache.keys, cache.values, strict=True):
            x = block.decode(x, keys=keys, values=values, step=step)
        for row in rows:
            cache.lengths[row] += 1
        return _linear(self.head, _layer_norm(self.final_norm, x[:, 0]))

    @property
    def _blocks(self) -> list[Block]:
        return cast(list[Block], list(self.blocks))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


class KVCache:
    """Attention keys and values of up to ``num_rows`` sequences between decoding steps.

    Row ``r`` holds its first ``lengths[r]`` positions (0: empty); what lies past them is
    stale but finite (zeros at first), since a masked position's value still meets a zero
    weight and NaN times zero is NaN. Room grows by doubling as rows lengthen, up to the
    model's ``max_seq_len``.
    """

    @torch.inference_mode()
    def __init__(self, model: GPT, *, num_rows: int) -> None:
        attention = model.blocks[0].attention
        assert isinstance(attention, CausalSelfAttention)
        width = model.token_embedding.embedding_dim
        shape = (num_rows, attention.num_heads, 0, width // attention.num_heads)
        like = model.head.weight
        self.max_seq_len = model.max_seq_len
        self.keys = [like.new_zeros(shape) for _ in model.blocks]
        self.values = [like.new_zeros(shape) for _ in model.blocks]
        self.lengths = [0] * num_rows

    @property
    def capacity(self) -> int:
        """Positions each row has room for now."""
        return self.keys[0].shape[2]

    @torch.inference_mode()
    def reserve(self, positions: int) -> None:
        """Room for ``positions`` per row, keeping what the rows hold."""
        if positions <= self.capacity:
            return
        held = self.capacity
        grown = min(self.max_seq_len, max(positions, 2 * held, 64))
        for tensors in (self.keys, self.values):
            for layer, old in enumerate(tensors):
                new = old.new_zeros((*old.shape[:2], grown, old.shape[3]))
                new[:, :, :held] = old
                tensors[layer] = new

    @torch.inference_mode()
    def move(self, source: int, target: int) -> None:
        """Row ``source``'s positions become row ``target``'s; ``source`` is left empty."""
        length = self.lengths[source]
        for tensor in (*self.keys, *self.values):
            tensor[target, :, :length] = tensor[source, :, :length]
        self.lengths[target], self.lengths[source] = length, 0


def build_gpt(**kwargs: int | float) -> GPT:
    """The default factory (``model.factory: steadytrain.model.gpt:build_gpt``)."""
    return GPT(**kwargs)  # type: ignore[arg-type]
