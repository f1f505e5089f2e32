"""The latent-rows rule: latents passed as a list of per-row tensors, patchified and joined row by row.

Z-Image takes ``x`` as a list of ``[C, F, H, W]`` latents, one per batch row (Dynamo: one input each), cuts each
into ``[N, E]`` tokens with views and permutes, joins them along dim 0 (``torch.cat``), embeds the joined rows with
a token-wise linear, splits them back per row and stacks them with ``pad_sequence`` into ``[B, N, D]``.

Matches: model inputs of one shape, 4-D ``[C, F, H, W]`` floating, each reaching a 2-D ``[N, E]`` tensor by
reordering ops only, joined by one ``cat`` along dim 0 in input order; from that ``cat``, rows followed through
token-wise ops (linears, element-wise ops with tensors that hold no tokens, casts), ``split`` and ``cat`` along
dim 0 to a ``pad_sequence`` (batch first) of B parts, part b holding exactly row b's N tokens in order.
Produces: ``LatentRows`` (the row inputs in batch order, the ``pad_sequence`` node, the ``LatentLayout`` of the
stacked latents ``[B, C, F, H, W]`` and N), each row's reading verified by replaying its reordering on an index
tensor. Refuses, with the reason, rows that leave the joined tensor by another path (an op that does not keep rows along
dim 0, or a ``cat`` that joins them with other tensors) or are stacked out of order. Rows padded to a length
multiple before the join (Z-Image pads N up to a multiple of 32) are not matched: the pad rows hold no latent
elements of their own, so the graph runs dense ("no image-token source found").
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx

from ..graph_utils import cat_arguments, example_value, is_elementwise, is_linear
from ..op_sets import CASTS, CAT, matches
from .latent_layout import LatentLayout, video_layouts
from .patchify import _reorder_chain, _replay, _same_tokens

PAD_SEQUENCE = (torch._C._nn.pad_sequence, torch.nn.utils.rnn.pad_sequence)


@dataclass(frozen=True)
class LatentRows:
    rows: tuple[torch.fx.Node, ...]  # the per-row latents inputs, in batch order
    tokens: torch.fx.Node  # the ``pad_sequence`` that stacks their tokens [B, N, D]
    layout: LatentLayout  # of the stacked latents [B, C, F, H, W]
    num_tokens: int


def latent_rows(gm: torch.fx.GraphModule, inputs: list[torch.fx.Node]) -> LatentRows | str | None:
    """The per-row latents among ``inputs`` and their stacked tokens, the reason they cannot be read, or None when
    no input is cut into tokens row by row."""
    for join in (n for n in gm.graph.nodes if matches(n, CAT)):
        parts, dim = cat_arguments(join)
        if dim != 0 or not isinstance(parts, (list, tuple)) or not parts:
            continue
        chains = [_reorder_chain(p) if isinstance(p, torch.fx.Node) else None for p in parts]
        if any(c is None or c[0] not in inputs for c in chains):
            continue
        rows = tuple(c[0] for c in chains)
        shapes = {tuple(int(s) for s in example_value(r).shape) for r in rows}
        if len(shapes) != 1 or len(set(rows)) != len(rows):
            continue
        (shape,) = shapes
        if len(shape) != 4 or not example_value(rows[0]).is_floating_point():
            continue
        layout = _row_layout(chains[0], shape)
        if layout is None or not all(_row_layout(c, shape) == layout for c in chains[1:]):
            continue
        found = _stacked(join, len(rows), layout.num_tokens)
        if isinstance(found, str):
            return f"{rows[0].name} and the other rows: {found}"
        stacked = LatentLayout("video", (len(rows), *shape), 1, (2, 3, 4), layout.patch)
        return LatentRows(rows, found, stacked, layout.num_tokens)
    return None


def _row_layout(chain: list[torch.fx.Node], shape: tuple[int, ...]) -> LatentLayout | None:
    """The one ``(p_t, p, p)`` reading of a row ``[C, F, H, W]`` that its reordering into ``[N, E]`` confirms."""
    rows = _replay(chain, torch.arange(math.prod(shape)).reshape(shape))
    if rows.dim() != 2:
        return None
    batched = (1, *shape)
    matching = [c for c in video_layouts(batched, int(rows.shape[0])) if _same_tokens(rows.unsqueeze(0), c)]
    if len(matching) > 1:  # one frame of C channels reads as C frames of one channel too: channels they are
        matching = [c for c in matching if batched[c.channel_axis] > 1]
    return matching[0] if len(matching) == 1 else None


def _stacked(join: torch.fx.Node, batch: int, num_tokens: int) -> torch.fx.Node | str:
    """Follow the rows of ``join`` (row b's tokens at ``b*N``) to the ``pad_sequence`` that stacks them."""
    segments = {join: tuple((b, 0, num_tokens) for b in range(batch))}
    pending = [join]
    waiting = set()  # cats that join the rows with tensors not reached yet
    found = None
    order = {n: i for i, n in enumerate(join.graph.nodes)}
    while pending:
        pending.sort(key=order.__getitem__)
        node = pending.pop(0)
        for user in node.users:
            if user in segments:
                continue
            if user.target in PAD_SEQUENCE:
                parts = user.args[0]
                first = user.args[1] if len(user.args) > 1 else user.kwargs.get("batch_first", False)
                expected = [((b, 0, num_tokens),) for b in range(batch)]
                if first is True and [segments.get(p) for p in parts] == expected:
                    found = user
                    continue
                return f"{user.name} stacks the rows other than one row per batch item in order"
            moved = _moved_rows(user, segments)
            if moved is None:
                return f"the rows reach {user.name} ({user.op} {getattr(user.target, '__name__', user.target)})"
            if moved is _PENDING:
                waiting.add(user)
            else:
                waiting.discard(user)
                segments[user] = moved
                pending.append(user)
    if waiting:
        return f"the rows reach {min(waiting, key=order.__getitem__).name} (a cat with other tensors)"
    return found if found is not None else "no pad_sequence stacks them into [B, N, C]"


_PENDING = object()


def _moved_rows(node: torch.fx.Node, segments: dict) -> tuple | object | None:
    """The row segments of ``node`` from its tracked inputs, ``_PENDING`` when some of its tracked inputs are not
    reached yet (a ``cat`` of parts), None when ``node`` does not keep rows along dim 0."""
    tracked = [a for a in node.all_input_nodes if a in segments]
    value = example_value(node)
    if node.op == "call_function" and node.target is operator.getitem:
        source, index = node.args
        parts = segments[source]
        return parts[index] if isinstance(parts, list) and isinstance(index, int) else None
    if (
        node.op == "call_method"
        and node.target == "split"
        or node.op == "call_function"
        and node.target in (torch.split,)
    ):
        sizes = node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if dim != 0 or not isinstance(sizes, (list, tuple)):
            return None
        return _split(segments[node.args[0]], list(sizes))
    if matches(node, CAT):
        parts, dim = cat_arguments(node)
        if dim != 0 or not all(p in segments for p in parts):
            return _PENDING if dim == 0 else None
        return sum((segments[p] for p in parts), ())
    if len(tracked) != 1 or not isinstance(value, torch.Tensor):
        return None
    source = example_value(tracked[0])
    if value.shape[0] != source.shape[0]:
        return None
    if is_linear(node) and node.args[0] is tracked[0]:
        return segments[tracked[0]]
    if matches(node, CASTS) or is_elementwise(node):
        return segments[tracked[0]]
    return None


def _split(segments: tuple, sizes: list[int]) -> list | None:
    """``segments`` (row, start, stop) cut into consecutive pieces of ``sizes`` rows."""
    flat = [(row, t) for row, start, stop in segments for t in range(start, stop)]
    if sum(sizes) != len(flat):
        return None
    pieces, at = [], 0
    for size in sizes:
        chunk = flat[at : at + size]
        at += size
        merged: list[tuple[int, int, int]] = []
        for row, t in chunk:
            if merged and merged[-1][0] == row and merged[-1][2] == t:
                merged[-1] = (row, merged[-1][1], t + 1)
            else:
                merged.append((row, t, t + 1))
        pieces.append(tuple(merged))
    return pieces
