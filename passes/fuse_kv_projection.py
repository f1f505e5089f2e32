"""Fuse each K/V projection that feeds a cache write into one ``rascompile::linear_scatter_`` op.

Matches: every cache write that ``cache_attention_kv`` inserted (``update_kv_cache``, or the image
part of ``update_joint_kv_cache``) whose fresh rows come from ``linear(x)`` over the active tokens
through, in this order, an optional q/k norm (``layer_norm``, or diffusers' ``RMSNorm`` ops), an
optional complex RoPE (``view_as_real(view_as_complex(t) * table)`` with the table gathered at the
active tokens) and ops that only split heads, transpose or cast.
Produces: ``ops.fused_kv_update(cache=, x=, weight=, bias=, idx=, ...)`` (every argument by name: the
tensors and an ``ops.KVEpilogue``'s settings), which projects the active
tokens and writes each row straight into its cache slot; the unfused chain becomes dead code. A float8 cache's
write (``update_quantized_kv_cache``, or the image part of ``update_quantized_joint_kv_cache``) becomes
``ops.fused_quantized_kv_update(..., scale=, dtype=)``, which writes the rows quantized and hands attention the
dequantized cache with the step's rows unquantized (a joint write becomes the ``torch.cat`` of the text parts and
that).
Before a chain is replaced, the graph's own chain and the op are run on random inputs at a few
tokens and their caches compared, so a layout or epilogue the parser misread stays unfused (the
reason goes to the log) instead of running wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from . import ops
from .context import PassContext, module_path
from .graph_utils import backward_slice, call_node, describe, example_value, is_linear
from .op_sets import (
    ADD_OPERATOR,
    CASTS,
    HEAD_LAYOUT,
    LAYER_NORM,
    MEAN_METHOD,
    MUL,
    POSITION_TABLE_GATHER,
    POW_METHOD,
    RSQRT,
    VIEW_AS_COMPLEX,
    VIEW_AS_REAL,
    matches,
)

VERIFY_TOKENS = 3


class NoMatch(Exception):
    """The chain in front of a cache write is not one the fused op computes."""


@dataclass
class KVChain:
    """What the fused op needs, as graph nodes and constants, parsed from one projection chain."""

    linear: torch.fx.Node | None = None
    norm: str = "none"
    norm_group: int = -1
    norm_weight: torch.fx.Node | None = None
    norm_bias: torch.fx.Node | None = None
    eps: float = 1e-6
    rope_table: torch.fx.Node | None = None  # complex table over all N tokens, before the gather
    rope_axis: int = 1
    rope_ndim: int = 4

    def describe(self) -> str:
        parts = ["linear"] + ([self.norm] if self.norm != "none" else []) + (["rope"] if self.rope_table else [])
        return " + ".join(parts)


def fuse_kv_projection(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if not ctx.settings.fuse_kv_projection:
        return gm
    if ctx.context_parallel is not None:  # the cache is written after the all-to-all, not by the projection
        ctx.record("fuse_kv_projection", "unfused", detail="context parallelism writes them after the all-to-all")
        return gm
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in WRITES]:
        write = WRITES[node.target](node)
        try:
            chain = parse_chain(write.fresh)
            op_kwargs = fused_op_kwargs(chain, write, write.idx)
            _verify(gm, ctx, chain, write, op_kwargs)
        except NoMatch as exc:
            ctx.record("fuse_kv_projection", "unfused", detail=str(exc), cache=write.cache.name)
            continue
        _replace(gm, write, op_kwargs)
        detail = chain.describe() + (" quantized" if write.scale is not None else "")
        ctx.record("fuse_kv_projection", "fused", module_path(chain.linear), detail, cache=write.cache.name)
    return gm


@dataclass
class CacheWrite:
    """A cache write inserted by cache_attention_kv: ``fresh`` rows go to ``cache`` rows ``idx`` (``idx``: the active
    index, or its rows repeated per frame when frames are folded into the batch)."""

    node: torch.fx.Node
    cache: torch.fx.Node
    fresh: torch.fx.Node
    axis: int
    idx: torch.fx.Node
    scale: torch.fx.Node | None = None  # a float8 cache's scales
    parts: list | None = None  # a joint write's parts, the image part among them
    image_part: int = 0


def _plain_write(node: torch.fx.Node) -> CacheWrite:
    cache, fresh, idx, axis = node.args
    return CacheWrite(node, cache, fresh, axis, idx)


def _joint_write(node: torch.fx.Node) -> CacheWrite:
    cache, parts, idx, axis, image_part = node.args
    return CacheWrite(node, cache, parts[image_part], axis, idx, parts=list(parts), image_part=image_part)


def _quantized_write(node: torch.fx.Node) -> CacheWrite:
    cache, scale, fresh, idx, axis = node.args
    return CacheWrite(node, cache, fresh, axis, idx, scale=scale)


def _quantized_joint_write(node: torch.fx.Node) -> CacheWrite:
    cache, scale, parts, idx, axis, image_part = node.args
    return CacheWrite(node, cache, parts[image_part], axis, idx, scale, list(parts), image_part)


WRITES = {
    ops.update_kv_cache: _plain_write,
    ops.update_joint_kv_cache: _joint_write,
    ops.update_quantized_kv_cache: _quantized_write,
    ops.update_quantized_joint_kv_cache: _quantized_joint_write,
}


# ---------------------------------------------------------------- parsing


def parse_chain(fresh: torch.fx.Node) -> KVChain:
    """Walk back from the tensor written into the cache to the projection that made it."""
    chain = KVChain()
    node = fresh
    while not is_linear(node):
        if not isinstance(node, torch.fx.Node):
            raise NoMatch(f"reached {node!r} before a linear projection")
        if chain.rope_table is None and chain.norm == "none" and (source := _match_complex_rope(node, chain)):
            node = source
        elif chain.norm == "none" and (source := _match_layer_norm(node, chain) or _match_rms_norm(node, chain)):
            node = source
        elif matches(node, HEAD_LAYOUT) or matches(node, CASTS):
            node = node.args[0]
        else:
            raise NoMatch(f"{describe(node)} is not a projection, q/k norm, RoPE or layout op")
    if len(node.args) < 2 or node.kwargs or node.meta.get("ras_token_axis") != 1:
        raise NoMatch(f"{describe(node)} is not a projection of the active tokens [B, k, C]")
    chain.linear = node
    return chain


def _skip_casts(node):
    while matches(node, CASTS):
        node = node.args[0]
    return node


def _match_complex_rope(node: torch.fx.Node, chain: KVChain):
    """``view_as_real(view_as_complex(t) * gather_position_table(table, idx, axis, ndim))`` -> t."""
    if not matches(node, VIEW_AS_REAL):
        return None
    product = node.args[0]
    if not matches(product, MUL) or len(product.args) != 2:
        return None
    for rotated, table in (product.args, reversed(product.args)):
        if matches(rotated, VIEW_AS_COMPLEX) and matches(table, POSITION_TABLE_GATHER):
            chain.rope_table, _, chain.rope_axis, chain.rope_ndim = table.args
            return rotated.args[0]
    raise NoMatch(f"{describe(node)}: a complex product that is not RoPE with a per-token table")


def _match_layer_norm(node: torch.fx.Node, chain: KVChain):
    if not matches(node, LAYER_NORM):
        return None
    bound = dict(zip(("input", "normalized_shape", "weight", "bias", "eps"), node.args)) | dict(node.kwargs)
    shape = bound["normalized_shape"]
    if len(shape) != 1:
        raise NoMatch(f"{describe(node)} normalises over {len(shape)} dims")
    chain.norm, chain.norm_group = "layer_norm", int(shape[0])
    chain.norm_weight, chain.norm_bias = bound.get("weight"), bound.get("bias")
    chain.eps = float(bound.get("eps", 1e-5))
    return bound["input"]


def _match_rms_norm(node: torch.fx.Node, chain: KVChain):
    """diffusers' RMSNorm: ``x * rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)`` [``.to(dtype)``] [``* w``]."""
    weight = None
    if matches(node, MUL) and len(node.args) == 2:
        for h, w in (node.args, reversed(node.args)):
            value = example_value(w) if isinstance(w, torch.fx.Node) else None
            if isinstance(value, torch.Tensor) and value.dim() == 1 and not matches(w, MUL):
                weight, node = w, _skip_casts(h)
                break
    if not (matches(node, MUL) and len(node.args) == 2):
        return None
    x, scale = node.args
    if not matches(scale, RSQRT):
        x, scale = scale, x
    if not matches(scale, RSQRT):
        return None
    shifted = scale.args[0]
    if not (matches(shifted, ADD_OPERATOR) and isinstance(shifted.args[1], float)):
        return None
    mean = shifted.args[0]
    last_dim = tuple(mean.args[1:]) in ((-1,), ([-1],)) and mean.kwargs == {"keepdim": True}
    if not (matches(mean, MEAN_METHOD) and last_dim):
        return None
    square = mean.args[0]
    if not (matches(square, POW_METHOD) and square.args[1] == 2 and _skip_casts(square.args[0]) is _skip_casts(x)):
        return None
    group = example_value(x).shape[-1]
    if weight is not None and example_value(weight).shape[0] != group:
        raise NoMatch(f"{describe(node)}: RMSNorm weight of {example_value(weight).shape[0]} for {group} columns")
    chain.norm, chain.norm_group, chain.norm_weight, chain.eps = "rms_norm", int(group), weight, shifted.args[1]
    return x


