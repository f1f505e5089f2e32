"""Check the rewritten graph at token counts other than the one it was rewritten with, then clean up.

Matches: the whole rewritten graph.
Produces: the same graph after dead-code elimination and lint. Raises RewriteError when the
graph does not propagate with k = 1, k = N - 1 or k = N, or when its outputs then differ in
shape from the dense graph's outputs.
"""

from __future__ import annotations

import torch
import torch.fx

from .context import PassContext, RewriteError
from .graph_utils import FakeEnv, clean_up, example_value, shape_of


def verify_ras_graph(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    gm = clean_up(gm)
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    dense_outputs = [a.meta.get("ras_dense_shape") for a in output.all_input_nodes]
    step = ctx.context_parallel.degree if ctx.context_parallel else 1  # k is a multiple of the ranks under CP
    for k in sorted({step, ctx.num_tokens - step, ctx.num_tokens}):
        env = FakeEnv(gm)
        for node in gm.graph.nodes:
            if node.name == ctx.active_idx:
                value = example_value(node)
                with env.mode:
                    env.values[node] = torch.empty(ctx.batch_size, k, dtype=value.dtype, device=value.device)
                continue
            try:
                env.evaluate(node)
            except RewriteError as exc:
                raise RewriteError(f"with {k} active tokens: {exc}") from exc
        got = [shape_of(env.values[a]) for a in output.all_input_nodes]
        if got != dense_outputs:
            raise RewriteError(f"with {k} active tokens the outputs are {got}, dense outputs are {dense_outputs}")
    return gm
