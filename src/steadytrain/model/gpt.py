"""The default model: a small byte-level GPT (pre-norm transformer decoder).

``GPT.extend`` is a second way through the same weights, for serving: it keeps each
sequence's attention keys and values in a ``KVCache`` so that a decoding step computes one
new position per sequence, and prefills new sequences in the same pass. Training calls only
``forward``.
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

    def cached(
        self, x: torch.Tensor, *, keys: torch.Tensor, values: torch.Tensor, plan: _Plan
    ) -> torch.Tensor:
        """A cached pass over flat positions (``x`` is (positions, width)): the decoding
        rows' one position each first, then each prefill's rows, right-padded."""
        qkv = _linear(self.qkv, x)
        parts, start = [], 0
        if plan.decode is not None:
            start = plan.decode.index.numel()
            parts.append(self._decode(qkv[:start], keys=keys, values=values, step=plan.decode))
        for rows, (batch, seq) in plan.prefills:
            group = qkv[start : start + batch * seq].view(batch, seq, -1)
            parts.append(self._prefill(group, keys=keys, values=values, rows=rows))
            start += batch * seq
        return _linear(self.proj, parts[0] if len(parts) == 1 else torch.cat(parts))

    def _prefill(
        self, qkv: torch.Tensor, *, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """``forward``'s attention over whole sequences from position 0, their keys and
        values kept in cache rows ``rows``."""
        batch, seq, width = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        keys[rows, :, :seq] = k
        values[rows, :, :seq] = v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(batch * seq, width)

    def _decode(
        self, qkv: torch.Tensor, *, keys: torch.Tensor, values: torch.Tensor, step: _Decode
    ) -> torch.Tensor:
        """One new position per row at the row's own position, attending to the row's
        cached positions before it and itself."""
        batch, width = qkv.shape[0], qkv.shape[1] // 3
        q, k, v = (t.view(batch, self.num_heads, 1, -1) for t in qkv.split(width, dim=1))
        row_keys, row_values = keys[step.rows], values[step.rows]  # views for a slice
        row_keys[step.index, :, step.positions] = k[:, :, 0]
        row_values[step.index, :, step.positions] = v[:, :, 0]
        if not isinstance(step.rows, slice):  # a gathered copy: write the new position back
            keys[step.rows, :, step.positions] = k[:, :, 0]
            values[step.rows, :, step.positions] = v[:, :, 0]
        y = F.scaled_dot_product_attention(
            q, row_keys[:, :, : step.span], row_values[:, :, : step.span], attn_mask=step.mask
        )
        return y.reshape(batch, width)


@dataclass(frozen=True)
class Prefill:
    """Sequences a cached pass runs from position 0 into cache rows ``rows``: their tokens
    right-padded, (len(rows), longest), and their real lengths."""

    rows: Sequence[int]
    tokens: torch.Tensor
    lengths: Sequence[int]


@dataclass(frozen=True)
class _Decode:
    """Where a cached pass's one-position rows read and write (the same in every layer)."""

    rows: torch.Tensor | slice  # cache rows; a slice for packed rows 0..n-1 (read as views)
    index: torch.Tensor  # 0..n-1
    positions: torch.Tensor  # each row's new position
    span: int  # positions the attention reads: the longest row's, new one included
    mask: torch.Tensor | None  # (n, 1, 1, span): a row's own positions; None when all end together


