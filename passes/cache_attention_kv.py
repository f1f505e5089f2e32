"""Give every attention over image keys a per-layer K/V cache of all N image tokens.

Matches: each ``scaled_dot_product_attention`` whose key (and value) carries image tokens.
Walking back from the key along the token-carrying producers (through a ``cat`` with text
keys, transposes, head repeats, ...) it finds the last tensor that holds image tokens only:
the image keys after any q/k norm and RoPE.
Produces: per key and value, a placeholder ``ras_kv_cache_<i>`` with the dense shape of that
tensor and an ``update_kv_cache`` node that writes the active tokens' fresh rows into it and
passes the full cache on, so attention sees fresh keys for active tokens and the cached keys
of every other image token. When attention reads ``cat([image keys, text keys])`` directly (SD3
joint attention), the cache holds that whole joint sequence instead and ``update_joint_kv_cache``
writes the text rows and the active image rows into it, so no concatenation runs. When the key
reaches attention as a joint sequence built earlier (RoPE applied after concatenating text and image
keys, as Flux does, or text and image concatenated before the projection, as single-stream blocks do),
the cache holds that joint tensor as attention reads it and ``update_joint_rows_cache`` writes every
text row and the active image rows at their dense rows. Needs the token axes and the image rows' offset
in joint sequences, which it gets by retargeting a copy.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from . import ops
from .context import KVCacheSlot, PassContext, RewriteError, module_path
from .graph_utils import add_placeholder, describe, example_value, insert_call, is_sdpa
from .normalize_attention_args import sdpa_argument
from .retarget_token_region import retarget_token_region


def cache_attention_kv(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if not ctx.kv_cache:
        ctx.note("kv: cache disabled, attention sees active tokens only")
        return gm
    axes, offsets = _token_axes_of_retargeted_copy(gm, ctx)
    nodes = {n.name: n for n in gm.graph.nodes}
    idx = nodes[ctx.active_idx]
    for attention in [n for n in gm.graph.nodes if is_sdpa(n)]:
        for kind, position in (("key", 1), ("value", 2)):
            joint = _joint_concat(sdpa_argument(attention, kind), axes, ctx.num_tokens)
            if joint is not None:
                _cache_joint_sequence(gm, ctx, attention, kind, joint, idx, axes)
                continue
            try:
                found = _image_only_producer(attention, position, axes, ctx.num_tokens)
            except RewriteError:
                if not _cache_joint_tensor(gm, ctx, attention, kind, idx, axes, offsets):
                    raise
                continue
            if found is None:
                continue
            tensor, consumer = found
            axis = axes[tensor.name]
            cache = _add_cache(gm, ctx, attention, kind, example_value(tensor), axis)
            updated = insert_call(gm, tensor, ops.update_kv_cache, (cache, tensor, idx, axis), like=tensor)
            updated.meta["ras_impure"] = True
            consumer.replace_input_with(tensor, updated)
    return gm


def _add_cache(gm, ctx: PassContext, attention, kind: str, value: torch.Tensor, axis: int) -> torch.fx.Node:
    name = f"ras_kv_cache_{len(ctx.kv_slots)}"
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.empty(tuple(value.shape), dtype=value.dtype, device=value.device)
    cache = add_placeholder(gm, name, fake)
    ctx.kv_slots.append(KVCacheSlot(name, module_path(attention), kind, tuple(value.shape), axis, value.dtype))
    ctx.note(f"kv: cached {kind} {tuple(value.shape)} axis {axis} for {describe(attention)}")
    return cache


def _joint_concat(node, axes, num_tokens):
    """For ``cat([..., image keys, ...], dim=token axis)`` fed straight to attention: (cat, image part index)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is torch.cat):
        return None
    parts, dim = _cat_arguments(node)
    if node.name not in axes or not isinstance(parts, (list, tuple)):
        return None
    ndim = len(node.meta["ras_dense_shape"])
    if dim % ndim != axes[node.name]:
        return None
    image = [i for i, p in enumerate(parts) if isinstance(p, torch.fx.Node) and p.name in axes]
    if len(image) != 1 or parts[image[0]].meta["ras_dense_shape"][axes[parts[image[0]].name]] != num_tokens:
        return None
    return node, image[0]


