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

import operator

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
    crossing, joints = [], []
    joint_length = _joint_length(gm, ctx)
    for node in dict.fromkeys(output.all_input_nodes):
        shape = node.meta.get("ras_dense_shape")
        if node in downstream and isinstance(shape, tuple) and len(shape) == 3:
            if shape[:2] == (ctx.batch_size, ctx.num_tokens):
                crossing.append(node)
            elif shape[:2] == (ctx.batch_size, joint_length):
                joints.append(node)
    for joint in joints:
        crossing.append(_image_rows(gm, joint, output, ctx))
    if not crossing:
        handed_on = [n for n in dict.fromkeys(output.all_input_nodes) if n in downstream]
        shapes = ", ".join(f"{n.name} {list(n.meta.get('ras_dense_shape') or ())}" for n in handed_on) or "none"
        raise RewriteError(
            f"a piece needs a [B, N, C] image-token output to hand on; it hands its tokens on in another layout "
            f"({shapes})"
            if handed_on
            else "a piece needs a [B, N, C] image-token output to hand on; it has none"
        )
    for i, tokens in enumerate(crossing):
        cache = add_placeholder(gm, OUTPUT_CACHE if i == 0 else f"ras_boundary_cache_{i}", _dense_value(tokens))
        merged = insert_call(gm, tokens, ops.merge_output, (cache, tokens, idx), like=tokens)
        merged.meta["ras_impure"] = True
        merged.meta["ras_dense_shape"] = tokens.meta["ras_dense_shape"]
        if tokens in output.all_input_nodes:
            output.replace_input_with(tokens, merged)
        else:  # the image rows of a joint sequence: joined back between its other rows
            tokens.replace_all_uses_with(merged, delete_user_cb=lambda user, merged=merged: user is not merged)
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


def _joint_length(gm: torch.fx.GraphModule, ctx: PassContext) -> int | None:
    """The length of the joint sequence a piece takes its image tokens in (``piece_joint``), if it does."""
    if ctx.settings.piece_joint is None:
        return None
    joint = next(n for n in gm.graph.nodes if n.name == ctx.latents)
    return joint.meta["ras_dense_shape"][1]


def _image_rows(gm: torch.fx.GraphModule, joint: torch.fx.Node, output: torch.fx.Node, ctx: PassContext):
    """Split a joint-sequence output into its rows before, its image rows and its rows after (image rows from the
    row the input's start at), joined back in the output; returns the image rows' node."""
    row, n = ctx.settings.piece_joint[1], ctx.num_tokens
    value = _dense_value(joint)
    parts = []
    with gm.graph.inserting_before(output):
        for span in (slice(None, row), slice(row, row + n), slice(row + n, None)):
            part = gm.graph.call_function(operator.getitem, (joint, (slice(None), span)))
            part.meta["ras_dense_shape"] = tuple(int(s) for s in value[:, span].shape)
            parts.append(part)
        joined = gm.graph.call_function(torch.cat, (parts, 1))
    joined.meta["ras_dense_shape"] = joint.meta["ras_dense_shape"]
    output.replace_input_with(joint, joined)
    parts[1].meta["example_value"] = value[:, row : row + n]
    return parts[1]


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
