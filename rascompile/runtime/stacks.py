"""What a user stacked on the transformer, named as they named it, read from the code a Dynamo graph traced.

Dynamo records each node's Python stack. A graph whose nodes came through a diffusers hook or accelerate's hooks was
shaped by that hook (a step cache, offloading, ...); when such a graph keeps RAS off, the warning names the hook and
the call that installed it instead of an internal node.
"""

from __future__ import annotations

import re

import torch.fx

#: diffusers/hooks/<file>.py -> what the user called to install it
DIFFUSERS_HOOKS = {
    "pyramid_attention_broadcast": "PyramidAttentionBroadcast (transformer.enable_cache)",
    "first_block_cache": "FirstBlockCache (transformer.enable_cache)",
    "taylorseer_cache": "TaylorSeer cache (transformer.enable_cache)",
    "mag_cache": "MagCache (transformer.enable_cache)",
    "faster_cache": "FasterCache (transformer.enable_cache)",
    "sea_cache": "SeaCache (transformer.enable_cache)",
    "group_offloading": "group offloading (enable_group_offload)",
    "layerwise_casting": "layerwise casting (enable_layerwise_casting)",
    "layer_skip": "layer skip guidance",
    "context_parallel": "context parallelism (enable_parallelism)",
}
ACCELERATE_HOOKS = "accelerate's offloading hooks (enable_model_cpu_offload, enable_sequential_cpu_offload)"

_DIFFUSERS_HOOK = re.compile(r"diffusers[/\\]hooks[/\\](\w+)\.py")
_ACCELERATE_HOOK = re.compile(r"accelerate[/\\]hooks\.py")


def stacked_hooks(gm: torch.fx.GraphModule) -> tuple[str, ...]:
    """The hooks ``gm``'s code ran through, in the user's words, first seen first."""
    found: list[str] = []
    for node in gm.graph.nodes:
        trace = node.meta.get("stack_trace")
        if not trace:
            continue
        names = [
            DIFFUSERS_HOOKS.get(m, f"the diffusers hook in diffusers/hooks/{m}.py")
            for m in _DIFFUSERS_HOOK.findall(trace)
        ]
        if _ACCELERATE_HOOK.search(trace):
            names.append(ACCELERATE_HOOKS)
        found.extend(n for n in names if n not in found)
    return tuple(found)
