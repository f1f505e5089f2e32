"""A float read out of a one-element tensor (``.item()``) that only scales tensors becomes that tensor, 0-d.

Matches: ``s.item()`` (``call_method item``, or ``aten._local_scalar_dense``) where ``s`` holds one floating value,
and every user is ``*``, ``/``, ``+`` or ``-`` (``operator`` or ``torch.mul``/``torch.add``) with a floating tensor
of at least one dimension on the other side. Dynamo passes a Python float that changed between calls as such a
one-element tensor input and reads it back with ``.item()``: peft's LoRA scale after ``set_adapters`` is the case
users meet. The read is a data-dependent value that shape propagation cannot follow and an inner compile outside
Dynamo's call cannot trace.
Produces: ``x * s.reshape(())`` in place of ``x * s.item()``. A 0-d tensor, like a Python float, takes part in
type promotion as a scalar (``x`` keeps its dtype) and is cast to ``x``'s compute type, so the result is the same;
the scale stays a graph input, so one graph serves every value.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from .context import PassContext
from .graph_utils import describe, example_value

ARITHMETIC = {operator.mul, operator.truediv, operator.add, operator.sub, torch.mul, torch.add, torch.sub, torch.div}


def tensorify_scalar_reads(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    changed = False
    for node in list(gm.graph.nodes):
        if not _is_float_read(node) or not all(_scales_a_tensor(user, node) for user in node.users):
            continue
        with gm.graph.inserting_after(node):
            scalar = gm.graph.call_method("reshape", (node.args[0], ()))
        scalar.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        node.replace_all_uses_with(scalar)
        ctx.record("tensorify_scalar_reads", "scalar_read", describe(node), "")
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def has_scalar_reads(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` reads a float out of a one-element tensor (what this pass may rewrite)."""
    return any(_is_float_read(node) for node in gm.graph.nodes)


def _is_float_read(node: torch.fx.Node) -> bool:
    reads = (node.op == "call_method" and node.target == "item") or (
        node.op == "call_function" and node.target is torch.ops.aten._local_scalar_dense.default
    )
    if not reads or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    value = example_value(node.args[0])
    return isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()


def _scales_a_tensor(user: torch.fx.Node, read: torch.fx.Node) -> bool:
    if user.op != "call_function" or user.target not in ARITHMETIC or user.kwargs or len(user.args) != 2:
        return False
    others = [a for a in user.args if a is not read]
    if len(others) != 1 or not isinstance(others[0], torch.fx.Node):
        return False
    value = example_value(others[0])
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.is_floating_point()
