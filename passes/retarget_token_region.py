"""Make every node between the token gather and the output merge work on k active tokens.

Matches: the token region, i.e. every node that (transitively) consumes the gathered tokens
up to the ``merge_output`` node, walked in topological order with fake tensors.
Produces, per region node:
- shape constants that counted image tokens (``N``, or ``N + L`` for a joint image+text
  sequence, e.g. ``x[:, :N]`` after SD3 joint attention or ``reshape(x, B, N, H, -1, 2)`` in
  RoPE) rewritten in terms of ``ras_active_count``;
- tensors indexed by image-token position that are combined element-wise with token
  tensors (RoPE tables, position embeddings) gathered at the active rows;
- attention masks with one row per image query gathered at the active rows.
Refuses (RewriteError) anything it cannot prove correct: an op that mixes tokens along the
token axis (reductions, matmuls over tokens, ...), a tensor whose shape changes in an
unexpected way, or a token tensor that reaches the graph output without the merge.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from .context import PassContext, RewriteError
from .gather_active_tokens import index_for
from .graph_utils import FakeEnv, cat_arguments, describe, insert_call, is_elementwise, is_sdpa
from .op_sets import ALWAYS_MIXING, CAT, MATMUL, MIXING, NEW_TENSORS, SLICING, SQUEEZE, matches
from .rules.position_tables import gather_attention_mask, gather_position_tables


class TokenRegion:
    """Token-axis bookkeeping for the walk: which nodes carry k instead of N tokens."""

    def __init__(
        self,
        env: FakeEnv,
        num_tokens: int,
        probe: int,
        record: Callable[..., None],
        batch: int = 1,
        rows_index: Callable[[int], torch.fx.Node] | None = None,
    ):
        self.env = env
        # ``PassContext.record`` while rewriting; a no-op while ``analyze_token_region`` walks a copy
        self.record = record
        self.n = num_tokens
        self.delta = num_tokens - probe
        # the latents' batch B: a token axis fused with the batch axis ([B*N, F, C]: Latte's temporal blocks, the
        # frames of each site, row b*N + n) changes by B * delta
        self.batch = batch
        # the active index for a tensor of a given leading size (repeated per row when frames are folded)
        self.rows_index = rows_index
        # where the N image rows start along a node's token axis in the dense graph (0 for image-only tensors,
        # the text length for a [text; image] joint sequence); None when it cannot be told
        self.offsets: dict[torch.fx.Node, int | None] = {}
        # position-table gathers already inserted, by their arguments (one gather serves every layer)
        self.gathered: dict[tuple, torch.fx.Node] = {}

    def record_offset(self, node: torch.fx.Node, inputs: list[torch.fx.Node]) -> None:
        axis = self.axis(node)
        if axis is None:
            return
        if axis < 0:  # a tuple of token tensors (split, unbind): its parts keep the input's layout
            self.offsets[node] = next((self.offsets.get(a) for a in inputs if a in self.offsets), None)
            return
        if self.fused(node):
            self.offsets[node] = None  # the rows of all items: no run of image rows to locate
            return
        size = self.dense_size(node, axis)
        if size == self.n:
            self.offsets[node] = 0
            return
        self.offsets[node] = self._joint_offset(node, axis, size, inputs)

    def _joint_offset(self, node: torch.fx.Node, axis: int, size: int, inputs: list[torch.fx.Node]) -> int | None:
        if matches(node, CAT):
            parts, dim = cat_arguments(node)
            image = [i for i, p in enumerate(parts) if isinstance(p, torch.fx.Node) and p in inputs]
            if isinstance(dim, int) and dim % len(node.meta["ras_dense_shape"]) != axis:
                # joined along another axis (RoPE's rotated halves): the parts' rows, where they agree
                found = {self.offsets.get(parts[i]) for i in image}
                return found.pop() if len(found) == 1 else None
            if len(image) != 1 or self.offsets.get(parts[image[0]]) is None:
                return None
            before = sum(p.meta["ras_dense_shape"][axis] for p in parts[: image[0]])
            return before + self.offsets[parts[image[0]]]
        for arg in inputs:
            arg_axis = self.axis(arg)
            if arg_axis == -1 or (arg_axis is not None and self.dense_size(arg, arg_axis) == size):
                return self.offsets.get(arg)
        return None

    def axis(self, node: torch.fx.Node) -> int | None:
        """Token axis of ``node``'s tensor value, or None when its shape is the dense one."""
        if node not in self.env.values:
            return None
        now = self.env.shape(node)
        dense = node.meta.get("ras_dense_shape")
        if not isinstance(now, tuple) or now == dense or dense is None:
            return None
        if now and isinstance(now[0], tuple):  # a tuple of tensors (chunk / split output)
            return -1
        return self._changed_axis(node, now, dense)

    def _changed_axis(self, node: torch.fx.Node, now: tuple, dense: Any) -> int:
        if not isinstance(dense, tuple) or len(now) != len(dense):
            raise RewriteError(f"{node.name} ({describe(node)}): rank changed from {dense} to {now}")
        changed = [i for i, (a, b) in enumerate(zip(now, dense)) if a != b]
        if len(changed) != 1 or dense[changed[0]] - now[changed[0]] not in self._deltas():
            raise RewriteError(
                f"{node.name} ({describe(node)}): shape {now} does not follow dense {dense} "
                f"with {self.n - self.delta} of {self.n} tokens"
            )
        return changed[0]

    def _deltas(self) -> tuple[int, ...]:
        return (self.delta, self.batch * self.delta) if self.batch > 1 else (self.delta,)

    def fused(self, node: torch.fx.Node) -> bool:
        """Whether ``node``'s token axis is fused with the batch axis (B*N dense rows, B*k now)."""
        axis = self.axis(node)
        if axis is None or axis < 0 or self.batch == 1:
            return False
        return self.dense_size(node, axis) - self.env.shape(node)[axis] == self.batch * self.delta

    def dense_size(self, node: torch.fx.Node, axis: int) -> int:
        return node.meta["ras_dense_shape"][axis]

    def consistent(self, node: torch.fx.Node) -> bool:
        try:
            now, dense = self.env.shape(node), node.meta.get("ras_dense_shape")
            if now == dense:
                return True
            if isinstance(now, tuple) and now and isinstance(now[0], tuple):
                return all(self._pair_ok(a, b) for a, b in zip(now, dense))
            return self._pair_ok(now, dense)
        except (RewriteError, TypeError):
            return False

    def _pair_ok(self, now: Any, dense: Any) -> bool:
        if now == dense:
            return True
        if not isinstance(now, tuple) or not isinstance(dense, tuple) or len(now) != len(dense):
            return False
        diffs = [b - a for a, b in zip(now, dense) if a != b]
        return len(diffs) == 1 and diffs[0] in self._deltas()