# ---------------------------------------------------------------- checking and rewriting


def fused_op_kwargs(chain: KVChain, write: CacheWrite, idx: torch.fx.Node) -> dict:
    """The keyword arguments of ``ops.fused_kv_update`` (graph nodes and constants, by name: the tensors and the
    ``KVEpilogue``'s settings) for ``chain`` writing ``write``."""
    linear = chain.linear
    cache_shape = example_value(write.cache).shape
    if len(cache_shape) == 4:
        head_dim = int(cache_shape[-1])
    elif chain.rope_table is not None:
        head_dim = 2 * int(example_value(chain.rope_table).shape[-1])
    else:
        head_dim = -1
    epilogue = ops.KVEpilogue(
        axis=write.axis,
        head_dim=head_dim,
        norm=chain.norm,
        norm_group=chain.norm_group,
        eps=chain.eps,
        rope_axis=chain.rope_axis,
        rope_ndim=chain.rope_ndim,
    )
    tensors = {
        "cache": write.cache,
        "x": linear.args[0],
        "weight": linear.args[1],
        "bias": linear.args[2] if len(linear.args) > 2 else None,
        "idx": idx,
        "norm_weight": chain.norm_weight,
        "norm_bias": chain.norm_bias,
        "rope_table": chain.rope_table,
    }
    return tensors | epilogue.kwargs()


