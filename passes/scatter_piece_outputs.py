"""In a piece of a transformer, merge the image-token output that crosses to the next piece with its cache.

Runs instead of ``scatter_output`` when ``ctx.settings.piece_outputs`` is set: a piece that ends between two blocks
has no final projection; its image tokens leave through the graph output, and the next piece reads them at full
width (the Python between pieces sees the dense shapes).

Matches: the graph output that depends on the active tokens and has the dense shape [B, N, C].
Produces: a placeholder ``ras_output_cache`` [B, N, C] (the piece's boundary cache, bound where a whole graph binds
its output cache) and a ``merge_output`` node that writes the fresh rows into it and hands the full tensor to the
output. Refuses a piece with no such output or with more than one.
"""

from __future__ import annotations

import torch
import torch.fx

from . import ops
from .context import PassContext, RewriteError
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
    if len(crossing) != 1:
        names = ", ".join(n.name for n in crossing) or "none"
        raise RewriteError(f"a piece needs exactly one [B, N, C] image-token output to hand on; it has {names}")
    (tokens,) = crossing
    # the dense value: a pass may have cleared the recorded one of a node that now reads the gathered tokens
    value = example_value(tokens)
    if value is None:
        value = tokens.meta.get("example_value", tokens.meta.get("val"))
    if value is None:  # the gather right after the token source (a piece that is only a patch embedding)
        dense = tuple(tokens.meta["ras_dense_shape"])
        value = next(v for v in map(example_value, tokens.all_input_nodes) if v is not None and tuple(v.shape) == dense)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake_cache = torch.empty(tuple(value.shape), dtype=value.dtype, device=value.device)
    cache = add_placeholder(gm, OUTPUT_CACHE, fake_cache)
    merged = insert_call(gm, tokens, ops.merge_output, (cache, tokens, idx), like=tokens)
    merged.meta["ras_impure"] = True
    merged.meta["ras_dense_shape"] = tokens.meta["ras_dense_shape"]
    output.replace_input_with(tokens, merged)
    ctx.output_cache = cache.name
    ctx.output_cache_shape = tuple(int(s) for s in value.shape)
    ctx.output_cache_dtype = value.dtype
    ctx.record("scatter_piece_outputs", "scatter", describe(tokens))
    return gm
