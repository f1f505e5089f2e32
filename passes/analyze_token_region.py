"""Analysis pass: which nodes carry the active tokens, on which axis, and where joint sequences keep their image rows.

Matches: the token region, i.e. every node that (transitively) consumes the gathered tokens up to the
``merge_output`` node, as ``retarget_token_region`` walks it, before any K/V cache is added: the walk runs on a
copy of the graph, with k active tokens, rewriting the copy's token-count literals, position tables and masks so
that its shapes propagate (the records of those rewrites are dropped; ``retarget_token_region`` makes and records
the real ones once the caches are in place).
Produces: no graph change; ``ctx.token_region`` (``TokenRegionFacts``), by node name: the token axis of each node
whose tensor carries the k active tokens, and, for those that hold a joint [text; image] (or [image; text])
sequence, the dense row where its N image rows start. ``cache_attention_kv`` reads it to find where each
attention's keys and values come from. Skipped when ``settings.kv_cache`` is off (nothing reads it then).
Refuses (RewriteError) what ``retarget_token_region`` refuses, for the same reasons.
"""

from __future__ import annotations

import torch.fx

from .context import PassContext, TokenRegionFacts
from .retarget_token_region import walk_token_region


def analyze_token_region(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    if not ctx.settings.kv_cache:
        return gm
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    trial = torch.fx.GraphModule(gm, graph)
    walk_token_region(trial, ctx, _discard)
    facts = TokenRegionFacts()
    for node in trial.graph.nodes:
        if "ras_token_axis" in node.meta:
            facts.axes[node.name] = node.meta["ras_token_axis"]
        if "ras_image_offset" in node.meta:
            facts.image_offsets[node.name] = node.meta["ras_image_offset"]
    ctx.token_region = facts
    return gm


def _discard(*_args, **_kwargs) -> None:
    """The copy's rewrites are not the graph's: their records are dropped."""
