"""In a piece of a transformer, merge the image-token output that crosses to the next piece with its cache.

Runs instead of ``scatter_output`` when ``ctx.settings.piece_outputs`` is set: a piece that ends between two blocks
has no final projection; its image tokens leave through the graph output, and the next piece reads them at full
width (the Python between pieces sees the dense shapes).

Matches: every graph output that depends on the active tokens and has the dense shape [B, N, C].
Produces: per such output a ``merge_output`` node that writes the fresh rows into a cache of its dense shape and
hands the full tensor to the output. The first output's cache is the placeholder ``ras_output_cache`` (bound where a
whole graph binds its output cache); each further one's is ``ras_boundary_cache_<i>``, recorded as a cache slot of
kind ``"boundary"`` (bound after the output cache, before the K/V caches). Refuses a piece with no such output.
"""

from __future__ import annotations

import torch
import torch.fx

from . import ops
from .context import KVCacheSlot, PassContext, RewriteError
from .graph_utils import add_placeholder, describe, example_value, forward_slice, insert_call
from .scatter_output import OUTPUT_CACHE


def scatter_piece_outputs(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if not ctx.settings.piece_outputs:
        return gm
    nodes = {n.name: n for n in gm.graph.nodes}
    idx = nodes[ctx.active_idx]
    downstream = forward_slice([idx])
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    crossing = []
    for node in dict.fromkeys(output.all_input_nodes):
        shape = node.meta.get("ras_dense_shape")
        if node in downstream and isinstance(shape, tuple) and len(shape) == 3:
            if shape[:2] == (ctx.batch_size, ctx.num_tokens):
                crossing.append(node)
    if not crossing:
        raise RewriteError("a piece needs a [B, N, C] image-token output to hand on; it has none")
    for i, tokens in enumerate(crossing):
        cache = add_placeholder(gm, OUTPUT_CACHE if i == 0 else f"ras_boundary_cache_{i}", _dense_value(tokens))
        merged = insert_call(gm, tokens, ops.merge_output, (cache, tokens, idx), like=tokens)
        merged.meta["ras_impure"] = True
        merged.meta["ras_dense_shape"] = tokens.meta["ras_dense_shape"]
        output.replace_input_with(tokens, merged)
        value = cache.meta["example_value"]
        if i == 0:
            ctx.output_cache = cache.name
            ctx.output_cache_shape = tuple(int(s) for s in value.shape)
            ctx.output_cache_dtype = value.dtype
        else:  # a further boundary: bound after the output cache, before the K/V caches the next pass adds
            ctx.kv_slots.append(
                KVCacheSlot(cache.name, "", "boundary", tuple(int(s) for s in value.shape), 1, value.dtype)
            )
        ctx.record("scatter_piece_outputs", "scatter", describe(tokens))
    return gm


def _dense_value(tokens: torch.fx.Node) -> torch.Tensor:
    """A fake tensor of ``tokens``' dense value: its recorded one, or, when a pass cleared it (a node that now reads
    the gathered tokens; the gather right after the token source of a piece that is only a patch embedding), that
    of its input of the dense shape."""
    value = example_value(tokens)
    if value is None:
        value = tokens.meta.get("example_value", tokens.meta.get("val"))
    if value is None:
        dense = tuple(tokens.meta["ras_dense_shape"])
        value = next(v for v in map(example_value, tokens.all_input_nodes) if v is not None and tuple(v.shape) == dense)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        return torch.empty(tuple(value.shape), dtype=value.dtype, device=value.device)
