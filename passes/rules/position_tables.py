"""The position-table rule: tensors indexed by token position follow the active tokens.

Called by the token-region walk (``retarget_token_region``, and ``analyze_token_region`` on a copy) for each node
of the token region.
Matches:
- a tensor that is not computed from the image tokens, combined element-wise (add, mul, ...) with a token
  tensor, whose size along the token axis is N (an image-only RoPE table or position embedding) or the
  dense length of a joint [text; image] sequence whose image rows start at a known offset (Flux's RoPE over
  the concatenated sequence, CogVideoX's sin-cos table over [text; image]);
- the mask of an attention whose query (or key) carries image tokens, with one row (column) per token.
Produces: ``gather_position_table`` (image-only: rows ``idx``, repeated per frame when the model folds frames into
the batch) or ``gather_joint_table`` (joint: every text row, the active image rows at ``offset + idx``) before the
consumer, which then reads the gathered table; for a table that is one row expanded along the token axis
(ERNIE-Image's modulation over its sequence-first joint sequence), ``rows_like``: as many of its rows as the
consumer's tokens; for a table of B*N rows beside a token axis fused with the batch (Latte's per-site timestep
modulation of its temporal blocks, ``[B*N, 1, C]``), ``gather_fused_rows``: rows ``b*N + idx[b]``.
Size-1 (broadcast) axes need nothing. Refuses a joint table or mask whose image rows cannot be located, a
mask computed from image tokens, and causal attention over image tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx
from torch.fx.node import map_aggregate

from .. import ops
from ..context import RewriteError
from ..graph_utils import describe, example_value, insert_call, is_elementwise
from ..normalize_attention_args import sdpa_argument

if TYPE_CHECKING:
    from ..retarget_token_region import TokenRegion


def gather_attention_mask(gm, node, region: TokenRegion, idx) -> None:
    query, key = sdpa_argument(node, "query"), sdpa_argument(node, "key")
    if sdpa_argument(node, "is_causal", False):
        raise RewriteError(f"{node.name} ({describe(node)}): causal attention over image tokens")
    mask = sdpa_argument(node, "attn_mask")
    if not isinstance(mask, torch.fx.Node):
        return
    if region.axis(mask) is not None:
        raise RewriteError(f"{node.name} ({describe(node)}): attention mask computed from image tokens")
    ndim = len(region.env.shape(query))
    for arg, mask_axis in ((query, -2), (key, -1)):
        arg_axis = region.axis(arg)
        if arg_axis is None:
            continue
        if arg_axis != ndim - 2:
            raise RewriteError(f"{node.name} ({describe(node)}): tokens are not on the sequence axis")
        dense_len = region.dense_size(arg, arg_axis)
        mask_shape = region.env.shape(mask)
        if mask_shape[mask_axis] == 1:
            continue
        axis = ndim + mask_axis
        rows = region.rows_index(region.env.shape(query)[0])
        if dense_len == region.n:
            gathered = insert_call(gm, node, ops.gather_position_table, (mask, rows, axis, ndim), before=True)
        else:
            offset = region.offsets.get(arg)
            if offset is None or mask_shape[mask_axis] != dense_len:
                raise RewriteError(f"{node.name} ({describe(node)}): mask over a joint image+text sequence")
            args = (mask, rows, axis, ndim, offset, region.n, dense_len)
            gathered = insert_call(gm, node, ops.gather_joint_table, args, before=True)
        region.env.evaluate(gathered)
        replace_arg(node, mask, gathered)
        mask = gathered
        region.record("retarget_token_region", "mask", describe(node))


def gather_position_tables(gm, node, inputs, region: TokenRegion, idx) -> None:
    ref = inputs[0]
    ref_shape = region.env.shape(ref)
    ref_axis = region.axis(ref)
    if ref_axis < 0:
        return
    out_ndim = len(node.meta["ras_dense_shape"] or ref_shape)
    out_axis = ref_axis + out_ndim - len(ref_shape)
    for arg in node.all_input_nodes:
        if arg in inputs or not isinstance(region.env.values.get(arg), torch.Tensor):
            continue
        shape = region.env.shape(arg)
        table_axis = out_axis - (out_ndim - len(shape))
        if table_axis < 0 or shape[table_axis] != region.dense_size(ref, ref_axis) or shape[table_axis] == 1:
            continue
        if _broadcast_along(arg, table_axis):
            gathered = insert_call(gm, node, ops.rows_like, (arg, ref, table_axis, ref_axis), before=True)
            region.record("retarget_token_region", "broadcast_table", describe(node))
        elif region.fused(ref):
            # a table of B*N rows (item-major) beside a token axis fused with the batch: Latte's per-site timestep
            args = (arg, idx, table_axis)
            if args in region.gathered:
                replace_arg(node, arg, region.gathered[args])
                continue
            gathered = insert_call(gm, node, ops.gather_fused_rows, args, before=True)
            region.gathered[args] = gathered
            region.record("retarget_token_region", "fused_table", describe(node))
        elif shape[table_axis] == region.n:
            args = (arg, region.rows_index(region.env.shape(ref)[0]), out_axis, out_ndim)
            if args in region.gathered:  # the same table at the same place: one gather serves every layer
                replace_arg(node, arg, region.gathered[args])
                continue
            gathered = insert_call(gm, node, ops.gather_position_table, args, before=True)
            region.gathered[args] = gathered
            region.record("retarget_token_region", "table", describe(node))
        else:
            offset = region.offsets.get(ref)
            if offset is None:
                raise RewriteError(
                    f"{node.name} ({describe(node)}): position table over a joint sequence whose image rows "
                    "cannot be located"
                )
            args = (arg, idx, out_axis, out_ndim, offset, region.n, shape[table_axis])
            if args in region.gathered:
                replace_arg(node, arg, region.gathered[args])
                continue
            gathered = insert_call(gm, node, ops.gather_joint_table, args, before=True)
            region.gathered[args] = gathered
            region.record("retarget_token_region", "joint_table", describe(node), offset=offset)
        region.env.evaluate(gathered)
        replace_arg(node, arg, gathered)


def _broadcast_along(table: torch.fx.Node, axis: int) -> bool:
    """Whether ``table`` is one row expanded along ``axis`` (then cast, copied or combined with scalars), so that
    any of its rows will do for any token."""
    while not (table.op == "call_method" and table.target == "expand"):
        tensors = [a for a in table.all_input_nodes if isinstance(example_value(a), torch.Tensor)]
        if len(tensors) != 1 or not (is_elementwise(table) or table.target in ("contiguous", "clone", "to", "float")):
            return False  # ``1 + scale`` and casts keep the rows equal; anything else may not
        table = tensors[0]
    if not isinstance(table.args[0], torch.fx.Node):
        return False
    source, expanded = example_value(table.args[0]), example_value(table)
    return (
        isinstance(source, torch.Tensor)
        and isinstance(expanded, torch.Tensor)
        and source.dim() == expanded.dim()
        and source.shape[axis] == 1
    )


def replace_arg(node: torch.fx.Node, old: torch.fx.Node, new: torch.fx.Node) -> None:
    swap = lambda a: new if a is old else a  # noqa: E731
    node.args = map_aggregate(node.args, swap)
    node.kwargs = map_aggregate(node.kwargs, swap)
