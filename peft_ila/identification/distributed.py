"""Data parallelism without a DDP wrapper: what ILA's loop needs so that every rank takes the same steps.

Everything here is a no-op in a single process. Under `torchrun` or `accelerate launch` (any initialised
`torch.distributed` process group) gradients are averaged, the reported loss is the mean over ranks (so every
rank makes the same stability decision), and the selection is checked to be identical on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

import torch
import torch.distributed as dist

from ..tuner.sharding import is_sharded

T = TypeVar("T")


def world_size() -> int:
    """Number of processes in the default process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when there is no process group)."""
    return dist.get_rank() if world_size() > 1 else 0


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over ranks, in one all-reduce per dtype.

    A parameter without a gradient counts as a zero gradient, so every rank reduces buffers of the same size. A
    parameter sharded by FSDP2 (`fully_shard`, a DTensor) is left alone: FSDP already reduced its gradient.
    """
    n = world_size()
    if n == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if is_sharded(p):
            continue
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= n
        offset = 0
        for p in group:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Element-wise sums over ranks of a few floats (the values themselves in one process)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return tuple(t.tolist())


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank."""
    return sum_over_ranks(float(flag))[0] > 0


def gather(value: T) -> list[T]:
    """Every rank's `value` (any picklable object), in rank order; `[value]` in one process."""
    if world_size() == 1:
        return [value]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def agree_on(ranking: list[str], scores: dict[str, float], k: int) -> tuple[list[str], dict[str, float]]:
    """Rank 0's ranking and scores, after checking that every rank put the same `k` layers on top.

    Raises `RuntimeError` on every rank if any rank differs: the ranks trained different updates (gradients not
    averaged, or different base weights), and fine-tuning inconsistent layers would be a silent divergence.
    """
    gathered = gather((list(ranking), dict(scores)))
    reference = set(gathered[0][0][:k])
    differing = [r for r, (other, _) in enumerate(gathered) if set(other[:k]) != reference]
    if differing:
        diff = sorted(set(gathered[differing[0]][0][:k]) ^ reference)
        raise RuntimeError(
            f"ILA ranks disagree on the selected layers: rank(s) {differing} differ from rank 0 in {diff[:5]}. The "
            "ranks trained different updates; run every rank on the same base model and let ILA average the "
            "gradients (pass the unwrapped model, not a DDP wrapper, to identification)."
        )
    return gathered[0]
