"""Undo diffusers' Ulysses context parallelism in a rank's graph, so the RAS passes see the whole model.

Matches, in a graph Dynamo traced from a transformer with ``enable_parallelism(ContextParallelConfig(
ulysses_degree=P))`` (the ``_cp_plan`` hooks and ``TemplatedUlyssesAttention`` are traced into it):
- the shards the plan cuts: ``x.chunk(P, dim)[rank]`` (diffusers' ``EquipartitionSharder.shard``);
- each Ulysses attention: local q, k, v [B, S/P, H, D] -> all-to-all -> [B, S, H/P, D] -> attention -> all-to-all
  back to [B, S/P, H, D];
- the gather of the output: ``all_gather_into_tensor`` -> ``wait_tensor`` -> ``chunk`` -> ``cat``.
Produces: the graph of one process over all tokens: each shard and each gather becomes a ``contiguous()`` marked
``meta['ras_cp_shard']`` / ``meta['ras_cp_gather']`` (its dim), each Ulysses attention a plain
``scaled_dot_product_attention`` over the whole sequence and all heads marked ``meta['ras_cp_attention']``, and
every node's example value recomputed for the full inputs. ``ctx.context_parallel`` records the degree, the rank
and the process group; ``shard_ulysses`` puts the parallelism back after the RAS passes, around the active tokens.
Raises RewriteError for what it does not know: ring attention, an attention mask gathered across ranks, a shard or
a collective it cannot place, a size of one rank's shard baked into the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from .context import PassContext, RewriteError
from .graph_utils import FakeEnv, cat_arguments, describe, example_value, is_sdpa, shape_of

C10D = torch.ops._c10d_functional
# Dynamo records the overload packets; other tracers the default overloads.
ALL_TO_ALL = (C10D.all_to_all_single, C10D.all_to_all_single.default)
ALL_GATHER = (C10D.all_gather_into_tensor, C10D.all_gather_into_tensor.default)
WAIT = (C10D.wait_tensor, C10D.wait_tensor.default)
LAYOUT_METHODS = {"reshape", "view", "permute", "contiguous", "flatten", "transpose"}


@dataclass(frozen=True)
class ContextParallel:
    """A graph's Ulysses context parallelism: its degree, this rank, the process group's name."""

    degree: int
    rank: int
    group: str


def is_collective(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (*ALL_TO_ALL, *ALL_GATHER, *WAIT)


def has_collectives(gm: torch.fx.GraphModule) -> bool:
    return any(is_collective(n) for n in gm.graph.nodes)


def unshard_ulysses(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if not has_collectives(gm):
        return gm
    degree, group = _degree_and_group(gm)
    rank = None
    sharded: dict[int, int] = {}  # the shards' sizes along their dim -> the whole's
    for getter, source, dim in _shards(gm, degree):
        rank = _same(rank, getter.args[1], "the shards' rank")
        sharded[example_value(getter).shape[dim]] = example_value(source).shape[dim]
        _mark(gm, getter, source, "ras_cp_shard", dim)
    if rank is None:
        raise RewriteError("context parallelism: no shard of diffusers' context-parallel plan found in the graph")
    attentions = [n for n in gm.graph.nodes if is_sdpa(n) and _upstream_collective(n)]
    for attention in attentions:
        _unshard_attention(gm, attention)
    for gather in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ALL_GATHER]:
        _unshard_gather(gm, gather, degree)
    # collectives count as side effects; the replaced ones have no users left
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() and not is_collective(n))
    left = [describe(n) for n in gm.graph.nodes if is_collective(n)]
    if left:
        raise RewriteError(f"context parallelism: collectives left that RAS cannot place: {', '.join(left[:3])}")
    _propagate_full_shapes(gm, sharded)
    gm.recompile()
    ctx.context_parallel = ContextParallel(degree, int(rank), group)
    ctx.record("unshard_ulysses", "cp_unsharded", detail=f"Ulysses degree {degree}, rank {rank}, {len(attentions)}")
    return gm


def _same(seen, value, what: str):
    if seen is not None and seen != value:
        raise RewriteError(f"context parallelism: {what} differs within the graph ({seen} and {value})")
    return value


def collective_degree_and_group(node: torch.fx.Node) -> tuple[int, str] | None:
    """``(degree, process group name)`` of a functional all-to-all or all-gather node; None for any other node."""
    if node.op == "call_function" and node.target in ALL_TO_ALL:
        return len(node.args[1]), node.args[3]
    if node.op == "call_function" and node.target in ALL_GATHER:
        return node.args[1], node.args[2]
    return None


def _degree_and_group(gm: torch.fx.GraphModule) -> tuple[int, str]:
    degree = group = None
    for node in gm.graph.nodes:
        found = collective_degree_and_group(node)
        if found is not None:
            degree = _same(degree, found[0], "the collectives' degree")
            group = _same(group, found[1], "the process group")
    if degree is None or degree < 2:
        raise RewriteError("context parallelism: the graph's collectives are not diffusers' Ulysses attention")
    return degree, group


def _shards(gm: torch.fx.GraphModule, degree: int):
    """``(getitem, source, dim)`` for each ``source.chunk(degree, dim)[rank]`` that diffusers' sharder traced."""
    for node in list(gm.graph.nodes):
        is_getitem = node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem"
        chunk = node.args[0] if is_getitem else None
        if not isinstance(chunk, torch.fx.Node) or not _traced_in(chunk, "context_parallel.py", "shard"):
            continue
        if chunk.meta.get("ras_cp_shard") is not None:
            continue  # an index into a shard marked already
        if chunk.target not in ("chunk", torch.chunk) or len(chunk.args) < 2 or chunk.args[1] != degree:
            raise RewriteError(f"context parallelism: a shard of the plan is {describe(chunk)}, not a chunk")
        dim = chunk.kwargs.get("dim", chunk.args[2] if len(chunk.args) > 2 else 0)
        yield node, chunk.args[0], dim