@dataclass(frozen=True)
class _Plan:
    decode: _Decode | None
    prefills: list[tuple[torch.Tensor, tuple[int, int]]]  # (cache rows, (batch, seq))


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The module's own function without nn.Module's call machinery, which is a large share of
    # a one-position step's time.
    assert isinstance(module, nn.Linear)
    return F.linear(x, module.weight, module.bias)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _decode_plan(rows: Sequence[int], lengths: list[int], *, device: torch.device) -> _Decode:
    positions = torch.tensor(lengths, device=device)
    span = max(lengths) + 1
    mask = None
    if min(lengths) != max(lengths):
        mask = (torch.arange(span, device=device) <= positions[:, None])[:, None, None, :]
    packed = list(rows) == list(range(len(rows)))  # else some rows (a retry): gathered
    return _Decode(
        rows=slice(0, len(rows)) if packed else torch.tensor(list(rows), device=device),
        index=torch.arange(len(rows), device=device),
        positions=positions,
        span=span,
        mask=mask,
    )


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

    def cached(self, x: torch.Tensor, **cached: Any) -> torch.Tensor:
        x = x + self.attention.cached(_layer_norm(self.attention_norm, x), **cached)
        return x + self._mlp(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``self.mlp(self.mlp_norm(x))`` as functions (serving's cached path)."""
        up, gelu, down = self.mlp
        assert isinstance(gelu, nn.GELU)
        hidden = F.gelu(_linear(up, _layer_norm(self.mlp_norm, x)), approximate=gelu.approximate)
        return _linear(down, hidden)


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
    def extend(
        self,
        cache: KVCache,
        *,
        decode_rows: Sequence[int] = (),
        decode_tokens: torch.Tensor | None = None,
        prefills: Sequence[Prefill] = (),
    ) -> torch.Tensor:
        """One pass through the layers for rows of ``cache``: each of ``decode_rows`` takes
        one token (``decode_tokens``, (len(decode_rows),)) at the position after what it
        holds; each prefill's rows are run from position 0 and kept. Returns the logits after
        each row's last token, decoding rows first, then each prefill's rows in order.

        Decoding rows of different lengths share the pass, each at its own position under an
        attention mask. A prefill's pads after a row's end change none of its positions
        (causal attention); they are written past the row's length, where the next step
        writes over them.

        Raises:
            ValueError: a row would pass the model's max_seq_len.
        """
        device = self.head.weight.device
        lengths = [cache.lengths[row] for row in decode_rows]
        longest = max([length + 1 for length in lengths] + [p.tokens.shape[1] for p in prefills])
        if longest > self.max_seq_len:
            raise ValueError(
                f"a sequence of {longest} positions exceeds the model's max_seq_len "
                f"{self.max_seq_len}"
            )
        cache.reserve(longest)
        pieces: list[torch.Tensor] = []  # the flat inputs
        last: list[int] = []  # the positions whose outputs are the logits
        decode = None
        if decode_rows:
            assert decode_tokens is not None
            decode = _decode_plan(decode_rows, lengths, device=device)
            token = F.embedding(decode_tokens, self.token_embedding.weight)
            pieces.append(token + F.embedding(decode.positions, self.position_embedding.weight))
            last.extend(range(len(decode_rows)))
        planned = []
        for prefill in prefills:
            batch, seq = prefill.tokens.shape
            token = F.embedding(prefill.tokens, self.token_embedding.weight)
            positions = torch.arange(seq, device=device)
            x = token + F.embedding(positions, self.position_embedding.weight)
            first = sum(piece.shape[0] for piece in pieces)
            last.extend(
                first + row * seq + length - 1 for row, length in enumerate(prefill.lengths)
            )
            pieces.append(x.view(batch * seq, -1))
            planned.append((torch.tensor(list(prefill.rows), device=device), (batch, seq)))
        x = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        plan = _Plan(decode, planned)
        for block, keys, values in zip(self._blocks, cache.keys, cache.values, strict=True):
            x = block.cached(x, keys=keys, values=values, plan=plan)
        for row in decode_rows:
            cache.lengths[row] += 1
        for prefill in prefills:
            for row, length in zip(prefill.rows, prefill.lengths, strict=True):
                cache.lengths[row] = length
        if len(last) != x.shape[0]:  # prefills: only each row's last real position
            x = x[torch.tensor(last, device=device)]
        return _linear(self.head, _layer_norm(self.final_norm, x))

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
