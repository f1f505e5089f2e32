"""Python loops over the batch rows, which Dynamo unrolls, become batched ops the other passes can read.

Lumina-Image 2.0 builds its joint ``[text; image]`` sequence row by row, ``joint[i, :L] = text[i, :L]`` and
``joint[i, L:L + N] = image[i]`` into a ``new_zeros`` buffer, and unpatchifies row by row,
``torch.stack([x[i][L:L + N].view(...).permute(...) ... for i in range(B)])``. Dynamo unrolls both loops into B
copies of the same ops, in which no op takes the ``[B, N, C]`` token tensor as a whole.

Matches:
- a buffer ``b = t.new_zeros(B, S, ...)`` written only by ``b[i, a:c] = v_i`` for every row i, the same slices in
  every row, each ``v_i`` row i of one tensor (``src[i]``, ``src[i, a':c']``) or one scalar, and read only after
  the writes: it becomes ``torch.cat`` of the written pieces (``src[:, a':c']``) and zero gaps along dim 1;
- ``torch.stack([f(x[0]), ..., f(x[B-1])], dim=0)`` where ``f`` is the same chain of reordering and slicing ops
  in every row: it becomes ``f`` lifted over the batch dimension (``x[:, a:c].view(B, ...)``).
Produces: the batched ops, with their example values; values are unchanged (the writes and the rows stay where
they were when any row differs: rows of different text lengths put the image rows at different offsets).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from .context import PassContext, RewriteError
from .graph_utils import FakeEnv, example_value, forward_slice, shape_of

LIFTABLE_METHODS = frozenset({"view", "reshape", "permute", "flatten", "unflatten", "transpose", "contiguous"})


def batch_row_loops(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    changed = False
    tokens = forward_slice([n for n in gm.graph.nodes if n.name == ctx.latents])
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "new_zeros":
            changed |= _batch_buffer(gm, node, ctx, tokens)
        elif node.op == "call_function" and node.target is torch.stack:
            changed |= _batch_stack(gm, node, ctx)
    if changed:
        gm.graph.eliminate_dead_code()
        _refresh_values(gm)
        gm.recompile()
    return gm


# ---------------------------------------------------------------------------------------------- buffers


def _batch_buffer(gm: torch.fx.GraphModule, buffer: torch.fx.Node, ctx: PassContext, tokens: set) -> bool:
    value = example_value(buffer)
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return False
    batch, length = int(value.shape[0]), int(value.shape[1])
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    writes = [u for u in buffer.users if u.op == "call_function" and u.target is operator.setitem]
    readers = [u for u in buffer.users if u not in writes]
    if not writes or any(u.args[0] is not buffer for u in writes):
        return False
    last = max(order[w] for w in writes)
    if any(order[r] < last for r in readers):
        return False
    rows: dict[int, list[tuple[int, int, Any]]] = {}
    for write in writes:
        parsed = _row_write(write, length)
        if parsed is None:
            return False
        row, start, stop, source = parsed
        rows.setdefault(row, []).append((start, stop, source))
    if sorted(rows) != list(range(batch)):
        return False
    segments = sorted(rows[0], key=lambda s: s[0])
    for row in range(1, batch):
        if sorted(rows[row], key=lambda s: s[0]) != segments:
            if any(w.args[2] in tokens for w in writes):
                offsets = ", ".join(
                    str(next(a for a, _, s in sorted(rows[r]) if s[0] == "rows" and s[1] in tokens))
                    for r in range(batch)
                )
                raise RewriteError(
                    f"{buffer.name} places the image tokens of each batch row at its own offset ({offsets}): "
                    "prompts of different lengths in one batch; prompts of one length (or one prompt) keep RAS"
                )
            return False
    if any(a2 < c1 for (_, c1, _), (a2, _, _) in zip(segments, segments[1:])):
        return False  # overlapping writes: the later one wins; kept as written
    with gm.graph.inserting_before(max(writes, key=order.__getitem__).next):
        parts, position = [], 0
        for start, stop, source in segments:
            if start > position:
                parts.append(_zeros(gm, buffer, batch, start - position, value))
            parts.append(_piece(gm, buffer, batch, stop - start, source, value))
            position = stop
        if position < length:
            parts.append(_zeros(gm, buffer, batch, length - position, value))
        joined = gm.graph.call_function(torch.cat, (parts, 1)) if len(parts) > 1 else parts[0]
    for reader in readers:
        reader.replace_input_with(buffer, joined)
    for write in writes:
        gm.graph.erase_node(write)
    ctx.record("batch_row_loops", "row_writes", buffer.name, f"{len(writes)} writes, {len(parts)} parts")
    return True


def _row_write(write: torch.fx.Node, length: int) -> tuple[int, int, int, Any] | None:
    """``(row, start, stop, source)`` of ``b[row, start:stop] = v``, the source keyed so that rows compare equal:
    ``("rows", tensor node, trailing index)`` for ``v = src[row, ...]``, ``("scalar", v)`` for a number."""
    index, value = write.args[1], write.args[2]
    if not (isinstance(index, tuple) and len(index) == 2 and isinstance(index[0], int)):
        return None
    span = index[1]
    if not isinstance(span, slice) or span.step not in (None, 1):
        return None
    start, stop, _ = span.indices(length)
    if stop <= start:
        return None
    if isinstance(value, (bool, int, float)):
        return index[0], start, stop, ("scalar", value)
    row_of = _row_of(value)
    if row_of is None or row_of[1] != index[0]:
        return None
    return index[0], start, stop, ("rows", row_of[0], row_of[2])


def _row_of(node: Any) -> tuple[torch.fx.Node, int, tuple] | None:
    """``(src, row, trailing)`` for ``node = src[row]`` or ``src[row, *trailing]`` (constant indices)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    src, index = node.args
    if not isinstance(src, torch.fx.Node) or not isinstance(example_value(src), torch.Tensor):
        return None
    index = index if isinstance(index, tuple) else (index,)
    if not index or not isinstance(index[0], int) or isinstance(index[0], bool):
        return None
    trailing = tuple(index[1:])
    if any(isinstance(i, torch.fx.Node) or i is None or i is Ellipsis for i in trailing):
        return None
    return src, index[0], trailing


