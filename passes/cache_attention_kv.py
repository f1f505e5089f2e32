"""Give every attention over image keys a per-layer K/V cache of all N image tokens.

Matches: each ``scaled_dot_product_attention`` whose key (and value) carries image tokens; where they come
from is the K/V-source rule's call (``kv_sources.find_kv_source``).
Produces: per key and value, a placeholder ``ras_kv_cache_<i>`` that holds the N image tokens' rows (the dense
shape of the image tokens' key or value; text rows are never cached, every step computes them anyway) and a node
that writes the step's fresh rows into it and hands attention the full tensor, so attention sees fresh keys for
active tokens and the cached keys of every other image token:
- an image-only source: ``update_kv_cache`` writes the active tokens' rows and passes the cache on;
- a joint sequence concatenated at attention (SD3): ``update_joint_kv_cache`` writes the active image rows and
  concatenates the step's text parts with the whole cache in the image part's place;
- a joint tensor built earlier (Flux's RoPE after the concatenation, single-stream blocks):
  ``update_joint_rows_cache`` writes the active image rows and puts the cache between the step's text rows.
With ``kv_cache_dtype="fp8_e4m3"`` each cache is float8 with a float32 scale cache per row of its last dim (one
head of one token), and the ``update_quantized_*`` forms write the active rows quantized and hand attention the
cache dequantized with the step's own rows unquantized.
Reads the token axes and the image rows' offset in joint sequences from ``ctx.token_region``
(``analyze_token_region``).
"""

from __future__ import annotations

import torch
import torch.fx

from . import ops
from .context import KVCacheSlot, PassContext, module_path
from .gather_active_tokens import index_for
from .graph_utils import add_placeholder, cat_arguments, describe, example_value, insert_call, is_sdpa
from .normalize_attention_args import sdpa_argument
from .rules.kv_sources import find_kv_source


def cache_attention_kv(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if not ctx.settings.kv_cache:
        ctx.record("cache_attention_kv", "kv_disabled")
        return gm
    if ctx.token_region is None:
        raise RuntimeError("cache_attention_kv reads ctx.token_region: run analyze_token_region before it")
    axes, offsets = ctx.token_region.axes, ctx.token_region.image_offsets
    for attention in [n for n in gm.graph.nodes if is_sdpa(n)]:
        for kind in ("key", "value"):
            source = find_kv_source(attention, kind, axes, offsets, ctx.num_tokens)
            if source is None:
                continue
            # the index for the cached tensor's batch (one row per frame when frames are folded into it)
            idx = index_for(gm, ctx, int(example_value(source.tensor).shape[0]))
            if source.kind == "joint-at-attention":
                _cache_joint_sequence(gm, ctx, attention, kind, (source.tensor, source.image_part), idx, axes)
            elif source.kind == "joint-tensor":
                _cache_joint_tensor(gm, ctx, attention, kind, idx, axes, offsets)
            else:
                # under context parallelism the cache holds a rank's heads: it is written where attention reads it
                at_attention = attention.meta.get("ras_cp_attention", False)
                tensor = sdpa_argument(attention, kind) if at_attention else source.tensor
                consumer, axis = attention if at_attention else source.consumer, axes[tensor.name]
                caches = _add_cache(gm, ctx, attention, kind, example_value(tensor), axis, ctx.num_tokens)
                op = ops.update_kv_cache if len(caches) == 1 else ops.update_quantized_kv_cache
                updated = insert_call(gm, tensor, op, (*caches, tensor, idx, axis), like=tensor)
                updated.meta["ras_impure"] = True
                consumer.replace_input_with(tensor, updated)
    return gm


def _add_cache(
    gm, ctx: PassContext, attention, kind: str, value: torch.Tensor, axis: int, num_tokens: int
) -> tuple[torch.fx.Node, ...]:
    """A cache like the dense ``value`` with ``num_tokens`` rows along ``axis`` (its image rows only): ``(cache,)``,
    or ``(cache, scale)`` for float8 caches (``kv_cache_dtype``), the scale a float32 per row of the last dim."""
    shape = tuple(value.shape[:axis]) + (num_tokens,) + tuple(value.shape[axis + 1 :])
    dtype = ops.KV_CACHE_DTYPES.get(ctx.settings.kv_cache_dtype, value.dtype)
    cache = _placeholder(gm, ctx, attention, kind, shape, axis, dtype, value.device)
    detail = f"{kind} {shape} axis {axis}" + (f" as {dtype}" if dtype != value.dtype else "")
    ctx.record("cache_attention_kv", "kv_cached", describe(attention), detail, cache=cache.name)
    if dtype == value.dtype:
        return (cache,)
    scale = _placeholder(gm, ctx, attention, f"{kind}_scale", (*shape[:-1], 1), axis, torch.float32, value.device)
    return cache, scale


def _placeholder(gm, ctx: PassContext, attention, kind: str, shape, axis: int, dtype, device) -> torch.fx.Node:
    name = f"ras_kv_cache_{len(ctx.kv_slots)}"
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake = torch.empty(shape, dtype=dtype, device=device)
    ctx.kv_slots.append(KVCacheSlot(name, module_path(attention), kind, shape, axis, dtype))
    return add_placeholder(gm, name, fake)


def _cache_joint_sequence(gm, ctx: PassContext, attention, kind: str, joint, idx, axes) -> None:
    """Cache the image part of the joint sequence that attention reads: its active rows are written into the
    cache, and attention reads the step's text parts joined with the whole cache."""
    cat, image_part = joint
    axis = axes[cat.name]
    parts = list(cat_arguments(cat)[0])
    image = example_value(parts[image_part])
    caches = _add_cache(gm, ctx, attention, kind, image, axis, ctx.num_tokens)
    op = ops.update_joint_kv_cache if len(caches) == 1 else ops.update_quantized_joint_kv_cache
    updated = insert_call(gm, cat, op, (*caches, parts, idx, axis, image_part), like=cat)
    updated.meta["ras_impure"] = True
    attention.replace_input_with(cat, updated)


def _cache_joint_tensor(gm, ctx: PassContext, attention, kind: str, idx, axes, offsets) -> None:
    """Cache the joint key (or value) tensor attention reads (its image rows located by ``find_kv_source``)."""
    tensor = sdpa_argument(attention, kind)
    axis, offset = axes[tensor.name], offsets[tensor.name]
    caches = _add_cache(gm, ctx, attention, kind, example_value(tensor), axis, ctx.num_tokens)
    op = ops.update_joint_rows_cache if len(caches) == 1 else ops.update_quantized_joint_rows_cache
    updated = insert_call(gm, tensor, op, (*caches, tensor, idx, axis, offset), like=tensor)
    updated.meta["ras_impure"] = True
    attention.replace_input_with(tensor, updated)
    ctx.record("cache_attention_kv", "kv_joint", describe(attention), kind, cache=caches[0].name, offset=offset)