def retarget_token_region(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    walk_token_region(gm, ctx, ctx.record)
    return gm


def walk_token_region(gm: torch.fx.GraphModule, ctx: PassContext, record: Callable[..., None]) -> None:
    """The walk itself, over ``gm`` in place: each node's fake value with k tokens, its literals, position tables
    and masks rewritten, ``ras_token_axis`` / ``ras_image_offset`` on the nodes that carry tokens; ``record``
    takes the ``RewriteRecord`` fields of each rewrite. ``analyze_token_region`` runs it on a copy."""
    env = FakeEnv(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    idx, count = nodes[ctx.active_idx], nodes[ctx.active_count]

    def rows_index(batch: int) -> torch.fx.Node:
        return index_for(gm, ctx, batch) if ctx.token_rows > 1 and batch == ctx.token_batch else idx

    region = TokenRegion(env, ctx.num_tokens, ctx.probe_tokens, record, ctx.batch_size, rows_index)
    attends = False
    for node in list(gm.graph.nodes):
        if node.op == "output":
            _check_outputs(node, region)
            continue
        if node.op in ("placeholder", "get_attr") or node.meta.get("ras_managed"):
            env.evaluate(node)
            region.record_offset(node, [])  # the token gather: image rows from 0
            continue
        inputs = [a for a in node.all_input_nodes if region.axis(a) is not None]
        if not inputs or matches(node, NEW_TENSORS) or _dtype_from_tokens(node, inputs):
            env.evaluate(node)  # a new tensor takes only its dtype and device from a token tensor
            continue
        _refuse_token_mixing(node, inputs, region)
        if _is_flex_attention(node):
            raise RewriteError(
                f"{node.name} ({describe(node)}): attention over the image tokens runs through flex_attention, which "
                'RAS does not rewrite (with set_attention_backend("flex"), set_attention_backend("native") keeps RAS)'
            )
        if is_sdpa(node):
            attends = True
            gather_attention_mask(gm, node, region, idx)
        elif is_elementwise(node):
            gather_position_tables(gm, node, inputs, region, idx)
        _refuse_two_token_runs(node, inputs, region)
        _keep_token_axis_in_squeeze(node, inputs, region)
        _retarget_literals(gm, node, inputs, region, count)
        _check_batch_fusion(node, inputs, region)
        region.record_offset(node, inputs)
        axis = region.axis(node)
        if axis is not None and axis >= 0:
            node.meta["ras_token_axis"] = axis
            if region.offsets.get(node) is not None:
                node.meta["ras_image_offset"] = region.offsets[node]
        elif axis is None and not _may_drop_token_axis(node):
            raise RewriteError(f"{node.name} ({describe(node)}) loses the token axis of its input")
    if not attends and not (ctx.settings.piece_tokens or ctx.settings.piece_outputs):
        # a piece of a model between graph breaks (an output head, a text projection): its "tokens" were
        # computed in full by another graph, so skipping rows here would only copy stale outputs. The piece
        # runtime (``runtime/pieces.py``) gathers and merges at every piece's boundary, so there it is exact
        if any(_is_flex_attention(n) for n in gm.graph.nodes):
            raise RewriteError(
                'attention runs through flex_attention (set_attention_backend("flex")), which RAS does not rewrite: '
                'set_attention_backend("native") keeps RAS'
            )
        raise RewriteError("no attention reads the image tokens: this graph is not a whole transformer")


def _check_batch_fusion(node: torch.fx.Node, inputs: list[torch.fx.Node], region: TokenRegion) -> None:
    """A token axis fused with the batch axis must be item-major (row b*N + n), as the fused tables' gathers read it:
    made by a reshape of a tensor whose axis 0 is the batch and axis 1 the tokens, and split back the same way."""
    if region.batch == 1 or node.op == "output":
        return
    if any(region.axis(a) == -1 for a in [node, *inputs]):
        return  # a tuple of token tensors (chunk, split) and its parts keep one layout
    made, fed = region.fused(node), [a for a in inputs if region.fused(a)]
    if made == bool(fed):
        return
    ends = [a for a in inputs if not region.fused(a)] if made else [node]
    plain = ends[0] if len(ends) == 1 else None
    if (
        node.op == "call_method"
        and node.target in ("reshape", "view")
        and plain is not None
        and region.axis(plain) == 1
        and region.dense_size(plain, 0) == region.batch
    ):
        return
    raise RewriteError(f"{node.name} ({describe(node)}) merges the token axis with another axis")


def _refuse_two_token_runs(node: torch.fx.Node, inputs: list[torch.fx.Node], region: TokenRegion) -> None:
    """A sequence that joins two runs of image tokens along the token axis (Motif-Video's decoder attends over its
    own tokens and the encoder's): the K/V caches and literals keep one run of image rows per sequence."""
    if not matches(node, CAT):
        return
    parts, dim = cat_arguments(node)
    runs = [p for p in parts if isinstance(p, torch.fx.Node) and p in inputs]
    if len(runs) < 2:
        return
    axes = {region.axis(p) for p in runs}
    if isinstance(dim, int) and len(axes) == 1 and dim % len(region.env.shape(runs[0])) == axes.pop():
        raise RewriteError(
            f"{node.name} ({describe(node)}) joins two runs of image tokens in one sequence (a decoder attending "
            "over its own and the encoder's image tokens); RAS keeps one run of image tokens per sequence"
        )


def _keep_token_axis_in_squeeze(node: torch.fx.Node, inputs: list[torch.fx.Node], region: TokenRegion) -> None:
    """``x.squeeze(d)`` on the token axis (Allegro's blocks squeeze axis 1 of ``[B, N, C]``) does nothing with N
    tokens but drops the axis with one active token: the squeeze is limited to the other axes it would drop."""
    if not matches(node, SQUEEZE) or not node.args or node.args[0] not in inputs:
        return
    source = node.args[0]
    axis, shape = region.axis(source), region.env.shape(source)
    if axis is None or axis < 0 or region.dense_size(source, axis) == 1:
        return
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    requested = range(len(shape)) if dims is None else dims if isinstance(dims, (tuple, list)) else (dims,)
    if not all(isinstance(d, int) for d in requested):
        return
    requested = [d % len(shape) for d in requested]
    if axis in requested:
        node.args = (source, tuple(d for d in requested if d != axis and shape[d] == 1))
        node.kwargs = {}
        region.record("retarget_token_region", "squeeze", describe(node))


def _dtype_from_tokens(node: torch.fx.Node, inputs: list[torch.fx.Node]) -> bool:
    """``t.type_as(tokens)`` of a tensor ``t`` that carries no tokens: it takes only their dtype (Cosmos casts its
    timestep projection to the hidden states' dtype)."""
    return node.op == "call_method" and node.target == "type_as" and bool(node.args) and node.args[0] not in inputs


def _is_flex_attention(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and "flex_attention" in getattr(node.target, "__name__", str(node.target))


def _check_outputs(output: torch.fx.Node, region: TokenRegion) -> None:
    for arg in output.all_input_nodes:
        if region.axis(arg) is not None:
            raise RewriteError(f"graph output {arg.name} ({describe(arg)}) carries active tokens only")


def _may_drop_token_axis(node: torch.fx.Node) -> bool:
    return is_sdpa(node) or matches(node, SLICING)


def _refuse_token_mixing(node: torch.fx.Node, inputs: list[torch.fx.Node], region: TokenRegion) -> None:
    if matches(node, ALWAYS_MIXING):
        raise RewriteError(f"{node.name} ({describe(node)}) mixes image tokens")
    if matches(node, MIXING):
        first, dims = _reduction_operands(node)
        if first in inputs:
            axis = region.axis(first)
            ndim = len(region.env.shape(first))
            dims = dims if isinstance(dims, (tuple, list)) else [dims]
            if any(d is None or (isinstance(d, int) and d % ndim == axis) for d in dims):
                raise RewriteError(f"{node.name} ({describe(node)}) reduces or reorders along the token axis")
        elif first is None and inputs:
            raise RewriteError(f"{node.name} ({describe(node)}): cannot tell which tensor it reduces")
    if matches(node, MATMUL):
        a, b = _matmul_operands(node)
        if a in inputs and region.axis(a) == len(region.env.shape(a)) - 1:
            raise RewriteError(f"{node.name} ({describe(node)}) contracts over the token axis")
        if b in inputs and region.axis(b) == len(region.env.shape(b)) - 2:
            raise RewriteError(f"{node.name} ({describe(node)}) contracts over the token axis")


#: Where a mixing op takes its dimension(s) when given positionally (0 is the tensor itself).
_DIM_POSITION = {"roll": 2, "topk": 2, "norm": 2, "normalize": 2}
_DIM_KEYWORDS = ("dim", "dims", "axis")


def _reduction_operands(node: torch.fx.Node) -> tuple[Any, Any]:
    """(the tensor a reduction or reordering runs on, its dim argument or None for all dims), whether they
    were passed by position or by name (``torch.sum(input=x, dim=1)``, ``x.roll(1, dims=1)``)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    first = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    for keyword in _DIM_KEYWORDS:
        if keyword in node.kwargs:
            return first, node.kwargs[keyword]
    position = _DIM_POSITION.get(name, 1)
    return first, node.args[position] if len(node.args) > position else None


def _matmul_operands(node: torch.fx.Node) -> tuple[Any, Any]:
    names = (("input", "self"), ("other", "mat2"))
    operands = list(node.args[:2])
    for i, keys in enumerate(names):
        if len(operands) <= i:
            operands.append(next((node.kwargs[k] for k in keys if k in node.kwargs), None))
    return operands[0], operands[1]


def _int_paths(value: Any, path: tuple = ()) -> list[tuple[tuple, int]]:
    """(path, int) for every int literal inside nested args (tuples, lists, dicts, slices)."""
    found = []
    if isinstance(value, bool):
        return found
    if isinstance(value, int):
        return [(path, value)]
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            found += _int_paths(v, path + (i,))
    elif isinstance(value, dict):
        for key, v in value.items():
            found += _int_paths(v, path + (key,))
    elif isinstance(value, slice):
        for i, v in enumerate((value.start, value.stop, value.step)):
            found += _int_paths(v, path + (i,))
    return found


def _set_path(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, slice):
        parts = [value.start, value.stop, value.step]
        parts[head] = _set_path(parts[head], rest, new)
        return slice(*parts)
    if isinstance(value, dict):
        return {k: (_set_path(v, rest, new) if k == head else v) for k, v in value.items()}
    items = [(_set_path(v, rest, new) if i == head else v) for i, v in enumerate(value)]
    return type(value)(items) if not isinstance(value, list) else items


def _retarget_literals(gm, node, inputs, region: TokenRegion, count) -> None:
    """Evaluate ``node``, rewriting token-count literals where the shapes require it."""
    # B*N: the rows of a token axis fused with the batch (``x.reshape(B * N, F, C)`` makes one)
    fused = region.batch * region.n if region.batch > 1 else None
    sizes = {region.n} | ({fused} if fused else set())
    for arg in inputs:
        axis = region.axis(arg)
        if axis is not None and axis >= 0:
            sizes.add(region.dense_size(arg, axis))
    packed = (node.args, node.kwargs)
    # a token count, or its negative (``x[:, -N:]``: the image rows at the end of a joint sequence)
    candidates = [(p, v) for p, v in _int_paths(packed) if v in sizes or (v < 0 and -v in sizes)]
    if not candidates:
        region.env.evaluate(node)
        return
    replacements = {}
    for _, value in candidates:
        if value in replacements:
            continue
        if value == fused:  # B*N rows of a token axis fused with the batch: B*k
            replacements[value] = insert_call(gm, node, operator.mul, (count, region.batch), before=True)
            region.env.evaluate(replacements[value])
        elif value > 0:
            replacements[value] = _count_expr(gm, node, count, value - region.n, region)
        else:
            positive = _count_expr(gm, node, count, -value - region.n, region)
            replacements[value] = insert_call(gm, node, operator.neg, (positive,), before=True)
            region.env.evaluate(replacements[value])
    # All candidates rewritten, else each alone, else none: the first that gives consistent shapes wins.
    singles = [[c] for c in candidates] if len(candidates) > 1 else []
    options = [candidates, *singles, []]
    for option in options:
        new = packed
        for path, value in option:
            new = _set_path(new, path, replacements[value])
        node.args, node.kwargs = new
        try:
            region.env.evaluate(node)
        except RewriteError:
            continue
        if region.consistent(node):
            if option:
                literals = ", ".join(str(v) for _, v in option)
                region.record("retarget_token_region", "literal", describe(node), literals)
            return
    node.args, node.kwargs = packed
    raise RewriteError(f"{node.name} ({describe(node)}): cannot adapt its token-count constants {sorted(sizes)}")


def _count_expr(gm, node, count, offset: int, region: TokenRegion) -> torch.fx.Node:
    """A node computing ``k + offset`` (k itself when offset is 0)."""
    if offset == 0:
        return count
    expr = insert_call(gm, node, operator.add, (count, offset), before=True)
    region.env.evaluate(expr)
    return expr