def _zeros(gm, buffer: torch.fx.Node, batch: int, size: int, value: torch.Tensor) -> torch.fx.Node:
    return gm.graph.call_method("new_zeros", (buffer.args[0], (batch, size, *value.shape[2:])), {"dtype": value.dtype})


def _piece(gm, buffer: torch.fx.Node, batch: int, size: int, source: tuple, value: torch.Tensor) -> torch.fx.Node:
    if source[0] == "scalar":
        return gm.graph.call_method(
            "new_full", (buffer.args[0], (batch, size, *value.shape[2:]), source[1]), {"dtype": value.dtype}
        )
    src, trailing = source[1], source[2]
    rows = gm.graph.call_function(operator.getitem, (src, (slice(None), *trailing))) if trailing else src
    if example_value(src).dtype == value.dtype:
        return rows
    return gm.graph.call_method("to", (rows,), {"dtype": value.dtype})


# ---------------------------------------------------------------------------------------------- stacks


def _batch_stack(gm: torch.fx.GraphModule, stack: torch.fx.Node, ctx: PassContext) -> bool:
    parts = stack.args[0] if stack.args else stack.kwargs.get("tensors")
    dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
    if dim != 0 or not isinstance(parts, (list, tuple)) or not parts:
        return False
    chains = [_row_chain(p) for p in parts]
    if any(c is None for c in chains):
        return False
    sources = {c[0] for c in chains}
    if len(sources) != 1 or [c[1] for c in chains] != list(range(len(parts))):
        return False
    source = sources.pop()
    value = example_value(source)
    if not isinstance(value, torch.Tensor) or int(value.shape[0]) != len(parts):
        return False
    steps = [c[2] for c in chains]
    if any(s != steps[0] for s in steps[1:]):
        return False
    with gm.graph.inserting_before(stack):
        node = source
        for kind, target, args in steps[0]:
            lifted = _lift(kind, target, args, len(parts))
            if lifted is None:
                return False
            node = (
                gm.graph.call_function(operator.getitem, (node, lifted))
                if kind == "getitem"
                else gm.graph.call_method(target, (node, *lifted))
            )
    stack.replace_all_uses_with(node)
    gm.graph.erase_node(stack)
    ctx.record("batch_row_loops", "row_stack", stack.name, f"{len(parts)} rows")
    return True


def _row_chain(node: Any) -> tuple[torch.fx.Node, int, list] | None:
    """``(src, row, steps)`` for ``node = f(src[row])``, ``f`` a chain of liftable ops with constant arguments."""
    steps = []
    while isinstance(node, torch.fx.Node):
        if node.op == "call_function" and node.target is operator.getitem:
            row_of = _row_of(node)
            if row_of is not None:
                src, row, trailing = row_of
                if trailing:
                    steps.append(("getitem", None, trailing))
                return src, row, steps[::-1]
            index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            if any(isinstance(i, torch.fx.Node) for i in index):
                return None
            steps.append(("getitem", None, index))
        elif node.op == "call_method" and node.target in LIFTABLE_METHODS and not node.kwargs:
            if any(isinstance(a, torch.fx.Node) for a in node.args[1:]):
                return None
            steps.append(("method", node.target, tuple(node.args[1:])))
        else:
            return None
        node = node.args[0]
    return None


def _lift(kind: str, target: str | None, args: tuple, batch: int) -> tuple | None:
    """The arguments of the same op over a leading batch dimension; None when it cannot be lifted."""
    if kind == "getitem":
        if any(i is None or i is Ellipsis or isinstance(i, bool) for i in args):
            return None
        return (slice(None), *args)
    flat = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
    if target in ("view", "reshape"):
        return (batch, *flat)
    if target == "permute":
        return (0, *[d + 1 if d >= 0 else d for d in flat])
    if target in ("flatten", "transpose"):
        dims = list(args) if target == "transpose" else (list(args) + [0, -1][len(args) :])
        return tuple(d + 1 if d >= 0 else d for d in dims)
    if target == "unflatten":
        return (args[0] + 1 if args[0] >= 0 else args[0], *args[1:])
    if target == "contiguous":
        return ()
    return None


def _refresh_values(gm: torch.fx.GraphModule) -> None:
    """Example values (and dense shapes) for the nodes this pass made, from their inputs'."""
    env = FakeEnv(gm)
    for node in gm.graph.nodes:
        env.evaluate(node)
        if example_value(node) is None and node.op != "output":
            node.meta["example_value"] = env.values[node]
            node.meta["ras_dense_shape"] = shape_of(env.values[node])
