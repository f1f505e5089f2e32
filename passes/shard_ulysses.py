"""Put Ulysses context parallelism back into a RAS step graph that ``unshard_ulysses`` took it out of.

Matches: a RAS graph built from a rank's graph under diffusers' Ulysses context parallelism (``ctx.context_parallel``
set): the markers ``unshard_ulysses`` left where the plan cut shards and gathered the output, each attention it
marked, the cache writes and output merges the RAS passes inserted.
Produces the step each rank runs. ``ras_active_idx`` stays the whole active list (the same on every rank, its
length a multiple of P); the rank works on its slice of the list (``parallel_ops.rank_slice``), not on a
contiguous part of the image, so every rank gets k / P tokens whatever the selection:
- a shard of the gathered active tokens becomes that slice; every other shard (text, position tables and the
  model's inputs before the gather) stays whole on every rank, and the gathers at the active tokens that follow it
  read the rank's slice of the index;
- each marked attention runs as diffusers' Ulysses attention does (``heads_to_ranks``, attention, ``rows_to_ranks``)
  with its K/V cache written after the all-to-all: the cache holds this rank's heads of all N image tokens
  (1/P of one process's), written at the whole active list; joint text rows enter the keys once;
- the output merge takes every rank's rows (``gather_rows``) and merges them at the whole active list, so the
  output cache and the returned noise prediction are the same on every rank.
Raises RewriteError for a cache write or merge that it cannot place (fused or float8 K/V writes, an index per frame).
"""

from __future__ import annotations

import torch
import torch.fx

from . import ops, parallel_ops
from .context import PassContext, RewriteError
from .graph_utils import FakeEnv, backward_slice, describe, example_value, is_sdpa

#: The cache writes `cache_attention_kv` inserts before a marked attention; this pass feeds them after the all-to-all.
JOINT_ROWS_WRITES = {ops.update_joint_rows_cache}
PLAIN_WRITES = {ops.update_kv_cache}
MERGES = {ops.merge_output}


