"""Transformers under diffusers' context parallelism: what RAS supports, and what Dynamo needs to see one graph.

RAS runs under Ulysses context parallelism (``ContextParallelConfig(ulysses_degree=P)``): the passes
``unshard_ulysses`` and ``shard_ulysses`` rewrite a rank's graph. ``unsupported_reason`` names the parallel modes it
does not run under (ring attention, unified ring + Ulysses, models without a ``_cp_plan``); those run dense.
``prepare_for_compile`` lets Dynamo trace the context-parallel hooks without a graph break.
"""

from __future__ import annotations

import inspect
import logging

import torch


def parallel_config(module: torch.nn.Module):
    """The ``ContextParallelConfig`` that ``enable_parallelism`` gave ``module``, or None."""
    config = getattr(module, "_parallel_config", None)
    return getattr(config, "context_parallel_config", None) if config is not None else None


def unsupported_reason(module: torch.nn.Module) -> str | None:
    """Why RAS cannot run under ``module``'s context parallelism (None: it can, or there is none)."""
    cp = parallel_config(module)
    if cp is None:
        return None
    ring, ulysses = getattr(cp, "ring_degree", 1) or 1, getattr(cp, "ulysses_degree", 1) or 1
    if ring > 1 and ulysses > 1:
        return f"unified ring x Ulysses context parallelism (ring {ring} x Ulysses {ulysses}) is not supported yet"
    if ring > 1:
        return f"ring attention (ContextParallelConfig(ring_degree={ring})) is not supported yet; use ulysses_degree"
    if getattr(cp, "ulysses_anything", False):
        return "ContextParallelConfig(ulysses_anything=True) splits sequences unevenly, which RAS does not support yet"
    return None


def prepare_for_compile(module: torch.nn.Module) -> None:
    """Let Dynamo trace ``module``'s context-parallel hooks as one graph with the transformer.

    diffusers' split hooks find a positional input's index with ``inspect.signature`` on their first call (a graph
    break under Dynamo): their cache is filled here with the same indices. The hooks warn once through
    ``Logger.warning_once`` when an input is not split (Wan 2.1's 1-D timestep), which Dynamo cannot trace; it is
    added to ``torch._dynamo.config.ignore_logging_functions`` (the warning is then not printed under compile).
    """
    if parallel_config(module) is None:
        return
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            metadata = getattr(hook, "module_forward_metadata", None)
            if not isinstance(hook, ContextParallelSplitHook) or metadata is None or metadata._cls is None:
                continue
            if metadata.cached_parameter_indices is None:
                names = list(inspect.signature(metadata._cls.forward).parameters)[1:]  # as diffusers does
                metadata.cached_parameter_indices = {name: i for i, name in enumerate(names)}
    warning_once = getattr(logging.Logger, "warning_once", None)  # transformers adds it to logging.Logger
    if warning_once is not None:
        torch._dynamo.config.ignore_logging_functions.add(warning_once)


def graph_group(gm: torch.fx.GraphModule) -> str | None:
    """The process group (by name) of a graph's functional collectives, or None when it has none."""
    from rascompile.passes.unshard_ulysses import collective_degree_and_group

    found = (collective_degree_and_group(node) for node in gm.graph.nodes)
    return next((f[1] for f in found if f is not None), None)


def any_rank(flag: bool, group: str) -> bool:
    """True on every rank of ``group`` when ``flag`` is true on any: the ranks decide together (a rank that ran
    dense while another ran RAS would wait forever in a collective the other never issues)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    process_group = _resolve_process_group(group)
    device = torch.device("cpu")
    if "nccl" in str(dist.get_backend(process_group)):
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=process_group)
    return bool(value.item())
