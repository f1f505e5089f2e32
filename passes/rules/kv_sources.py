"""The K/V-source rule: where the keys and values an attention reads over image tokens come from.

Called by ``cache_attention_kv`` for each ``scaled_dot_product_attention`` whose key (or value) carries image
tokens. Three sources, tried in this order:
- ``joint-at-attention``: attention reads ``cat([..., image keys, ...])`` along the token axis, built right
  there (SD3's joint attention). The cache holds the whole joint sequence; the parts are written into it.
- ``image``: walking back from the key along the token-carrying producers (through transposes, head splits,
  a ``cat`` with text keys after the projection, ...), the last tensor that holds the N image tokens only,
  after any q/k norm and RoPE; through ops that only move elements the smallest such tensor (a GQA model's kv
  heads, not their repeats). The cache holds that tensor.
- ``joint-tensor``: the key reaches attention as a joint [text; image] (or [image; text]) sequence built
  earlier: text and image concatenated before the projection (single-stream blocks), or RoPE applied after
  the concatenation (Flux). The cache holds that joint tensor; every text row and the active image rows are
  written at their dense rows, which needs the image rows' offset.
Attention whose keys carry the tokens on its batch axis (a token axis fused with the batch: Latte's temporal attention
runs over the frames of each spatial site) needs no cache: each active token's keys are all fresh.
A new kind of source needs a case here and its write in ``cache_attention_kv``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from ..context import RewriteError
from ..graph_utils import cat_arguments, describe
from ..normalize_attention_args import sdpa_argument
from ..op_sets import CAT, KV_LAYOUT, matches


@dataclass
class KVSource:
    """Where one attention's key or value comes from, and what to cache."""

    kind: str  # "joint-at-attention", "image" or "joint-tensor"
    tensor: torch.fx.Node  # the tensor to cache (the ``cat`` for joint-at-attention)
    consumer: torch.fx.Node | None = None  # the node that reads ``tensor`` on the way to attention ("image")
    image_part: int | None = None  # joint-at-attention: which ``cat`` part holds the image tokens
    offset: int | None = None  # joint-tensor: the dense row where the image rows start


def find_kv_source(attention: torch.fx.Node, kind: str, axes: dict, offsets: dict, num_tokens: int) -> KVSource | None:
    """The source of ``attention``'s ``kind`` ("key" or "value"), None when it carries no image tokens.

    ``axes`` and ``offsets`` (by node name) are the token axes and joint-sequence image offsets that
    ``analyze_token_region`` found (``ctx.token_region``). Raises RewriteError when the image tokens reach
    attention some other way.
    """
    tensor = sdpa_argument(attention, kind)
    if isinstance(tensor, torch.fx.Node) and axes.get(tensor.name) == 0:
        # the tokens index the attention's batch rows (Latte's temporal attention over the frames of each site):
        # each active token attends within its own fresh rows, nothing to cache
        return None
    if isinstance(tensor, torch.fx.Node) and tensor.name in axes and tensor is sdpa_argument(attention, "query"):
        # a cache read there would hand the query all N tokens too
        raise RewriteError(f"{describe(attention)}: the query and the {kind} share the tensor {tensor.name}")
    joint = _joint_concat(tensor, axes, num_tokens)
    if joint is not None:
        return KVSource("joint-at-attention", joint[0], image_part=joint[1])
    try:
        found = _image_only_producer(attention, kind, axes, num_tokens)
    except RewriteError:
        if offsets.get(tensor.name) is None or tensor.meta["ras_dense_shape"][axes[tensor.name]] == num_tokens:
            raise  # not a joint sequence whose image rows are located
        return KVSource("joint-tensor", tensor, offset=offsets[tensor.name])
    if found is None:
        return None
    return KVSource("image", found[0], consumer=found[1])


def _joint_concat(node, axes, num_tokens):
    """For ``cat([..., image keys, ...], dim=token axis)`` fed straight to attention: (cat, image part index)."""
    if not matches(node, CAT):
        return None
    parts, dim = cat_arguments(node)
    if node.name not in axes or not isinstance(parts, (list, tuple)):
        return None
    ndim = len(node.meta["ras_dense_shape"])
    if dim % ndim != axes[node.name]:
        return None
    image = [i for i, p in enumerate(parts) if isinstance(p, torch.fx.Node) and p.name in axes]
    if len(image) != 1 or parts[image[0]].meta["ras_dense_shape"][axes[parts[image[0]].name]] != num_tokens:
        return None
    return node, image[0]


def _numel(node: torch.fx.Node) -> int:
    size = 1
    for s in node.meta["ras_dense_shape"]:
        size *= s
    return size


def _image_only_producer(attention, kind, axes, num_tokens):
    """(image-only tensor to cache, the node that consumes it on the way to ``attention``), or None.

    Walking back from the attention's key (or value), the first tensor that holds image tokens only
    is the candidate. From there the walk goes on through ops that only rearrange elements (head
    splits, transposes, the head repeat of grouped-query attention) and keeps the smallest tensor,
    the earliest among equals, so a GQA model caches its kv heads rather than their repeats.
    """
    consumer, node = attention, sdpa_argument(attention, kind)
    path = []  # the nodes from the cached tensor's consumer up to the attention's argument
    while True:
        if not isinstance(node, torch.fx.Node) or node.name not in axes:
            return None
        axis = axes[node.name]
        if node.meta["ras_dense_shape"][axis] == num_tokens:
            break
        if matches(node, CAT):
            # a joint sequence is built here, before the projections and norms on the way to attention: the
            # image tokens' inputs are no image-only keys; the joint tensor attention reads is cached instead
            raise RewriteError(f"{describe(attention)}: the {kind} is a joint sequence")
        parents = [a for a in node.all_input_nodes if a.name in axes]
        if len(parents) != 1:
            raise RewriteError(f"{describe(attention)}: cannot find the image-only {kind} tensor")
        path.append(node)
        consumer, node = node, parents[0]
    best, best_path = (node, consumer), list(path)
    while matches(node, KV_LAYOUT):  # ops that only move, repeat or cast elements
        parents = [a for a in node.all_input_nodes if a.name in axes]
        if len(parents) != 1 or parents[0].meta["ras_dense_shape"][axes[parents[0].name]] != num_tokens:
            break
        path.append(node)
        consumer, node = node, parents[0]
        if _numel(node) <= _numel(best[0]):
            best, best_path = (node, consumer), list(path)
    query = sdpa_argument(attention, "query")
    if query in best_path:  # reading the cache there would hand the query all N tokens too
        raise RewriteError(f"{describe(attention)}: the query and the {kind} share the tensor {query.name}")
    return best