def _traced_in(node: torch.fx.Node, filename: str, function: str) -> bool:
    """The innermost frame of ``node``'s stack trace is ``function`` in a file named ``filename``."""
    frames = [line.strip() for line in node.meta.get("stack_trace", "").splitlines() if line.strip().startswith("File")]
    return bool(frames) and f'{filename}"' in frames[-1] and frames[-1].endswith(f"in {function}")


def _mark(gm, node: torch.fx.Node, source: torch.fx.Node, key: str, dim: int) -> None:
    with gm.graph.inserting_before(node):
        marker = gm.graph.call_method("contiguous", (source,))
    marker.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    marker.meta[key] = dim
    node.replace_all_uses_with(marker)


def _upstream_collective(node: torch.fx.Node) -> bool:
    return any(_through_layout(a, upstream=True)[1] for a in node.all_input_nodes)


def _through_layout(node: torch.fx.Node, upstream: bool, end_shape: tuple | None = None) -> tuple[torch.fx.Node, bool]:
    """Walk a chain of layout ops and collectives from ``node``; return where it ends and whether it crossed an
    all-to-all. Upstream it ends at the tensor diffusers' Ulysses attention was handed (the input of the reshape
    into [B, S/P, P, H/P, D]); downstream at the last node of its [B, S/P, H, D] output."""
    crossed = False
    while True:
        if upstream:
            if node.op == "call_function" and node.target in ALL_TO_ALL:
                crossed = True
            elif not (node.op == "call_method" and node.target in LAYOUT_METHODS) and not is_collective(node):
                return node, crossed
            source = node.args[0]
            if crossed and node.target == "reshape" and len(example_value(node).shape) == 5:
                return source, crossed
            node = source
        else:
            users = list(node.users)
            if len(users) != 1:
                return node, crossed
            user = users[0]
            if not (is_collective(user) or (user.op == "call_method" and user.target in LAYOUT_METHODS)):
                return node, crossed
            if crossed and shape_of(example_value(node)) == end_shape and shape_of(example_value(user)) != end_shape:
                return node, crossed  # past the [B, S/P, H, D] output: the processor's own code
            crossed = crossed or user.target in ALL_TO_ALL
            node = user


def _unshard_attention(gm: torch.fx.GraphModule, attention: torch.fx.Node) -> None:
    args = dict(zip(("query", "key", "value"), attention.args)) | dict(attention.kwargs)
    if args.get("attn_mask") is not None:
        args["attn_mask"] = _unshard_mask(gm, attention, args["attn_mask"])
    entries = {}
    for name in ("query", "key", "value"):
        entry, crossed = _through_layout(args[name], upstream=True)
        if not crossed or len(example_value(entry).shape) != 4:
            raise RewriteError(f"context parallelism: {describe(attention)}'s {name} is not a Ulysses all-to-all")
        entries[name] = entry
    out, crossed = _through_layout(attention, upstream=False, end_shape=shape_of(example_value(entries["query"])))
    if not crossed:
        raise RewriteError(f"context parallelism: {describe(attention)}'s output is not a Ulysses all-to-all")
    rest = {k: v for k, v in args.items() if k not in ("query", "key", "value")}
    with gm.graph.inserting_before(attention):
        q, k, v = (gm.graph.call_method("permute", (entries[n], 0, 2, 1, 3)) for n in ("query", "key", "value"))
        whole = gm.graph.call_function(attention.target, (q, k, v), rest)
        back = gm.graph.call_method("permute", (whole, 0, 2, 1, 3))
    for node in (q, k, v, whole, back):
        node.meta.update(
            {key: attention.meta[key] for key in ("nn_module_stack", "stack_trace") if key in attention.meta}
        )
    if shape_of(example_value(out)) != shape_of(example_value(entries["query"])):
        raise RewriteError(f"context parallelism: {describe(attention)}'s output is not laid out as its query")
    whole.meta["ras_cp_attention"] = True
    with gm.graph.inserting_after(back):
        contiguous = gm.graph.call_method("contiguous", (back,))
    contiguous.meta.update(back.meta)
    out.replace_all_uses_with(contiguous)


