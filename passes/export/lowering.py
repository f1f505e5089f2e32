"""Make a dense or RAS step graph exportable: constants inlined, no custom ops, no complex numbers.

Matches: the graph's constant inputs (the model's parameters and buffers, and complex-valued
inputs such as Lumina-Next's RoPE table, which ONNX runtimes cannot take), the calls into
``ops`` (whose custom ops exporters do not know), and complex RoPE
``view_as_real(view_as_complex(x) * table)``.
Produces: the constants as module attributes (``get_attr``); everything computed from complex
constants alone folded into new constants; ``portable_ops`` in place of ``ops``; complex tables as
real (cos, sin) pairs and the complex product as ``portable_ops.rope_real``. Raises ExportError
when a complex value is left.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx

from .. import ops
from ..graph_utils import call_node, describe
from ..op_sets import COMPLEX_VIEWS, POSITION_TABLE_GATHER, VIEW_AS_COMPLEX, VIEW_AS_REAL, matches, op_set
from . import portable_ops

PORTABLE = {
    ops.update_kv_cache: portable_ops.update_kv_cache,
    ops.update_joint_kv_cache: portable_ops.update_joint_kv_cache,
    ops.update_joint_rows_cache: portable_ops.update_joint_rows_cache,
    ops.merge_output: portable_ops.merge_output,
    ops.fused_kv_update: portable_ops.fused_kv_update,
}


PORTABLE_FUSED_KV = op_set({portable_ops.fused_kv_update})


class ExportError(Exception):
    """The graph cannot be exported; the message says what is in the way."""


@dataclass
class ExportLowering:
    """The constant inputs of one graph, by placeholder name."""

    constants: dict[str, torch.Tensor]


def lower_for_export(gm: torch.fx.GraphModule, ctx: ExportLowering) -> torch.fx.GraphModule:
    graph = gm.graph
    values: dict[torch.fx.Node, torch.Tensor] = {}
    for node in [n for n in graph.nodes if n.op == "placeholder" and n.name in ctx.constants]:
        values[node] = ctx.constants[node.name]
        _replace_with_constant(gm, node, values[node])
    _fold_complex(gm, values)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in PORTABLE:
            node.target = PORTABLE[node.target]
    _real_rope(gm, values)
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or n.meta.get("ras_impure", False))
    for node in graph.nodes:
        value = values.get(node)
        if matches(node, COMPLEX_VIEWS):
            raise ExportError(f"{describe(node)} is complex arithmetic other than RoPE; ONNX cannot express it")
        if value is not None and value.is_complex() and node.users:
            raise ExportError(f"complex constant {node.name} is used by {', '.join(map(describe, node.users))}")
    graph.lint()
    gm.recompile()
    return gm


def _attr_name(gm: torch.fx.GraphModule, name: str) -> str:
    base = re.sub(r"\W", "_", name)
    candidate, i = base, 0
    while hasattr(gm, candidate):
        i += 1
        candidate = f"{base}_{i}"
    return candidate


def _replace_with_constant(gm: torch.fx.GraphModule, node: torch.fx.Node, value: torch.Tensor) -> torch.fx.Node:
    name = _attr_name(gm, f"const_{node.name}")
    gm.register_buffer(name, value.detach())
    with gm.graph.inserting_before(node):
        attr = gm.graph.get_attr(name)
    attr.meta = dict(node.meta)
    node.replace_all_uses_with(attr)
    gm.graph.erase_node(node)
    return attr


def _fold_complex(gm: torch.fx.GraphModule, values: dict) -> None:
    """Evaluate every node computed from constants alone, at least one of them complex, into a constant."""
    complex_derived: set[torch.fx.Node] = {n for n in gm.graph.nodes if n.op == "get_attr" and _is_complex(gm, n)}
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            values.setdefault(node, getattr(gm, node.target))
            continue
        inputs = node.all_input_nodes
        if node.op not in ("call_function", "call_method") or not inputs:
            continue
        if not all(i in values for i in inputs) or not any(i in complex_derived for i in inputs):
            continue
        if node.op == "call_function" and node.target in PORTABLE or node.meta.get("ras_impure"):
            continue
        load = lambda a: torch.fx.node.map_arg(a, lambda n: values[n])  # noqa: E731
        args, kwargs = load(node.args), load(node.kwargs)
        value = call_node(gm, node, args, kwargs)
        if not isinstance(value, torch.Tensor):
            continue
        attr = _replace_with_constant(gm, node, value.contiguous())
        values[attr] = getattr(gm, attr.target)
        complex_derived.add(attr)


def _is_complex(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    value = getattr(gm, node.target, None)
    return isinstance(value, torch.Tensor) and value.is_complex()


def _real_constant(gm: torch.fx.GraphModule, node: torch.fx.Node, values: dict) -> torch.fx.Node:
    """A constant holding the complex constant ``node`` as real pairs [..., 2]."""
    name = _attr_name(gm, f"{node.target}_real")
    gm.register_buffer(name, torch.view_as_real(getattr(gm, node.target)).contiguous())
    with gm.graph.inserting_after(node):
        attr = gm.graph.get_attr(name)
    values[attr] = getattr(gm, name)
    return attr


def _real_table(gm: torch.fx.GraphModule, table, values: dict):
    """The real-pair form of a RoPE table operand: a complex constant, or such a constant gathered per token."""
    if isinstance(table, torch.fx.Node) and table.op == "get_attr" and _is_complex(gm, table):
        return _real_constant(gm, table, values)
    if matches(table, POSITION_TABLE_GATHER):
        source, idx, axis, ndim = table.args
        if isinstance(source, torch.fx.Node) and source.op == "get_attr" and _is_complex(gm, source):
            real = _real_constant(gm, source, values)
            with gm.graph.inserting_before(table):
                return gm.graph.call_function(ops.gather_position_table, (real, idx, axis, ndim + 1))
    return None


def _real_rope(gm: torch.fx.GraphModule, values: dict) -> None:
    for node in list(gm.graph.nodes):
        if matches(node, PORTABLE_FUSED_KV) and node.kwargs.get("rope_table") is not None:
            real = _real_table(gm, node.kwargs["rope_table"], values)
            if real is None:
                raise ExportError(f"{describe(node)}: its RoPE table is not a constant")
            node.update_kwarg("rope_table", real)
        if not matches(node, VIEW_AS_REAL):
            continue
        product = node.args[0]
        if not (isinstance(product, torch.fx.Node) and product.op == "call_function" and len(product.args) == 2):
            continue
        for rotated, table in (product.args, tuple(reversed(product.args))):
            if matches(rotated, VIEW_AS_COMPLEX):
                real = _real_table(gm, table, values)
                if real is not None:
                    with gm.graph.inserting_before(node):
                        rope = gm.graph.call_function(portable_ops.rope_real, (rotated.args[0], real))
                    rope.meta = dict(node.meta)
                    node.replace_all_uses_with(rope)
                    break
