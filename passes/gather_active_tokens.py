"""Insert the gather of active image tokens right after the token source.

Matches: the image-token node found by ``find_token_source`` ([B, N, C]), and a piece's further image-token inputs.
Produces: a new placeholder ``ras_active_idx`` [B, k] (int64), a ``gather_tokens`` node
[B, k, C] that replaces every use of the token source, and ``ras_active_count``
(``ras_active_idx.size(1)``) that later passes use wherever a shape constant counted N.
When the model folds frames into the batch (``ctx.token_rows`` = F > 1: token tensors [B*F, N, C]), the gather
reads ``index_for``'s repeat of the index, one row per frame (row b*F + f takes item b's tokens).
"""

from __future__ import annotations

import torch
import torch.fx

from . import ops
from .context import PassContext, RewriteError
from .graph_utils import add_placeholder, describe, example_value, insert_call, placeholders

ACTIVE_IDX = "ras_active_idx"


def gather_active_tokens(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    nodes = {n.name: n for n in gm.graph.nodes}
    source = nodes[ctx.token_source]
    n_tokens = ctx.num_tokens
    k = ctx.settings.probe_tokens
    if k is None:
        k = probe_token_count(n_tokens, ctx.context_parallel.degree if ctx.context_parallel else 1)
    if not 2 <= k < n_tokens:
        raise RewriteError(f"probe token count {k} is outside [2, {n_tokens - 1}]")
    device = example_value(source).device
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fake_idx = torch.empty(ctx.batch_size, k, dtype=torch.int64, device=device)
    idx = add_placeholder(gm, ACTIVE_IDX, fake_idx)
    with gm.graph.inserting_after(idx):
        count = gm.graph.call_method("size", (idx, 1))
    count.meta["ras_managed"] = True
    ctx.active_idx = idx.name
    ctx.active_count = count.name
    rows = index_for(gm, ctx, int(example_value(source).shape[0]))
    # the gather goes after the token source and after the index it reads (the source may be the latents input)
    after = rows if source.op == "placeholder" else source
    gathered = insert_call(gm, after, ops.gather_tokens, (source, rows, 1), like=source)
    # with k = N the gather is the source itself: its consumers are in the token region too
    gathered.meta["ras_dense_shape"] = source.meta["ras_dense_shape"]
    source.replace_all_uses_with(gathered, delete_user_cb=lambda user: user is not gathered)
    for name in ctx.more_token_sources:  # a piece's further image-token inputs: the same rows
        more = nodes[name]
        taken = insert_call(gm, count, ops.gather_tokens, (more, idx, 1), like=more)
        taken.meta["ras_dense_shape"] = more.meta["ras_dense_shape"]
        more.replace_all_uses_with(taken, delete_user_cb=lambda user, taken=taken: user is not taken)
    ctx.probe_tokens = k
    ctx.record("gather_active_tokens", "gather", describe(source))
    return gm


def index_for(gm: torch.fx.GraphModule, ctx: PassContext, batch: int) -> torch.fx.Node:
    """The active index for tensors whose leading size is ``batch``: ``ras_active_idx`` itself for the latents'
    batch B, its rows repeated ``token_rows`` times for ``ctx.token_batch`` (frames folded into the batch, one
    node shared by every pass), and a RewriteError for any other batch."""
    idx = next(n for n in placeholders(gm) if n.name == ctx.active_idx)
    if batch == ctx.batch_size:
        return idx
    if ctx.token_rows == 1 or batch != ctx.token_batch:
        raise RewriteError(
            f"a token tensor of batch {batch}: neither the latents' batch {ctx.batch_size} nor "
            f"{ctx.token_batch} rows of folded frames"
        )
    for node in idx.users:
        if node.target is torch.repeat_interleave and node.args[1:] == (ctx.token_rows, 0):
            return node
    count = next(n for n in idx.users if n.name == ctx.active_count)
    rows = insert_call(gm, count, torch.repeat_interleave, (idx, ctx.token_rows, 0))
    rows.meta["ras_managed"] = True
    return rows


def probe_token_count(num_tokens: int, multiple: int = 1) -> int:
    """The k used while rewriting: not N (token axes show up as changed sizes) and not 1 (broadcasting); a multiple
    of ``multiple`` (the context-parallel degree: each rank takes k / P of the active tokens)."""
    if num_tokens < 4 * multiple:
        raise RewriteError(f"only {num_tokens} image tokens; RAS needs at least {4 * multiple}")
    return -(-(num_tokens // 2 + 1) // multiple) * multiple
