"""RAS generations of tiny Flux, Wan and Qwen-Image pipelines under diffusers' Ulysses context parallelism.

``ras_generation_worker`` runs in each rank of ``tests.support.context_parallel.run_ranks`` (or in one process through
``run_reference``): the same seeded pipeline and call on every rank, ``enable_parallelism`` when distributed, then
``rascompile.apply`` and one generation. Text lengths are 6 (divisible by 2: diffusers splits the text too).
"""

from __future__ import annotations

import warnings
from unittest import mock

import torch

CP_FAMILIES = ("flux", "wan", "qwen_image")
TEXT_LEN = 6
STEPS = 6


def pipeline_and_call(family: str):
    """The tiny pipeline of ``family`` and its call (latents out). Flux without guidance; Wan with CFG (two calls
    per step); Qwen-Image with true CFG and padded text masks."""
    from tests.support import models

    if family == "flux":
        return models.tiny_flux_pipeline(), models.flux_call_kwargs(batch=1, steps=STEPS, text_len=TEXT_LEN)
    if family == "wan":
        return models.tiny_wan_pipeline(), models.wan_pipeline_kwargs(batch=1, steps=STEPS)
    if family == "qwen_image":
        call = models.qwen_image_pipeline_kwargs(batch=1, steps=STEPS, text_len=TEXT_LEN)
        return models.tiny_qwen_image_pipeline(), call
    raise ValueError(f"unknown family {family!r}; one of {CP_FAMILIES}")


def ras_generation_worker(
    info, families=CP_FAMILIES, parallel: dict | None = None, ras: bool = True, fit=None, device: str = "cpu"
):
    """One generation per family; returns ``{family: {"latents", "decisions", "kv", "status", "warnings"}}``.

    ``parallel``: more ``ContextParallelConfig`` fields (``ulysses_anything``). ``ras=False``: the pipeline
    uncompiled. ``fit``: per rank, whether the caches fit free memory (``memory.free_bytes`` replaced: a huge or
    a zero free size, as on CUDA). ``device="cuda"``: rank r on GPU r (the reference on GPU 0); latents and caches
    come back on the CPU."""
    import rascompile
    from rascompile import RASConfig
    from tests.support.context_parallel import enable_ulysses

    results = {}
    for family in families:
        pipe, call = pipeline_and_call(family)
        if device == "cuda":
            pipe.to(f"cuda:{info.rank}")
        if info.distributed:
            enable_ulysses(pipe.transformer, degree=info.world_size, **(parallel or {}))
        result = results[family] = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if not ras:
                with torch.no_grad():
                    result["latents"] = pipe(**call)[0].cpu()
                continue
            config = RASConfig(
                num_inference_steps=STEPS, sample_ratio=0.5, scheduler_start_step=2, error_reset_steps=(4,),
                keep_caches=True,
            )  # fmt: skip
            backend = rascompile.apply(pipe, config, inner_backend="aot_eager")
            free = None if fit is None else (1 << 50 if fit[info.rank] else 0)
            if fit is None:
                result["latents"] = pipe(**call)[0].cpu()
            else:
                with mock.patch("rascompile.runtime.memory.free_bytes", return_value=free):
                    result["latents"] = pipe(**call)[0].cpu()
        result["warnings"] = [str(w.message) for w in caught if "rascompile" in str(w.message)]
        result["status"] = backend.status(pipe.transformer)
        graph = backend.graphs[0] if backend.graphs else None
        control = getattr(graph, "controller", None)
        result["decisions"] = [] if control is None else [(d.kind, _cpu(d.active_idx)) for d in control.history]
        sets = [] if control is None else [control.cache_sets[key] for key in sorted(control.cache_sets, key=str)]
        result["kv"] = [[t.cpu().clone() for t in s.kv] for s in sets]
    return results


def _cpu(tensor):
    return None if tensor is None else tensor.cpu()


def heads_first(cache: torch.Tensor, heads: int, tokens: int) -> torch.Tensor:
    """A single-process K/V cache as [B, H, N, D], the layout attention reads (a rank's cache is written there, after
    the all-to-all; one process may cache the same rows earlier: [B, N, H, D] or [B, N, H * D])."""
    if cache.dim() == 3:
        cache = cache.unflatten(-1, (heads, -1))
    return cache.transpose(1, 2) if cache.shape[1] == tokens and cache.shape[2] == heads else cache
