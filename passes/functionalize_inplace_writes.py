"""The in-place-write rule: writes into token tensors become out-of-place ops the other passes can follow.

Matches: in the forward slice of the latents, ``t[index] = value`` (``operator.setitem``: RoPE written
into ``q[:, :, L:]`` by CogView4, into the halves of an ``empty_like`` buffer by Wan) and in-place methods
``t.op_(...)`` that have an out-of-place twin ``t.op(...)``.
Produces: ``t2 = setitem_copy(t, index, value)`` (or ``t2 = t.op(...)``), with every later use of ``t`` (and of
the in-place op's result) reading ``t2``. Values are unchanged; the token axis, offsets and literals of the
written tensor are then followed like any other op's.
Refuses (RewriteError) a write when another tensor that shares ``t``'s storage is read after it, or when ``t``
belongs to a graph input or constant: the out-of-place form would not show those readers the write, and left
in place, a K/V cache filled before it would miss it.
"""

from __future__ import annotations

import torch
import torch.fx

from . import ops
from .context import PassContext, RewriteError
from .graph_utils import describe, forward_slice
from .op_sets import INPLACE_METHODS, INPLACE_METHODS_WITH_TWIN, SETITEM, VIEWS, matches

#: The writes this pass rewrites: ``t[index] = value`` and in-place methods with an out-of-place twin.
REWRITABLE_WRITES = SETITEM | INPLACE_METHODS_WITH_TWIN
#: Ops whose result may share storage with their first argument: views, and in-place methods (they return it).
ALIASING = VIEWS | INPLACE_METHODS


def functionalize_inplace_writes(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    nodes = {n.name: n for n in gm.graph.nodes}
    # from the latents, not the token source: an in-place op may be the token source, and its result unused
    region = forward_slice([nodes[ctx.latents]])
    for node in [n for n in gm.graph.nodes if n in region and _is_write(n)]:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        target = node.args[0]
        if not isinstance(target, torch.fx.Node):
            continue
        reader = _later_reader(node, target, order)
        if reader is not None:
            raise RewriteError(
                f"{node.name} ({describe(node)}): in-place {_write_name(node)} into storage that {reader} reads "
                "afterwards; it cannot be made out-of-place, and the K/V caches would miss it"
            )
        ctx.record("functionalize_inplace_writes", "inplace_write", describe(node), _write_name(node))
        copy = _rewrite(gm, node, target, order)
        if ctx.token_source in (node.name, target.name):  # the tokens are the written tensor
            ctx.token_source = copy.name
    return gm


def _is_write(node: torch.fx.Node) -> bool:
    return matches(node, REWRITABLE_WRITES)


def _write_name(node: torch.fx.Node) -> str:
    return "setitem" if node.op == "call_function" else node.target


def _base(node: torch.fx.Node) -> torch.fx.Node:
    """The node whose storage ``node`` may share (itself unless it comes from a chain of view ops)."""
    while _is_view(node) and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node


def _is_view(node: torch.fx.Node) -> bool:
    return matches(node, ALIASING)


def _aliases(base: torch.fx.Node) -> set[torch.fx.Node]:
    """``base`` and every node reached from it through view ops."""
    found, stack = set(), [base]
    while stack:
        node = stack.pop()
        if node in found:
            continue
        found.add(node)
        stack.extend(u for u in node.users if _is_view(u) and u.args and u.args[0] is node)
    return found


def _later_reader(write: torch.fx.Node, target: torch.fx.Node, order: dict) -> str | None:
    """Who would miss the write if it went to a copy: another alias of ``target``'s storage read after it, or
    the graph input or constant the storage belongs to. None when the write can be made out-of-place."""
    base = _base(target)
    if base.op in ("placeholder", "get_attr"):
        return f"{base.name} (a graph input or constant)"
    for alias in _aliases(base):
        if alias is target or alias is write:
            continue
        if order[alias] > order[write]:
            if not _derived_from(alias, target):  # a view taken later of the storage, not through ``target``
                return f"{alias.name} ({describe(alias)})"
        elif any(order[user] > order[write] for user in alias.users):
            return f"{alias.name} ({describe(alias)})"
    return None


def _derived_from(view: torch.fx.Node, target: torch.fx.Node) -> bool:
    """Whether ``view`` is a chain of view ops over ``target`` (it will read the written copy)."""
    while view is not target:
        if not (_is_view(view) and isinstance(view.args[0], torch.fx.Node)):
            return False
        view = view.args[0]
    return True


def _rewrite(gm: torch.fx.GraphModule, write: torch.fx.Node, target: torch.fx.Node, order: dict) -> torch.fx.Node:
    later = [u for u in list(target.users) if u is not write and order[u] > order[write]]
    with gm.graph.inserting_before(write):
        if write.op == "call_function":
            copy = gm.graph.call_function(ops.setitem_copy, tuple(write.args), dict(write.kwargs))
        else:
            copy = gm.graph.call_method(write.target[:-1], tuple(write.args), dict(write.kwargs))
    copy.meta.update({k: v for k, v in write.meta.items() if k in ("nn_module_stack", "stack_trace")})
    for key in ("ras_dense_shape", "example_value", "val"):
        if key in target.meta:
            copy.meta[key] = target.meta[key]
    for user in later:
        user.replace_input_with(target, copy)
    write.replace_all_uses_with(copy)
    gm.graph.erase_node(write)
    return copy