def _unshard_mask(gm: torch.fx.GraphModule, attention: torch.fx.Node, mask: torch.fx.Node) -> torch.fx.Node:
    """The key mask of one rank's rows, which diffusers' Ulysses attention all-gathers (``dist.all_gather`` into
    a list, then ``cat`` along the keys): traced as ``all_gather_into_tensor``, slices copied into empty tensors,
    ``cat``. Returns the mask before the gather (over all keys once the graph is unsharded) and removes the gather."""
    parts, _ = cat_arguments(mask) if mask.op == "call_function" and mask.target is torch.cat else (None, None)
    copies = [next((u for u in p.users if u.target == "copy_"), None) for p in parts or ()]
    sliced = [c.args[1] for c in copies if c is not None]
    waits = {s.args[0] for s in sliced if s.op == "call_function" and getattr(s.target, "__name__", "") == "getitem"}
    wait = waits.pop() if len(waits) == 1 and len(sliced) == len(parts or ()) else None
    gather = wait.args[0] if wait is not None and wait.target in WAIT else None
    value = example_value(mask)
    if gather is None or gather.target not in ALL_GATHER or value.dim() != 4 or value.shape[2] != 1:
        raise RewriteError(f"context parallelism: {describe(attention)} takes a mask RAS cannot place under it")
    local = gather.args[0]
    attention.replace_input_with(mask, local)
    for node in (*copies, mask, *sliced, wait, gather, *parts):
        if node in gm.graph.nodes and not node.users:
            gm.graph.erase_node(node)
    return local


def _unshard_gather(gm: torch.fx.GraphModule, gather: torch.fx.Node, degree: int) -> None:
    """``cat(chunk(wait(all_gather_into_tensor(x, P)), P, 0), dim)`` -> ``x`` marked ``ras_cp_gather = dim``."""
    wait = next(iter(gather.users), None)
    chunk = next(iter(wait.users), None) if wait is not None and wait.target in WAIT else None
    items = list(chunk.users) if chunk is not None and chunk.target is torch.chunk else []
    cats = {next(iter(item.users), None) for item in items}
    cat = cats.pop() if len(cats) == 1 and len(items) == degree else None
    if cat is not None and cat.target is torch.cat:
        _mark(gm, cat, gather.args[0], "ras_cp_gather", cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0))
        return
    # with one row in the batch, torch's gather along dim d views the gathered [P, ...] as [1, ..., P * n, ...]
    view = next(iter(wait.users), None) if wait is not None and len(wait.users) == 1 else None
    local, joined = shape_of(example_value(gather.args[0])), shape_of(example_value(view)) if view else None
    grown = [d for d, (a, b) in enumerate(zip(local or (), joined or ())) if a != b]
    if view is None or view.target not in ("view", "reshape") or len(grown) != 1 or local[0] != 1:
        raise RewriteError(f"context parallelism: an all-gather ({describe(gather)}) that is not the output's gather")
    if joined[grown[0]] != degree * local[grown[0]] or len(local) != len(joined):
        raise RewriteError(f"context parallelism: an all-gather ({describe(gather)}) that is not the output's gather")
    _mark(gm, view, gather.args[0], "ras_cp_gather", grown[0])


