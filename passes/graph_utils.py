"""Small helpers shared by the passes: fake-tensor propagation, shapes, node insertion."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.node import map_aggregate

from .context import RewriteError, module_path
from .op_sets import ELEMENTWISE, LINEAR, SDPA, WRITES, matches


def example_value(node: torch.fx.Node) -> Any:
    """The value Dynamo (or a pass) recorded for ``node``: a tensor, a tuple of them, or a python value."""
    if "ras_val" in node.meta:
        return node.meta["ras_val"]
    if "example_value" in node.meta:
        return node.meta["example_value"]
    return node.meta.get("val")


def shape_of(value: Any) -> Any:
    """Shapes of a value as nested tuples (tensors -> tuple of ints; others -> None)."""
    if isinstance(value, torch.Tensor):
        return tuple(int(s) for s in value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(shape_of(v) for v in value)
    return None


def record_dense_shapes(gm: torch.fx.GraphModule) -> None:
    """Store each node's shape in the original (dense) graph under ``meta['ras_dense_shape']``."""
    for node in gm.graph.nodes:
        if "ras_dense_shape" not in node.meta:
            node.meta["ras_dense_shape"] = shape_of(example_value(node))


def cat_arguments(node: torch.fx.Node) -> tuple:
    """``(tensors, dim)`` of a ``torch.cat`` node, passed by position or by name."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return tensors, dim


def placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def add_placeholder(gm: torch.fx.GraphModule, name: str, value: torch.Tensor) -> torch.fx.Node:
    """Append a placeholder after the existing ones, with a fake/meta ``value`` describing it."""
    last = placeholders(gm)[-1]
    with gm.graph.inserting_after(last):
        node = gm.graph.placeholder(name)
    node.meta["ras_val"] = value
    node.meta["example_value"] = value
    node.meta["ras_dense_shape"] = shape_of(value)
    return node


def insert_call(
    gm: torch.fx.GraphModule,
    where: torch.fx.Node,
    target: Callable,
    args: tuple,
    kwargs: dict | None = None,
    *,
    before: bool = False,
    like: torch.fx.Node | None = None,
) -> torch.fx.Node:
    """Insert ``target(*args, **kwargs)`` right after (or before) ``where``.

    Metadata that tools read (module stack, stack trace) is copied from ``like`` so dumps and
    profiles attribute the new node to the module it serves.
    """
    ctx = gm.graph.inserting_before(where) if before else gm.graph.inserting_after(where)
    with ctx:
        node = gm.graph.call_function(target, args, kwargs or {})
    src = like if like is not None else where
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in src.meta:
            node.meta[key] = src.meta[key]
    node.meta["ras_managed"] = True
    return node


def call_node(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
    """Run a ``call_function``, ``call_method`` or ``call_module`` node on argument values."""
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":  # Dynamo graphs of DiTs inline their modules
        return gm.get_submodule(node.target)(*args, **kwargs)
    raise ValueError(f"cannot run a {node.op} node ({node.name})")


class FakeEnv:
    """Fake-tensor values for the nodes of a graph, computed node by node.

    The passes drive it in topological order so that they can change a node's arguments
    just before it is evaluated (see retarget_token_region).
    """

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.values: dict[torch.fx.Node, Any] = {}

    def fake_like(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            with self.mode:
                return torch.empty_strided(
                    tuple(value.shape), tuple(value.stride()), dtype=value.dtype, device=value.device
                )
        if isinstance(value, (tuple, list)):
            return type(value)(self.fake_like(v) for v in value)
        return value

    def load(self, a: Any) -> Any:
        return map_aggregate(a, lambda x: self.values[x] if isinstance(x, torch.fx.Node) else x)

    def evaluate(self, node: torch.fx.Node) -> Any:
        """Compute (and remember) the fake value of ``node`` from its inputs' values."""
        if node.op == "placeholder":
            value = self.fake_like(example_value(node))
        elif node.op == "get_attr":
            value = self.fake_like(_fetch_attr(self.gm, node.target))
        elif node.op == "output":
            value = None
        else:
            args, kwargs = self.load(node.args), self.load(node.kwargs)
            try:
                with self.mode:
                    value = call_node(self.gm, node, args, kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure means the rewrite does not apply
                raise RewriteError(f"node {node.name} ({describe(node)}) fails on the rewritten shapes: {exc}") from exc
        self.values[node] = value
        return value

    def shape(self, node: torch.fx.Node) -> Any:
        return shape_of(self.values[node])


def _fetch_attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def describe(node: torch.fx.Node) -> str:
    """``target @ module.path`` — short and stable enough for warnings and snapshots."""
    if node.op == "call_function":
        target = getattr(node.target, "__name__", str(node.target))
    else:
        target = str(node.target)
    path = module_path(node)
    return f"{target} @ {path}" if path else target


def is_sdpa(node: torch.fx.Node) -> bool:
    return matches(node, SDPA)


def is_linear(node: torch.fx.Node) -> bool:
    return matches(node, LINEAR)


def is_elementwise(node: torch.fx.Node) -> bool:
    return matches(node, ELEMENTWISE)


def forward_slice(roots: Iterable[torch.fx.Node]) -> set[torch.fx.Node]:
    """All nodes that depend on any of ``roots`` (roots included)."""
    seen: set[torch.fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.users)
    return seen


def backward_slice(roots: Iterable[torch.fx.Node], stop: torch.fx.Node | None = None) -> set[torch.fx.Node]:
    """All nodes that any of ``roots`` depends on (roots included), not looking past ``stop``."""
    seen: set[torch.fx.Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not stop:
            stack.extend(n.all_input_nodes)
    return seen


def mutates(node: torch.fx.Node) -> bool:
    """Writes into one of its inputs: ``t[i] = v``, ``t.add_(...)``, the cache updates the passes insert."""
    if node.meta.get("ras_impure", False) or node.is_impure():
        return True
    return matches(node, WRITES)


def clean_up(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Dead-code elimination (keeping every node that writes into a tensor), lint and recompile."""
    gm.graph.eliminate_dead_code(is_impure_node=mutates)
    gm.graph.lint()
    gm.recompile()
    return gm


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node metadata shared shallowly)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return torch.fx.GraphModule(gm, graph)
