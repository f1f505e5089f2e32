"""Merge the active tokens' fresh outputs with the cached outputs before unpatchify.

Matches: the final projection, i.e. the last ``linear`` that depends on the active tokens and
produces token-wise outputs [B, N, C_out] in the dense graph (SD3 ``proj_out``, Lumina-Next
``norm_out.linear_2``), or the image rows sliced from a projection of the joint sequence
(Lumina-Image 2.0: ``norm_out(joint)[:, L:L + N]``; ERNIE-Image, sequence-first:
``final_linear(joint)[:N].transpose(0, 1)``), or, when later, the last token tensor a reshape puts back on the
token grid for an output layer that runs on the grid (Kandinsky 5: the cache then holds the last hidden states), or
a final linear over a joint ``[image; text]`` sequence that the model takes apart row by row (Z-Image:
``out.unbind(0)``, then ``row[:N]``): ``merge_joint_output`` merges its first k rows and hands on the joint sequence
at its dense length.
Produces: a placeholder ``ras_output_cache`` [B, N, C_out] ([B*F, N, C_out] when the model folds frames into the
batch) and a ``merge_output`` node that writes the fresh rows into the cache and hands the full token tensor to the
unpatchify code.
"""

from __future__ import annotations

import math

import torch
import torch.fx

from . import ops
from .context import PassContext, RewriteError
from .gather_active_tokens import index_for
from .graph_utils import add_placeholder, describe, example_value, forward_slice, insert_call, is_linear
from .op_sets import SLICING, matches

OUTPUT_CACHE = "ras_output_cache"