def _propagate_full_shapes(gm: torch.fx.GraphModule, sharded: dict[int, int]) -> None:
    """Recompute every node's value for the full inputs. Sizes of the rank's shard that Dynamo baked into shape
    arguments (``x.reshape(*x.shape[:-1], -1, 2)`` traced with static shapes, ``torch.ones((B, n))`` of a shard's
    length ``n``) become the full sizes."""
    local = {node: shape_of(example_value(node)) for node in gm.graph.nodes}
    env = FakeEnv(gm)
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target in SHAPED_METHODS:
            _unshard_sizes(node, local, env)
        elif node.op == "call_function" and node.target in FACTORIES and node.args:
            size = node.args[0]
            if isinstance(size, (tuple, list)) and any(isinstance(v, int) and v in sharded for v in size):
                node.args = (type(size)(sharded.get(v, v) for v in size), *node.args[1:])
        elif _cuts_along(node):
            _unshard_cuts(node, local, env)
        try:
            value = env.evaluate(node)
        except RewriteError as exc:
            raise RewriteError(
                f"context parallelism: the graph does not run over all tokens in one process ({exc}); "
                "a size of one rank's shard is baked into it"
            ) from exc
        if node.op not in ("placeholder", "output"):
            node.meta["example_value"] = value
            node.meta["val"] = value
            node.meta.pop("ras_val", None)
        node.meta["ras_dense_shape"] = shape_of(value)


SHAPED_METHODS = {"reshape", "view", "expand"}
FACTORIES = {torch.ones, torch.zeros, torch.empty, torch.full}


def _unshard_sizes(node: torch.fx.Node, local: dict, env: FakeEnv) -> None:
    """Replace, in ``node``'s size arguments, each size of its input that differs between the shard and the whole
    (the sequence length) by the whole's."""
    source = node.args[0]
    before, now = local.get(source), env.shape(source) if source in env.values else None
    if not isinstance(before, tuple) or not isinstance(now, tuple) or len(before) != len(now):
        return
    changed: dict[int, int] = {}
    for shard, whole in zip(before, now):
        if shard != whole:
            if changed.get(shard, whole) != whole:
                raise RewriteError(f"context parallelism: {describe(node)} has sizes of the shard that are ambiguous")
            changed[shard] = whole
    if not changed:
        return

    def fix(arg):
        if isinstance(arg, (tuple, list)):
            return type(arg)(fix(a) for a in arg)
        return changed.get(arg, arg) if isinstance(arg, int) and not isinstance(arg, bool) else arg

    node.args = (source, *fix(tuple(node.args[1:])))


SPLITS = {"split", "split_with_sizes", torch.split, torch.functional.split}


def _cuts_along(node: torch.fx.Node) -> bool:
    """A split, a narrow or a slicing ``getitem``: positions along a dim."""
    if node.op == "call_method":
        return node.target in SPLITS or node.target == "narrow"
    if node.op != "call_function":
        return False
    return node.target in SPLITS or (
        getattr(node.target, "__name__", "") == "getitem" and isinstance(node.args[1], (slice, tuple))
    )


def _scale(before: tuple, now: tuple) -> dict[int, int]:
    """The dims (as non-negative indices) that are ``factor`` times longer in the whole than in the shard."""
    return {d: w // b for d, (b, w) in enumerate(zip(before, now)) if b != w and b and w % b == 0}


def _unshard_cuts(node: torch.fx.Node, local: dict, env: FakeEnv) -> None:
    """Scale the positions a split, narrow or slice cuts at along a dim that the shard holds 1/P of: each part of
    a sharded sequence (text, image) is split evenly, so every boundary moves to P times its position."""
    source = node.args[0]
    before, now = local.get(source), env.shape(source) if source in env.values else None
    if not isinstance(before, tuple) or not isinstance(now, tuple) or len(before) != len(now):
        return
    scaled = _scale(before, now)
    if not scaled:
        return
    times = lambda v, f: v * f if isinstance(v, int) and not isinstance(v, bool) else v  # noqa: E731
    if getattr(node.target, "__name__", "") == "getitem":
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(i is Ellipsis for i in index):
            return
        cut = tuple(
            slice(times(i.start, scaled[d]), times(i.stop, scaled[d]), i.step) if isinstance(i, slice) and d in scaled
            else i
            for d, i in enumerate(index)
        )  # fmt: skip
        node.args = (source, cut if isinstance(node.args[1], tuple) else cut[0])
        return
    bound = dict(zip(("sizes", "dim"), node.args[1:])) | dict(node.kwargs)
    if node.target == "narrow":
        dim, start, length = node.args[1:4]
        factor = scaled.get(dim % len(now))
        if factor:
            node.args = (source, dim, start * factor, length * factor)
        return
    sizes = bound.get("sizes", bound.get("split_size_or_sections", bound.get("split_size")))
    dim = bound.get("dim", 0) % len(now)
    if dim in scaled and isinstance(sizes, (list, tuple)):
        node.args = (source, type(sizes)(times(v, scaled[dim]) for v in sizes), *node.args[2:])
