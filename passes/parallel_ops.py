"""The collectives of a RAS step under Ulysses context parallelism (see ``shard_ulysses``).

Plain functions over ``torch.ops._c10d_functional`` (the collectives diffusers' Ulysses attention issues, which
Dynamo, AOTAutograd and inductor trace): each rank holds a slice of the active tokens and all heads before
attention, all active tokens and a slice of the heads inside it. The group is the process group's name, as the
functional collectives take it.
"""

from __future__ import annotations

import torch

C10D = torch.ops._c10d_functional


def _all_to_all(send: torch.Tensor, group: str) -> torch.Tensor:
    """Block ``i`` of ``send`` (its leading dim, one per rank) goes to rank ``i``; block ``i`` of the result came
    from rank ``i``."""
    world = send.shape[0]
    flat = send.contiguous().flatten()
    sizes = [flat.numel() // world] * world
    received = C10D.wait_tensor(C10D.all_to_all_single(flat, sizes, sizes, group))
    return received.reshape(send.shape)


def heads_to_ranks(x: torch.Tensor, group: str, world: int) -> torch.Tensor:
    """``[B, H, S, D]`` (this rank's S rows, all heads) -> ``[B, H/P, P*S, D]`` (every rank's rows in rank order,
    this rank's group of H/P heads)."""
    b, h, s, d = x.shape
    send = x.reshape(b, world, h // world, s, d).transpose(0, 1)  # [P, B, H/P, S, D]: head group i to rank i
    received = _all_to_all(send, group)  # [P, B, H/P, S, D]: rows of rank i
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * s, d)


def rows_to_ranks(x: torch.Tensor, group: str, world: int) -> torch.Tensor:
    """The inverse of ``heads_to_ranks``: ``[B, H/P, P*S, D]`` -> ``[B, H, S, D]``."""
    b, heads, rows, d = x.shape
    s = rows // world
    send = x.reshape(b, heads, world, s, d).permute(2, 0, 1, 3, 4)  # [P, B, H/P, S, D]: rows of rank i to rank i
    received = _all_to_all(send, group)  # [P, B, H/P, S, D]: head group i
    return received.transpose(0, 1).reshape(b, world * heads, s, d)


def joint_rows(x: torch.Tensor, axis: int, world: int, before: int, image: int) -> torch.Tensor:
    """Every rank's joint rows ``[before; image_r; after]`` (``heads_to_ranks``' rank order along ``axis``) as one
    joint sequence ``[before; image_0 .. image_P-1; after]``: the text rows, the same on every rank, once."""
    per_rank = x.shape[axis] // world
    parts = x.unflatten(axis, (world, per_rank))
    images = parts.narrow(axis + 1, before, image).flatten(axis, axis + 1)
    first = parts.select(axis, 0)
    after = per_rank - before - image
    return torch.cat([first.narrow(axis, 0, before), images, first.narrow(axis, before + image, after)], dim=axis)


def gather_rows(x: torch.Tensor, axis: int, group: str, world: int) -> torch.Tensor:
    """Every rank's ``x`` joined along ``axis`` in rank order (each rank's slice of the active tokens -> all)."""
    gathered = C10D.wait_tensor(C10D.all_gather_into_tensor(x.contiguous(), world, group))
    return torch.cat(torch.chunk(gathered, world, dim=0), dim=axis)


def rank_slice(x: torch.Tensor, axis: int, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of ``x`` along ``axis`` (``x.chunk(world, axis)[rank]``)."""
    return x.chunk(world, dim=axis)[rank]
