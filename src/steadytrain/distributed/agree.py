"""Collective agreement: values and decisions every rank sees identically."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

T = TypeVar("T")


def any_rank(flag: bool, *, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on at least one (a collective: all must call)."""
    vote = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())  # host sync


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of ``values`` over all ranks (a collective: all must call)."""
    reduced = values.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        reduced /= dist.get_world_size()
    return reduced


def max_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``values`` over all ranks (a collective: all must call)."""
    reduced = values.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced


def rows_from_all(row: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``row``, stacked in rank order on every rank, in one all-reduce (a
    collective: all must call, with rows of one length and dtype).

    Each rank fills its own row of a zero table and the sum is taken: exact, since every
    other entry it adds is zero.
    """
    return start_rows_from_all(row)()


def start_rows_from_all(row: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``rows_from_all`` without waiting: the collective starts now, and the returned function
    waits for it and gives the table. Until then ``row`` may change but the table must not be
    read; collectives issued meanwhile (the next step's gradient all-reduce) queue behind it
    in the same order on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        table = row.detach().clone().unsqueeze(0)
        return lambda: table
    table = torch.zeros((dist.get_world_size(), row.numel()), dtype=row.dtype, device=row.device)
    table[dist.get_rank()] = row.detach()
    work = dist.all_reduce(table, op=dist.ReduceOp.SUM, async_op=True)

    def finish() -> torch.Tensor:
        work.wait()
        return table

    return finish


def broadcast_from_main(value: T, *, group: ProcessGroup | None = None) -> T:
    """Rank 0's ``value`` on every rank of ``group`` (a collective: all must call)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, group=group)
    return holder[0]


def first_failure(message: str | None) -> tuple[int, str] | None:
    """The lowest rank whose ``message`` is set, and that message (a collective).

    Lets every rank learn that setup failed somewhere, so none walks into a later collective
    that the failed rank will never join.
    """
    for rank, gathered_message in enumerate(gather_from_all(message)):
        if gathered_message is not None:
            return rank, gathered_message
    return None


def gather_from_all(value: T, *, group: ProcessGroup | None = None) -> list[T]:
    """Every rank's ``value``, in rank order, on every rank (a collective: all must call)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered: list[T] = [value] * dist.get_world_size()
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def side_group(*, timeout_s: float) -> ProcessGroup | None:
    """A second gloo group, for collectives issued from a background thread.

    Collectives on one group must be issued in the same order on every rank; a background
    thread (e.g. an async checkpoint commit) gets its own group so it never interleaves with
    the training loop's. Its collectives give up after ``timeout_s`` (``dist.timeout_s``), so
    a dead peer cannot hold the thread for the backend's default. A collective: every rank
    must create it, in the same order.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
