"""A canonical, human-readable summary of a rewritten graph, for snapshot tests and debugging."""

from __future__ import annotations

import torch.fx

from .context import PassContext, RewriteRecord

#: Where ``build_ras_graph`` leaves the records on the graph module it returns (``rewrite_records``).
RECORDS_KEY = "ras_records"

#: One line per kind of ``RewriteRecord``, filled in from the record's fields.
RECORD_FORMATS = {
    # batch_row_loops: detail says how many row ops became how many batched ones
    "row_writes": "rows: {node} written row by row becomes one concatenation ({detail})",
    "row_stack": "rows: {node} stacks rows computed one by one; becomes one batched chain ({detail})",
    # tensorify_scalar_reads
    "scalar_read": "scalar: {node} reads a one-element input that only scales tensors; it stays a tensor",
    # find_token_source
    "tokens": "tokens: {detail} from {node}",
    # functionalize_inplace_writes: detail is the write ("setitem", "add_", ...)
    "inplace_write": "write: in-place {detail} made out-of-place in {node}",
    # gather_active_tokens, scatter_output
    "gather": "gather: active tokens taken after {node}",
    "scatter": "scatter: outputs merged with the output cache after {node}",
    # cache_attention_kv: detail is "key" or "value", with the cached shape and axis for kv_cached
    "kv_disabled": "kv: cache disabled, attention sees active tokens only",
    "kv_cached": "kv: cached {detail} for {node}",
    "kv_joint": "kv: joint {detail}, its image rows (from row {offset}) cached, for {node}",
    # retarget_token_region and its position-table rule: detail lists the literals
    "literal": "literal: token count {detail} made relative to k in {node}",
    "mask": "mask: attention mask rows gathered for {node}",
    "table": "table: position table gathered at active tokens for {node}",
    "squeeze": "squeeze: {node} leaves the token axis alone (a no-op on it with N tokens, not with one)",
    "joint_table": "table: joint position table (image rows from {offset}) gathered for {node}",
    "broadcast_table": "table: one row broadcast along the tokens, cut to their count for {node}",
    "fused_table": "table: rows of each item's tokens gathered beside tokens fused with the batch for {node}",
    # fuse_kv_projection: node is the projection's module path, detail the chain ("linear + rms_norm") or the
    # reason it stays unfused
    "fused": "fuse: {detail} @ {node} -> linear_scatter_ into {cache}",
    "unfused": "fuse: {cache} stays unfused: {detail}",
    # unshard_ulysses and shard_ulysses: detail gives the degree and the rank
    "cp_unsharded": "context parallelism: {detail} marked attentions, rewritten over all tokens",
    "cp_sharded": "context parallelism: the RAS step sharded again for {detail}",
}


def render_record(record: RewriteRecord) -> str:
    """The summary line of one record."""
    return RECORD_FORMATS[record.kind].format(
        node=record.node, detail=record.detail, cache=record.cache, offset=record.offset
    )


def rewrite_records(gm: torch.fx.GraphModule) -> tuple[RewriteRecord, ...]:
    """The records of the rewrite that made ``gm`` (a graph ``build_ras_graph`` returned; empty for others)."""
    return gm.meta.get(RECORDS_KEY, ())


def graph_summary(ctx: PassContext) -> str:
    """What the passes found and rewrote, one line each, in graph order; stable across runs."""
    lines = [
        _latents_line(ctx),
        f"timestep: {ctx.timestep}",
        f"output cache: {list(ctx.output_cache_shape)}",
        f"kv caches: {len(ctx.kv_slots)}",
        *map(render_record, ctx.records),
    ]
    return "\n".join(lines) + "\n"


def _latents_line(ctx: PassContext) -> str:
    if ctx.latent is None:
        return f"latents: {ctx.latents} {ctx.latent_hw[0]}x{ctx.latent_hw[1]}, batch {ctx.batch_size}"
    shape = "x".join(map(str, ctx.latent.shape[1:]))
    if ctx.latents_rows:  # a list of per-row latents, stacked
        names = ", ".join(ctx.latents_rows)
        return f"latents: rows {names} stacked to [B, {shape}] ({ctx.latent.describe()}), batch {ctx.batch_size}"
    return f"latents: {ctx.latents} [B, {shape}] ({ctx.latent.describe()}), batch {ctx.batch_size}"