def shard_ulysses(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    cp = ctx.context_parallel
    if cp is None:
        return gm
    idx = next(n for n in gm.graph.nodes if n.name == ctx.active_idx)
    with gm.graph.inserting_after(idx):
        local = gm.graph.call_function(parallel_ops.rank_slice, (idx, 1, cp.rank, cp.degree))
    gathered_sizes = _gathered_sizes(gm, ctx, idx)
    full_users, slices = set(), []
    for node in list(gm.graph.nodes):
        if node.meta.get("ras_cp_shard") is not None:
            slices += _shard(gm, node, cp, gathered_sizes)
        elif node.meta.get("ras_cp_gather") is not None:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif is_sdpa(node) and node.meta.get("ras_cp_attention"):
            full_users |= _shard_attention(gm, node, idx, cp)
        elif node.op == "call_function" and node.target in MERGES:
            full_users.add(_shard_merge(gm, node, idx, cp))
    # the gather of the active tokens before a slice takes the whole list; every other use of the index (gathers of
    # tables and tokens the rank works on, the token count) this rank's slice
    before_slices = backward_slice(slices)
    for user in list(idx.users):
        if user is not local and user not in full_users and user not in before_slices:
            user.replace_input_with(idx, local)
    for slot in ctx.kv_slots:  # this rank's heads: [B, H / P, N, D]
        slot.shape = (slot.shape[0], slot.shape[1] // cp.degree, *slot.shape[2:])
        placeholder = next(n for n in gm.graph.nodes if n.name == slot.placeholder)
        value = example_value(placeholder)
        with torch._subclasses.fake_tensor.FakeTensorMode():
            fake = torch.empty(slot.shape, dtype=value.dtype, device=value.device)
        placeholder.meta.update({"ras_val": fake, "example_value": fake, "ras_dense_shape": tuple(slot.shape)})
    ctx.record("shard_ulysses", "cp_sharded", detail=f"rank {cp.rank} of {cp.degree}")
    gm.graph.lint()
    gm.recompile()
    return gm


def _gathered_sizes(gm: torch.fx.GraphModule, ctx: PassContext, idx: torch.fx.Node) -> dict:
    """Each node's shape at two token counts: a dim that follows k holds gathered active tokens."""
    shapes = {}
    for k in (ctx.probe_tokens, ctx.probe_tokens + ctx.context_parallel.degree):
        env = FakeEnv(gm)
        for node in gm.graph.nodes:
            if node is idx:
                with env.mode:
                    env.values[node] = torch.empty(ctx.batch_size, k, dtype=torch.int64)
            else:
                env.evaluate(node)
            if node.meta.get("ras_cp_shard") is not None:
                shapes.setdefault(node, []).append(env.shape(node.args[0]))
    return shapes


def _shard(gm: torch.fx.GraphModule, marker: torch.fx.Node, cp, sizes: dict) -> list:
    """Replace a shard marker; return the slice node it became ([] when it stays whole)."""
    dim = marker.meta["ras_cp_shard"]
    (first, second) = sizes[marker]
    source = marker.args[0]
    if first[dim] != second[dim]:  # the gathered active tokens: this rank's slice of the list
        with gm.graph.inserting_before(marker):
            part = gm.graph.call_function(parallel_ops.rank_slice, (source, dim, cp.rank, cp.degree))
        part.meta.update({k: v for k, v in marker.meta.items() if k in ("nn_module_stack", "stack_trace")})
        marker.replace_all_uses_with(part)
        gm.graph.erase_node(marker)
        return [part]
    marker.replace_all_uses_with(source)  # text, tables, inputs before the gather: whole on every rank
    gm.graph.erase_node(marker)
    return []


def _shard_attention(gm: torch.fx.GraphModule, attention: torch.fx.Node, idx: torch.fx.Node, cp) -> set:
    query, key, value = attention.args[:3]
    group, world = cp.group, cp.degree
    writes = set()
    with gm.graph.inserting_before(attention):
        q = gm.graph.call_function(parallel_ops.heads_to_ranks, (query, group, world))
        kv = [_keys_on_ranks(gm, tensor, idx, cp, writes) for tensor in (key, value)]
    attention.args = (q, *kv, *attention.args[3:])
    with gm.graph.inserting_after(attention):
        back = gm.graph.call_function(parallel_ops.rows_to_ranks, (attention, group, world))
    attention.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
    for node in (q, back):
        node.meta.update({k: v for k, v in attention.meta.items() if k in ("nn_module_stack", "stack_trace")})
    return writes


def _keys_on_ranks(gm, tensor: torch.fx.Node, idx: torch.fx.Node, cp, writes: set) -> torch.fx.Node:
    """The key (or value) of a marked attention after the all-to-all: written into its cache at the whole active
    list when the RAS passes cache it."""
    group, world = cp.group, cp.degree
    if tensor.op != "call_function" or tensor.target not in JOINT_ROWS_WRITES | PLAIN_WRITES:
        if tensor.op == "call_function" and getattr(tensor.target, "__module__", "").endswith("passes.ops"):
            raise RewriteError(f"context parallelism: the cache write {describe(tensor)} is not one RAS shards yet")
        return gm.graph.call_function(parallel_ops.heads_to_ranks, (tensor, group, world))
    cache, fresh, rows, axis, *offset = tensor.args
    if rows is not idx or axis != 2:
        raise RewriteError(f"context parallelism: {describe(tensor)} writes rows other than the active tokens'")
    with gm.graph.inserting_before(tensor):
        fresh_all = gm.graph.call_function(parallel_ops.heads_to_ranks, (fresh, group, world))
        if offset:
            image = gm.graph.call_function(_local_count, (idx, world))
            fresh_all = gm.graph.call_function(parallel_ops.joint_rows, (fresh_all, axis, world, offset[0], image))
            writes.add(image)
    tensor.args = (cache, fresh_all, idx, axis, *offset)
    writes.add(tensor)
    return tensor


def _local_count(idx: torch.Tensor, world: int) -> int:
    return idx.shape[1] // world


def _shard_merge(gm: torch.fx.GraphModule, merge: torch.fx.Node, idx: torch.fx.Node, cp) -> torch.fx.Node:
    cache, fresh, rows = merge.args
    if rows is not idx:
        raise RewriteError(f"context parallelism: {describe(merge)} merges rows other than the active tokens'")
    with gm.graph.inserting_before(merge):
        every = gm.graph.call_function(parallel_ops.gather_rows, (fresh, 1, cp.group, cp.degree))
    merge.args = (cache, every, idx)
    return merge