def _verify(gm, ctx: PassContext, chain: KVChain, write: CacheWrite, op_kwargs: dict) -> None:
    """Run the graph's chain and the op on the same random inputs (on the CPU); their caches must agree."""
    x_node, idx_node = op_kwargs["x"], op_kwargs["idx"]
    needed = backward_slice([write.fresh], stop=x_node)
    generator = torch.Generator().manual_seed(0)
    batch, n = ctx.batch_size if idx_node.name == ctx.active_idx else ctx.token_batch, ctx.num_tokens
    idx = torch.stack([torch.randperm(n, generator=generator)[:VERIFY_TOKENS] for _ in range(batch)])
    weight = example_value(chain.linear.args[1])
    values = {x_node: _random((batch, VERIFY_TOKENS, weight.shape[1]), weight.dtype, generator), idx_node: idx}
    for node in gm.graph.nodes:
        if node not in needed or node in values:
            continue
        if node.op == "placeholder":
            value = example_value(node)
            values[node] = _random(tuple(value.shape), value.dtype, generator)
        else:
            values[node] = _run(gm, node, values)
    fresh = values[write.fresh]
    unfused = torch.zeros(tuple(example_value(write.cache).shape), dtype=torch.float32)
    ops.scatter_rows_(unfused, fresh.float(), idx, write.axis)
    values[write.cache] = fused = torch.zeros_like(unfused)
    try:
        # the plain body: the check runs on CPU tensors whatever device the graph is for
        ops.fused_kv_update_body(**torch.fx.node.map_arg(op_kwargs, lambda node: values[node]))
    except (ValueError, RuntimeError) as exc:
        raise NoMatch(f"the op refuses the chain's tensors: {exc}") from exc
    tolerance = 1e-4 if fresh.dtype == torch.float32 else 3e-2
    error = (fused - unfused).abs().max().item()
    if error > tolerance * max(1.0, unfused.abs().max().item()):
        raise NoMatch(f"the op and the chain {chain.describe()} disagree on random inputs (max error {error:.3g})")


def _random(shape: tuple, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype.is_complex:
        return torch.polar(torch.ones(shape), torch.rand(shape, generator=generator) * 6.2832)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.zeros(shape, dtype=dtype)


def _run(gm: torch.fx.GraphModule, node: torch.fx.Node, values: dict):
    load = lambda a: torch.fx.node.map_arg(a, lambda n: values[n])  # noqa: E731
    args, kwargs = load(node.args), load(node.kwargs)
    if node.op == "get_attr":
        return getattr(gm, node.target).detach().cpu()
    try:
        return call_node(gm, node, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure means the chain is not what the parser took it for
        raise NoMatch(f"{describe(node)} fails on the check's inputs: {exc}") from exc


def _replace(gm: torch.fx.GraphModule, write: CacheWrite, op_kwargs: dict) -> None:
    if write.scale is not None:
        op_kwargs = op_kwargs | {"scale": write.scale, "dtype": example_value(write.fresh).dtype}
    target = ops.fused_kv_update if write.scale is None else ops.fused_quantized_kv_update
    with gm.graph.inserting_before(write.node):
        fused = gm.graph.call_function(target, (), op_kwargs)
    # a joint write's fused node is the image part alone: not the write's (dense) shape
    _copy_meta(write.node, fused, dense_shape=write.scale is None or write.parts is None)
    fused.meta["ras_impure"] = True
    if write.scale is not None and write.parts is not None:  # the text parts joined with the image part's tensor
        parts = [fused if i == write.image_part else part for i, part in enumerate(write.parts)]
        with gm.graph.inserting_before(write.node):
            joined = gm.graph.call_function(torch.cat, (parts,), {"dim": write.axis})
        _copy_meta(write.node, joined)
        write.node.replace_all_uses_with(joined)
        gm.graph.erase_node(write.node)
        return
    if write.parts is None:
        write.node.replace_all_uses_with(fused)
        gm.graph.erase_node(write.node)
        return
    _, parts, *rest = write.node.args  # the joint write still joins the text parts with the cache
    parts = [None if part is write.fresh else part for part in parts]
    write.node.args = (fused, parts, *rest)


def _copy_meta(source: torch.fx.Node, node: torch.fx.Node, dense_shape: bool = True) -> None:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack") + (("ras_dense_shape",) if dense_shape else ()):
        if key in source.meta:
            node.meta[key] = source.meta[key]
    node.meta["ras_managed"] = True
