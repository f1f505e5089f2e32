"""The GPU suite's ``context_parallel`` stage: RAS under Ulysses context parallelism on the device's GPUs (NCCL, one
rank per GPU) against one process, or on two CPU processes (gloo) in the dry run."""

from __future__ import annotations

import torch

from tests.support.context_parallel import run_ranks, run_reference
from tests.support.context_parallel_ras import heads_first, ras_generation_worker


def check_context_parallel_on(device: str, check, timeout: float, families=("flux",)) -> dict:
    """Run ``families`` on 2 ranks and in one process; ``check(name, ok, detail)`` each comparison. Returns the
    figures (relative error of the latents, decisions equal, cache shards equal) per family."""
    backend = "nccl" if device == "cuda" else "gloo"
    reference = run_reference(ras_generation_worker, families=families, device=device)
    ranks = run_ranks(
        ras_generation_worker, families=families, device=device, world_size=2, timeout=timeout, backend=backend
    )
    figures = {}
    for family in families:
        want = reference[family]
        errors, same_decisions, same_caches = [], True, True
        for rank, result in enumerate(r[family] for r in ranks):
            got = result
            errors.append(((got["latents"] - want["latents"]).abs().max() / want["latents"].abs().max()).item())
            same_decisions &= [k for k, _ in got["decisions"]] == [k for k, _ in want["decisions"]] and all(
                (a is None and b is None) or torch.equal(a, b)
                for (_, a), (_, b) in zip(got["decisions"], want["decisions"])
            )
            for shards, caches in zip(got["kv"], want["kv"]):
                for shard, cache in zip(shards, caches):
                    cache = heads_first(cache, heads=2 * shard.shape[1], tokens=shard.shape[2])
                    part = cache[:, rank * shard.shape[1] : (rank + 1) * shard.shape[1]]
                    same_caches &= shard.shape == part.shape and torch.allclose(shard, part, rtol=1e-5, atol=1e-5)
        ras_steps = [k for k, _ in want["decisions"]].count("ras")
        check(f"{family}: 2 ranks equal one process", max(errors) <= 1e-5, f"max relative error {max(errors):.2e}")
        check(f"{family}: same decisions on every rank", same_decisions and ras_steps > 0, f"{ras_steps} RAS steps")
        check(f"{family}: each rank's K/V caches are its heads of one process's", same_caches, "")
        figures[family] = {"max_relative_error": max(errors), "ras_steps": ras_steps, "caches_equal": same_caches}
    return figures
