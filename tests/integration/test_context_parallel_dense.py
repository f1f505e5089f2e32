"""diffusers' Ulysses context parallelism on 2 CPU processes (gloo) equals the single-process forward.

Groundwork for RAS under context parallelism: the dense (uncompiled, eager) forward of each family's tiny
transformer after ``enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`` gathers to the output of the
same seeded model in one process. The two ranks run once for all three families (one spawn: the imports dominate).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.support.context_parallel import FAMILIES, dense_forward_worker, run_ranks, run_reference

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

WORLD_SIZE = 2
RTOL = 1e-5


@pytest.fixture(scope="module")
def outputs():
    reference = run_reference(dense_forward_worker)
    ranks = run_ranks(dense_forward_worker, world_size=WORLD_SIZE, timeout=120.0)
    return reference, ranks


@pytest.mark.parametrize("family", FAMILIES)
def test_ulysses_forward_equals_single_process(outputs, family):
    reference, ranks = outputs
    expected = reference[family]["out"]
    for rank, result in enumerate(ranks):
        got = result[family]["out"]
        assert got.shape == expected.shape, f"rank {rank}"
        error = (got - expected).abs().max().item() / expected.abs().max().item()
        assert error <= RTOL, f"{family} rank {rank}: max |diff| / max |ref| = {error:.3g}"
    # The output is all-gathered: every rank holds the same tensor.
    assert torch.equal(ranks[0][family]["out"], ranks[1][family]["out"])
    # And the model really ran sharded: proj_out saw half of the image tokens on each rank.
    full = reference[family]["proj_out_tokens"]
    assert [r[family]["proj_out_tokens"] for r in ranks] == [full // WORLD_SIZE] * WORLD_SIZE