def _cat_arguments(node: torch.fx.Node) -> tuple:
    """``(tensors, dim)`` of a ``torch.cat`` node, passed by position or by name."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return tensors, dim


def _cache_joint_sequence(gm, ctx: PassContext, attention, kind: str, joint, idx, axes) -> None:
    """Cache the whole joint sequence that attention reads: active image rows and every text row are
    written into it in place, and attention reads the buffer itself, with no concatenation."""
    cat, image_part = joint
    axis = axes[cat.name]
    parts = list(_cat_arguments(cat)[0])
    slots = [p.meta["ras_dense_shape"][axis] for p in parts]
    cache = _add_cache(gm, ctx, attention, kind, example_value(cat), axis)
    updated = insert_call(gm, cat, ops.update_joint_kv_cache, (cache, parts, idx, axis, image_part, slots), like=cat)
    updated.meta["ras_impure"] = True
    attention.replace_input_with(cat, updated)


def _cache_joint_tensor(gm, ctx: PassContext, attention, kind: str, idx, axes, offsets) -> bool:
    """Cache the joint key (or value) tensor attention reads, when its image rows are located."""
    tensor = sdpa_argument(attention, kind)
    if not isinstance(tensor, torch.fx.Node) or tensor.name not in axes or offsets.get(tensor.name) is None:
        return False
    axis, offset = axes[tensor.name], offsets[tensor.name]
    cache = _add_cache(gm, ctx, attention, kind, example_value(tensor), axis)
    args = (cache, tensor, idx, axis, offset, ctx.num_tokens)
    updated = insert_call(gm, tensor, ops.update_joint_rows_cache, args, like=tensor)
    updated.meta["ras_impure"] = True
    attention.replace_input_with(tensor, updated)
    ctx.note(f"kv: joint {kind} cached whole (image rows from {offset}) for {describe(attention)}")
    return True


def _token_axes_of_retargeted_copy(gm: torch.fx.GraphModule, ctx: PassContext) -> tuple[dict, dict]:
    """Token axes, and where joint sequences keep their image rows, by node name, from a retargeted copy."""
    graph = torch.fx.Graph()
    value_map: dict = {}
    out = graph.graph_copy(gm.graph, value_map)
    graph.output(out)
    trial = torch.fx.GraphModule(gm, graph)
    retarget_token_region(trial, dataclasses.replace(ctx, log=[], kv_slots=[]))
    axes = {n.name: n.meta["ras_token_axis"] for n in trial.graph.nodes if "ras_token_axis" in n.meta}
    offsets = {n.name: n.meta["ras_image_offset"] for n in trial.graph.nodes if "ras_image_offset" in n.meta}
    return axes, offsets


LAYOUT_METHODS = {
    "view",
    "reshape",
    "transpose",
    "permute",
    "flatten",
    "unflatten",
    "unsqueeze",
    "squeeze",
    "repeat",
    "expand",
    "repeat_interleave",
    "contiguous",
    "to",
    "type_as",
    "float",
    "half",
    "bfloat16",
}
LAYOUT_FUNCTIONS = {
    torch.transpose,
    torch.permute,
    torch.flatten,
    torch.unflatten,
    torch.unsqueeze,
    torch.squeeze,
    torch.reshape,
    torch.repeat_interleave,
}


def _is_layout(node: torch.fx.Node) -> bool:
    """Ops that only move, repeat or cast elements: running them on the cache gives the same keys."""
    if node.op == "call_method":
        return node.target in LAYOUT_METHODS
    return node.op == "call_function" and node.target in LAYOUT_FUNCTIONS


def _numel(node: torch.fx.Node) -> int:
    size = 1
    for s in node.meta["ras_dense_shape"]:
        size *= s
    return size


def _image_only_producer(attention, position, axes, num_tokens):
    """(image-only tensor to cache, the node that consumes it on the way to ``attention``), or None.

    Walking back from the attention's key (or value), the first tensor that holds image tokens only
    is the candidate. From there the walk goes on through ops that only rearrange elements (head
    splits, transposes, the head repeat of grouped-query attention) and keeps the smallest tensor,
    the earliest among equals, so a GQA model caches its kv heads rather than their repeats.
    """
    consumer, node = attention, sdpa_argument(attention, ("key", "value")[position - 1])
    while True:
        if not isinstance(node, torch.fx.Node) or node.name not in axes:
            return None
        axis = axes[node.name]
        if node.meta["ras_dense_shape"][axis] == num_tokens:
            break
        if node.op == "call_function" and node.target is torch.cat:
            # a joint sequence is built here, before the projections and norms on the way to attention: the
            # image tokens' inputs are no image-only keys; the joint tensor attention reads is cached instead
            raise RewriteError(f"{describe(attention)}: the {('key', 'value')[position - 1]} is a joint sequence")
        parents = [a for a in node.all_input_nodes if a.name in axes]
        if len(parents) != 1:
            raise RewriteError(
                f"{describe(attention)}: cannot find the image-only {('key', 'value')[position - 1]} tensor"
            )
        consumer, node = node, parents[0]
    best = (node, consumer)
    while _is_layout(node):
        parents = [a for a in node.all_input_nodes if a.name in axes]
        if len(parents) != 1 or parents[0].meta["ras_dense_shape"][axes[parents[0].name]] != num_tokens:
            break
        consumer, node = node, parents[0]
        if _numel(node) <= _numel(best[0]):
            best = (node, consumer)
    return best
