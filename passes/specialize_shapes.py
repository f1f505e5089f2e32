"""Turn a graph that Dynamo traced with symbolic sizes into a static graph for concrete inputs.

Matches: graphs whose placeholders carry SymInts (Dynamo traces that way after a model is
called at a second resolution, unless compiled with ``dynamic=False``).
Produces: a copy where every size expression (SymInt placeholders and the integer arithmetic
on them) is replaced by its value for ``example_inputs``, and every node's ``example_value``
is a fake tensor with concrete sizes, so the RAS passes see the graph exactly as a static
trace at that resolution. The SymInt placeholders stay (unused) so the calling convention
does not change.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.node import map_arg

from .context import RewriteError
from .graph_utils import FakeEnv, copy_graph_module


def has_symbolic_shapes(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt):
            return True
        if isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
            return True
    return False


def specialize_shapes(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
    gm = copy_graph_module(gm)
    env = FakeEnv(gm)
    nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(nodes) != len(example_inputs):
        raise RewriteError(f"graph has {len(nodes)} inputs, call has {len(example_inputs)}")
    for node, value in zip(nodes, example_inputs):
        env.values[node] = int(value) if isinstance(value, (int, torch.SymInt)) else env.fake_like(value)
    constants: dict[torch.fx.Node, object] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            value = env.values[node]
        elif node.op == "output":
            continue
        else:
            value = env.evaluate(node)
        if isinstance(value, (bool, int, float)):
            constants[node] = value
        node.meta["example_value"] = value
        node.meta.pop("ras_dense_shape", None)
        node.meta.pop("val", None)
    for node in gm.graph.nodes:
        if node not in constants:
            node.args = map_arg(node.args, lambda n: constants.get(n, n))
            node.kwargs = map_arg(node.kwargs, lambda n: constants.get(n, n))
    for node in reversed(list(gm.graph.nodes)):
        if node in constants and node.op != "placeholder" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm
