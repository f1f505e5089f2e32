"""What a user stacked on the transformer, named as they named it, read from the code a Dynamo graph traced.

Dynamo records each node's Python stack. A graph whose nodes came through a diffusers hook or accelerate's hooks was
shaped by that hook (a step cache, offloading, ...); when such a graph keeps RAS off, the warning names the hook and
the call that installed it instead of an internal node.
"""

from __future__ import annotations

import re
import traceback

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
#: accelerate's hooks on the layers inside a transformer, not only on the transformer itself
SEQUENTIAL_OFFLOAD = "sequential offloading (enable_sequential_cpu_offload)"

STEP_CACHES = (
    "pyramid_attention_broadcast",
    "first_block_cache",
    "taylorseer_cache",
    "mag_cache",
    "faster_cache",
    "sea_cache",
)
#: what to do instead, by hook
ADVICE = {
    **dict.fromkeys(
        (DIFFUSERS_HOOKS[m] for m in STEP_CACHES),
        "step caches and RAS both skip work and do not combine: call transformer.disable_cache() to run RAS",
    ),
    DIFFUSERS_HOOKS["first_block_cache"]: "call transformer.disable_cache() to run RAS, or set graph_pieces=True "
    "(experimental) to run both",
    DIFFUSERS_HOOKS["group_offloading"]: "pipe.enable_model_cpu_offload() keeps RAS; so does keeping the transformer "
    "on the accelerator, or graph_pieces=True (experimental), which runs RAS across the blocks' graphs",
    ACCELERATE_HOOKS: "pipe.enable_model_cpu_offload() keeps RAS; enable_sequential_cpu_offload() does not",
    SEQUENTIAL_OFFLOAD: "pipe.enable_model_cpu_offload() keeps RAS; enable_sequential_cpu_offload() does not",
}
GENERIC_ADVICE = "remove the hook"
#: hooks RAS runs with (the status names them without advice)
RUNS_WITH = {
    DIFFUSERS_HOOKS["context_parallel"]: "RAS runs under Ulysses context parallelism (ulysses_degree); ring attention "
    "and ulysses_anything run dense",
}
ADVICE[DIFFUSERS_HOOKS["context_parallel"]] = (
    "use ContextParallelConfig(ulysses_degree=P) (even splits) and rascompile.apply, which RAS runs under"
)


def advice_for(hooks: tuple[str, ...] | list[str]) -> str:
    """What the user can do instead of the hooks that kept RAS off."""
    said = list(dict.fromkeys(ADVICE.get(h, GENERIC_ADVICE) for h in hooks))
    return "; ".join(said) if said else GENERIC_ADVICE


_DIFFUSERS_HOOK = re.compile(r"diffusers[/\\]hooks[/\\](\w+)\.py")
_ACCELERATE_HOOK = re.compile(r"accelerate[/\\]hooks\.py")


#: diffusers' hook machinery itself (the registry that calls every hook), named only when no hook file shows
DIFFUSERS_HOOK_MACHINERY = ("hooks", "_helpers", "_common", "utils")
ANY_DIFFUSERS_HOOK = "a diffusers hook (a step cache such as FirstBlockCache, or group offloading)"


def _diffusers_hook_name(module: str) -> str | None:
    """The user's name for the hook in ``diffusers/hooks/<module>.py``; None for the hook machinery itself."""
    if module in DIFFUSERS_HOOK_MACHINERY:
        return None
    return DIFFUSERS_HOOKS.get(module, f"the diffusers hook in diffusers/hooks/{module}.py")


def stacked_hooks(gm: torch.fx.GraphModule) -> tuple[str, ...]:
    """The hooks ``gm``'s code ran through, in the user's words, first seen first."""
    found: list[str] = []
    machinery = False
    for node in gm.graph.nodes:
        trace = node.meta.get("stack_trace")
        if not trace:
            continue
        names = [_diffusers_hook_name(m) for m in _DIFFUSERS_HOOK.findall(trace)]
        machinery = machinery or None in names
        names = [n for n in names if n is not None]
        if _ACCELERATE_HOOK.search(trace):
            names.append(ACCELERATE_HOOKS)
        found.extend(n for n in names if n not in found)
    if machinery and not any(n != ACCELERATE_HOOKS for n in found):
        found.append(ANY_DIFFUSERS_HOOK)
    return tuple(found)


def hook_of_file(filename: str) -> str | None:
    """The user's name for the hook whose code lives in ``filename``; None for other files and for diffusers' hook
    machinery."""
    match = _DIFFUSERS_HOOK.search(filename)
    name = _diffusers_hook_name(match.group(1)) if match else None
    if name is None and _ACCELERATE_HOOK.search(filename):
        name = ACCELERATE_HOOKS
    return name


def running_hooks() -> tuple[str, ...]:
    """The hooks on the Python call stack now, in the user's words. Inside Dynamo's call of the backend these are the
    hooks that called the frame being compiled: a piece of a transformer that a hook called (a step cache's block
    loop, an offloading hook) shows the hook here even when none of its own nodes ran through the hook's code."""
    names = (hook_of_file(frame.filename) for frame in traceback.extract_stack())
    return tuple(dict.fromkeys(n for n in names if n is not None))


def hooks_on(module: torch.nn.Module) -> tuple[str, ...]:
    """The hooks installed on ``module`` or its submodules, in the user's words: diffusers' hook registries
    (``_diffusers_hook``) and accelerate's hooks (``_hf_hook``)."""
    found: list[str] = []
    root = getattr(module, "_orig_mod", module)
    for sub in root.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            name = _diffusers_hook_name(type(hook).__module__.rsplit(".", 1)[-1])
            if name is not None:
                found.append(name)
        if getattr(sub, "_hf_hook", None) is not None:
            found.append(ACCELERATE_HOOKS if sub is root else SEQUENTIAL_OFFLOAD)
    return tuple(dict.fromkeys(found))