def scatter_output(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if ctx.settings.piece_outputs:
        return gm  # scatter_piece_outputs merges a piece's outputs
    nodes = {n.name: n for n in gm.graph.nodes}
    idx = nodes[ctx.active_idx]
    downstream = forward_slice([idx])
    projection = None
    for node in gm.graph.nodes:
        shape = node.meta.get("ras_dense_shape")
        if (
            node in downstream
            and (is_linear(node) or _image_rows_of_projection(node, ctx.num_tokens))
            and isinstance(shape, tuple)
            and len(shape) == 3
            and shape[:2] == (ctx.token_batch, ctx.num_tokens)
        ):
            projection = node
    regrid = _reshaped_onto_the_grid(gm, downstream, ctx)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    if regrid is not None and (projection is None or order[regrid] > order[projection]):
        projection = regrid  # the output layer runs on the token grid: merge the tokens before they go back on it
    joint = _joint_output_split_by_rows(gm, downstream, ctx)
    if joint is not None and (projection is None or order[joint] > order[projection]):
        return _merge_joint_output(gm, ctx, joint)
    if projection is None:
        raise RewriteError("no final projection: no linear produces [B, N, C] outputs from the image tokens")
    value = example_value(projection)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake_cache = torch.empty(tuple(value.shape), dtype=value.dtype, device=value.device)
    cache = add_placeholder(gm, OUTPUT_CACHE, fake_cache)
    rows = index_for(gm, ctx, ctx.token_batch)
    merged = insert_call(gm, projection, ops.merge_output, (cache, projection, rows), like=projection)
    merged.meta["ras_impure"] = True
    merged.meta["ras_dense_shape"] = projection.meta["ras_dense_shape"]  # it may be the graph's output (packed)
    projection.replace_all_uses_with(merged, delete_user_cb=lambda user: user is not merged)
    ctx.output_cache = cache.name
    ctx.output_cache_shape = tuple(int(s) for s in value.shape)
    ctx.output_cache_dtype = value.dtype
    ctx.record("scatter_output", "scatter", describe(projection))
    return gm


def _image_rows_of_projection(node: torch.fx.Node, num_tokens: int) -> bool:
    """``node`` slices rows out of a linear's 3-D output along dim 1, a longer one than the image tokens (a joint
    sequence's image rows), or brings such rows of a sequence-first ``[S, B, C]`` output to ``[B, N, C]``
    (``x[:N].transpose(0, 1)``)."""
    sequence_first = _batch_first(node)
    if sequence_first is not None:
        return _image_rows_of_sequence_first_projection(sequence_first, num_tokens)
    if not (matches(node, SLICING) and node.args and isinstance(node.args[0], torch.fx.Node)):
        return False
    source = node.args[0]
    index = node.args[1] if len(node.args) > 1 else None
    dense = source.meta.get("ras_dense_shape")
    return (
        is_linear(source)
        and isinstance(dense, tuple)
        and len(dense) == 3
        and dense[1] > num_tokens
        and isinstance(index, tuple)
        and len(index) == 2
        and index[0] == slice(None)
        and isinstance(index[1], slice)
    )


def _batch_first(node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor ``node`` swaps the first two axes of (``transpose(0, 1)``, ``permute(1, 0, 2)``), or None."""
    if node.op != "call_method" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    if node.target == "transpose" and tuple(node.args[1:3]) in ((0, 1), (1, 0)):
        return node.args[0]
    if node.target == "permute" and tuple(node.args[1:]) in ((1, 0, 2), ((1, 0, 2),)):
        return node.args[0]
    return None


def _image_rows_of_sequence_first_projection(node: torch.fx.Node, num_tokens: int) -> bool:
    """``node`` is ``linear(x)[a:b]`` on a sequence-first ``[S, B, C]`` output longer than the image tokens."""
    if not (matches(node, SLICING) and node.args and isinstance(node.args[0], torch.fx.Node)):
        return False
    source, index = node.args[0], node.args[1] if len(node.args) > 1 else None
    dense = source.meta.get("ras_dense_shape")
    index = index[0] if isinstance(index, tuple) and len(index) == 1 else index
    return (
        is_linear(source)
        and isinstance(dense, tuple)
        and len(dense) == 3
        and dense[0] > num_tokens
        and isinstance(index, slice)
    )


def _reshaped_onto_the_grid(gm: torch.fx.GraphModule, downstream: set, ctx: PassContext) -> torch.fx.Node | None:
    """The last ``[B, N, C]`` token tensor that a ``reshape``/``view`` puts back on a grid of N cells
    (``[B, F, H, W, C]``: Kandinsky 5's ``fractal_unflatten`` before its output layer), or None."""
    found = None
    for node in gm.graph.nodes:
        shape = node.meta.get("ras_dense_shape")
        if node not in downstream or not (isinstance(shape, tuple) and len(shape) == 3):
            continue
        if shape[:2] != (ctx.token_batch, ctx.num_tokens):
            continue
        for user in node.users:
            out = user.meta.get("ras_dense_shape")
            if (
                user.op == "call_method"
                and user.target in ("reshape", "view")
                and isinstance(out, tuple)
                and len(out) > 3
                and out[0] == shape[0]
                and out[-1] == shape[2]
                and math.prod(out[1:-1]) == ctx.num_tokens
            ):
                found = node
    return found


def _joint_output_split_by_rows(gm: torch.fx.GraphModule, downstream: set, ctx: PassContext) -> torch.fx.Node | None:
    """The last linear whose ``[B, N + L, C]`` output (image rows first) is taken apart row by row, each row's
    image rows sliced from its start (Z-Image: ``unified.unbind(0)``, then ``x[i][:N]`` per row), or None."""
    found = None
    for node in gm.graph.nodes:
        shape = node.meta.get("ras_dense_shape")
        if node not in downstream or not is_linear(node) or not (isinstance(shape, tuple) and len(shape) == 3):
            continue
        if shape[0] != ctx.batch_size or shape[1] <= ctx.num_tokens or len(node.users) != 1:
            continue
        (unbind,) = node.users
        if not (unbind.op == "call_method" and unbind.target == "unbind" and _dim(unbind) == 0):
            continue
        rows = list(unbind.users)
        image_rows = (slice(None, ctx.num_tokens), slice(0, ctx.num_tokens))
        if len(rows) == shape[0] and all(
            len(r.users) == 1 and matches(s := next(iter(r.users)), SLICING) and s.args[1] in image_rows for r in rows
        ):
            found = node
    return found


def _dim(node: torch.fx.Node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)


def _merge_joint_output(gm: torch.fx.GraphModule, ctx: PassContext, joint: torch.fx.Node) -> torch.fx.GraphModule:
    """Merge the image rows of the joint output ``joint`` (image rows first) with the output cache: the fresh k rows
    into the cache, the full N rows back into the joint sequence, which then has its dense length."""
    value = example_value(joint)
    shape = (int(value.shape[0]), ctx.num_tokens, int(value.shape[2]))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake_cache = torch.empty(shape, dtype=value.dtype, device=value.device)
    cache = add_placeholder(gm, OUTPUT_CACHE, fake_cache)
    rows = index_for(gm, ctx, ctx.batch_size)
    merged = insert_call(gm, joint, ops.merge_joint_output, (cache, joint, rows), like=joint)
    merged.meta["ras_impure"] = True
    merged.meta["ras_dense_shape"] = joint.meta["ras_dense_shape"]
    joint.replace_all_uses_with(merged, delete_user_cb=lambda user: user is not merged)
    ctx.output_cache = cache.name
    ctx.output_cache_shape = shape
    ctx.output_cache_dtype = value.dtype
    ctx.record("scatter_output", "scatter", describe(joint))
    return gm
