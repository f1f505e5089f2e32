"""Put every attention call's arguments in one form: query, key and value positional, the rest by name.

Matches: each ``scaled_dot_product_attention`` node, however it was called. diffusers' attention
dispatcher (``dispatch_attention_fn``, used by Flux, Wan, Qwen-Image, HunyuanVideo, LTX, ...) passes
``query=``, ``key=``, ``value=`` and ``attn_mask=`` as keywords; older processors pass them positionally.
Produces: the same node with ``args = (query, key, value)`` and every other argument the call gave
(``attn_mask``, ``dropout_p``, ``is_causal``, ``scale``, ``enable_gqa``) as a keyword, so the later passes
read attention arguments one way (``sdpa_argument``).
"""

from __future__ import annotations

from typing import Any

import torch.fx

from .context import PassContext, RewriteError
from .graph_utils import describe, is_sdpa

#: ``torch.nn.functional.scaled_dot_product_attention``'s parameters, in order.
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
TENSOR_ARGUMENTS = SDPA_PARAMETERS[:3]


def normalize_attention_args(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    for node in gm.graph.nodes:
        if is_sdpa(node):
            node.args, node.kwargs = normalized_sdpa_arguments(node)
    return gm


def normalized_sdpa_arguments(node: torch.fx.Node) -> tuple[tuple, dict[str, Any]]:
    """``(query, key, value), {other given arguments by name}`` of an attention node."""
    if len(node.args) > len(SDPA_PARAMETERS):
        raise RewriteError(f"{node.name} ({describe(node)}): more positional arguments than attention takes")
    given = dict(zip(SDPA_PARAMETERS, node.args))
    for name, value in node.kwargs.items():
        if name not in SDPA_PARAMETERS or name in given:
            raise RewriteError(f"{node.name} ({describe(node)}): unexpected attention argument {name!r}")
        given[name] = value
    missing = [name for name in TENSOR_ARGUMENTS if name not in given]
    if missing:
        raise RewriteError(f"{node.name} ({describe(node)}): attention without {', '.join(missing)}")
    args = tuple(given.pop(name) for name in TENSOR_ARGUMENTS)
    return args, given


def sdpa_argument(node: torch.fx.Node, name: str, default: Any = None) -> Any:
    """One argument of an attention node by name, however the call passed it."""
    args, kwargs = normalized_sdpa_arguments(node)
    if name in TENSOR_ARGUMENTS:
        return args[TENSOR_ARGUMENTS.index(name)]
    return kwargs.get(name, default)
