"""The patchify rule: a graph that only cuts the latents into tokens, for a patch embedding split from its linear.

Lumina-Image 2.0 and HiDream-I1 patchify their latents with views and permutes in one graph and apply the
patch-embedding linear in the next: a graph break between them (``.tolist()`` on a mask, a routing step) leaves
no graph that holds both, so ``find_token_source`` finds no token source. Such a graph still tells how the latents
split into tokens, which is all the call scope of a split transformer needs (``runtime/pieces.py``).

Matches: a 4-D or 5-D floating model input whose elements reach a 3-D ``[B, N, E]`` graph output through
reordering ops only (view, reshape, permute, transpose, flatten, unflatten, movedim, contiguous), with
``N * E`` elements per batch row, as many as the latents have.
Produces: ``PatchifiedTokens`` (the input, its ``LatentLayout`` and N), the layout verified by replaying the chain on
an index tensor: every token's row must hold exactly the latent elements the layout assigns to that token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx

from ..graph_utils import example_value, is_linear
from .latent_layout import LatentLayout, channel_last_video_layouts, image_layout, video_layouts

#: Ops that move elements without dropping, duplicating or changing them.
REORDER_METHODS = frozenset(
    {"view", "reshape", "permute", "transpose", "flatten", "unflatten", "movedim", "contiguous"}
)
REORDER_FUNCTIONS = frozenset(
    {torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unflatten, torch.movedim}
)


@dataclass(frozen=True)
class PatchifiedTokens:
    latents: str  # the placeholder's name
    layout: LatentLayout
    num_tokens: int


def patchified_latents(gm: torch.fx.GraphModule, inputs: list[torch.fx.Node]) -> PatchifiedTokens | None:
    """The latents input among ``inputs`` that ``gm`` hands on as ``[B, N, E]`` tokens by reordering alone, if any."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    for result in results:
        if not isinstance(result, torch.fx.Node):
            continue
        chain = _reorder_chain(result)
        if chain is None or chain[0] not in inputs:
            continue
        found = _verified(chain)
        if found is not None:
            return found
    return None


def _reorder_chain(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """``[input, op, op, ..., node]`` when ``node`` comes from a placeholder through reordering ops only."""
    chain = [node]
    while node.op != "placeholder":
        if not _is_reorder(node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        if any(isinstance(a, torch.fx.Node) for a in (*node.args[1:], *node.kwargs.values())):
            return None
        node = node.args[0]
        chain.append(node)
    return chain[::-1]


def _is_reorder(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in REORDER_METHODS
    return node.op == "call_function" and node.target in REORDER_FUNCTIONS


def _verified(chain: list[torch.fx.Node]) -> PatchifiedTokens | None:
    latents, tokens = example_value(chain[0]), example_value(chain[-1])
    if not (isinstance(latents, torch.Tensor) and latents.dim() in (4, 5) and latents.is_floating_point()):
        return None
    if not (isinstance(tokens, torch.Tensor) and tokens.dim() == 3 and tokens.shape[0] == latents.shape[0]):
        return None
    shape = tuple(int(s) for s in latents.shape)
    num_tokens = int(tokens.shape[1])
    if num_tokens * int(tokens.shape[2]) * shape[0] != math.prod(shape):
        return None
    replayed = _replay(chain, torch.arange(math.prod(shape)).reshape(shape))
    candidates = [image_layout(shape, num_tokens)] if len(shape) == 4 else video_layouts(shape, num_tokens)
    matching = [c for c in candidates if c is not None and _same_tokens(replayed, c)]
    if len(matching) != 1:
        return None
    return PatchifiedTokens(chain[0].name, matching[0], num_tokens)


def _replay(chain: list[torch.fx.Node], value: torch.Tensor) -> torch.Tensor:
    for node in chain[1:]:
        if node.op == "call_method":
            value = getattr(value, node.target)(*node.args[1:], **node.kwargs)
        else:
            value = node.target(value, *node.args[1:], **node.kwargs)
    return value


def _same_tokens(rows: torch.Tensor, layout: LatentLayout) -> bool:
    """Whether each token row of ``rows`` ([B, N, E] latent element indices) holds the elements ``layout`` gives it."""
    expected = element_rows(layout)
    return torch.equal(rows.sort(dim=2).values, expected.sort(dim=2).values)


def element_rows(layout: LatentLayout) -> torch.Tensor:
    """``[B, N, E]``: the flat indices of the latent elements of each token, in token order."""
    split, order = layout.token_blocks(layout.shape)
    index = torch.arange(math.prod(layout.shape)).reshape(split).permute(order)
    return index.reshape(layout.shape[0], layout.num_tokens, -1)


def layout_through_linear(latents: torch.fx.Node, tokens: torch.fx.Node) -> LatentLayout | None:
    """The layout of ``latents`` cut into ``tokens`` ``[B, N, C]`` by reordering ops, a linear over the last axis
    (each token's elements), then flattening of the token grid (Kandinsky 5: channel-last ``[B, F, H, W, C]`` latents,
    ``view``, ``permute``, ``flatten``, the patch linear, ``flatten(1, 3)``), verified by replaying the reordering on
    an index tensor; None when ``tokens`` is not made so or no single reading matches."""
    flattens = []
    node = tokens
    while not is_linear(node):
        if node.op != "call_method" or node.target not in ("flatten", "contiguous") or not node.args:
            return None
        flattens.append(node)
        node = node.args[0]
    chain = _reorder_chain(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
    value = example_value(latents)
    if chain is None or chain[0] is not latents or not isinstance(value, torch.Tensor) or value.dim() != 5:
        return None
    shape = tuple(int(s) for s in value.shape)
    rows = _replay([*chain, *flattens[::-1]], torch.arange(math.prod(shape)).reshape(shape))
    if rows.dim() != 3 or rows.shape[0] != shape[0]:
        return None
    num_tokens = int(rows.shape[1])
    candidates = video_layouts(shape, num_tokens) + channel_last_video_layouts(shape, num_tokens)
    matching = [c for c in candidates if _same_tokens(rows, c)]
    if len(matching) > 1:  # one frame of four channels reads as four frames of one channel too: channels they are
        matching = [c for c in matching if shape[c.channel_axis] > 1]
    return matching[0] if len(matching) == 1 else None
