"""RAS under diffusers' Ulysses context parallelism: two gloo processes reproduce single-process RAS.

Each rank runs the same seeded pipeline with ``enable_parallelism(ContextParallelConfig(ulysses_degree=2))`` and
``rascompile.apply``; the single-process reference runs the same call without parallelism. Per family: the final
latents within fp32 rounding, the same decisions (kinds and active tokens, bit for bit), and each rank's K/V cache
its head slice of the single-process cache. Unsupported modes and a rank short of memory turn every rank dense.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from rascompile.runtime import parallel
from tests.support.context_parallel import run_ranks, run_reference
from tests.support.context_parallel_ras import CP_FAMILIES, heads_first, ras_generation_worker

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD = 2
TIMEOUT = 420.0


@pytest.fixture(scope="module")
def runs():
    return run_reference(ras_generation_worker), run_ranks(ras_generation_worker, world_size=WORLD, timeout=TIMEOUT)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("family", CP_FAMILIES)
def test_two_ranks_reproduce_single_process_ras(runs, family):
    reference, ranks = runs
    want = reference[family]
    assert "RAS over" in want["status"] and [kind for kind, _ in want["decisions"]].count("ras") >= 2
    for rank, result in enumerate(ranks):
        got = result[family]
        assert "RAS over" in got["status"] and not got["warnings"], (rank, got["status"], got["warnings"])
        assert _relative_error(got["latents"], want["latents"]) <= 1e-6
        assert len(got["decisions"]) == len(want["decisions"])
        for (kind, idx), (want_kind, want_idx) in zip(got["decisions"], want["decisions"]):
            assert kind == want_kind and (idx is None) == (want_idx is None)
            assert idx is None or torch.equal(idx, want_idx)
        # K/V caches hold this rank's heads of every image token: its slice of the single-process cache
        assert len(got["kv"]) == len(want["kv"]) > 0
        for shards, caches in zip(got["kv"], want["kv"]):
            assert len(shards) == len(caches) > 0
            for shard, cache in zip(shards, caches):
                cache = heads_first(cache, heads=WORLD * shard.shape[1], tokens=shard.shape[2])
                heads = shard.shape[1]
                assert shard.shape == (cache.shape[0], heads, *cache.shape[2:])
                torch.testing.assert_close(shard, cache[:, rank * heads : (rank + 1) * heads], rtol=1e-6, atol=1e-6)


def test_ulysses_anything_runs_dense_on_every_rank_and_says_why():
    families = ("flux",)
    dense = run_reference(ras_generation_worker, families=families, ras=False)["flux"]
    ranks = run_ranks(
        ras_generation_worker, families=families, parallel={"ulysses_anything": True}, world_size=WORLD, timeout=TIMEOUT
    )
    for result in (r["flux"] for r in ranks):
        assert result["decisions"] == []
        assert any("RAS is off" in w and "ulysses_anything" in w for w in result["warnings"]), result["warnings"]
        assert _relative_error(result["latents"], dense["latents"]) <= 1e-5


def test_a_rank_whose_caches_do_not_fit_turns_every_rank_dense():
    families = ("flux",)
    dense = run_reference(ras_generation_worker, families=families, ras=False)["flux"]
    ranks = run_ranks(ras_generation_worker, families=families, fit=(True, False), world_size=WORLD, timeout=TIMEOUT)
    for rank, result in enumerate(r["flux"] for r in ranks):
        assert {kind for kind, _ in result["decisions"]} == {"dense"}, result["decisions"]
        said = "another rank's caches do not fit" if rank == 0 else "the RAS caches of this generation need"
        assert any(said in w for w in result["warnings"]), (rank, result["warnings"])
        assert _relative_error(result["latents"], dense["latents"]) <= 1e-5


@pytest.mark.parametrize(
    "config, reason",
    [
        (dict(ring_degree=2, ulysses_degree=1), "ring attention"),
        (dict(ring_degree=2, ulysses_degree=2), "unified ring x Ulysses"),
        (dict(ring_degree=1, ulysses_degree=2, ulysses_anything=True), "ulysses_anything"),
        (dict(ring_degree=1, ulysses_degree=2), None),
    ],
)
def test_parallel_modes_ras_does_not_run_under_are_named(config, reason):
    model = torch.nn.Linear(2, 2)
    assert parallel.unsupported_reason(model) is None  # no context parallelism
    model._parallel_config = types.SimpleNamespace(context_parallel_config=types.SimpleNamespace(**config))
    got = parallel.unsupported_reason(model)
    assert got is None if reason is None else reason in got
