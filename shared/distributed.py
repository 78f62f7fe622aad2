"""Gathering per-sample results across ranks without counting sampler padding twice."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank (dim 0 may differ in length between ranks)."""
    if world_size() == 1:
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def gather_by_index(index: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gather (index, values...) from all ranks; keep one row per index, sorted by index.

    DistributedSampler pads the last batch with repeated samples; keying rows by their
    dataset index removes the repeats (the first occurrence is kept), so the result is
    identical to a single process. Rows that already arrive sorted and unique (one process,
    an unshuffled loader) are returned as they are, without a copy.
    """
    index = all_gather_cat(index).reshape(-1)
    gathered = [all_gather_cat(v) for v in values]
    for v in gathered:
        if v.shape[0] != index.shape[0]:
            raise ValueError(f"gather_by_index: {v.shape[0]} rows for {index.shape[0]} indices")
    if index.numel() < 2 or bool((index[1:] > index[:-1]).all()):
        return (index, *gathered)
    # A stable sort keeps repeats in arrival order, so each run's first row is the earliest.
    ordered, order = torch.sort(index, stable=True)
    first_of_run = torch.ones_like(ordered, dtype=torch.bool)
    first_of_run[1:] = ordered[1:] != ordered[:-1]
    rows = order[first_of_run]
    return (ordered[first_of_run], *[g.index_select(0, rows) for g in gathered])
