"""unshard_ulysses and shard_ulysses on real graphs of diffusers' Ulysses context parallelism, in one process.

torch's fake process group (``torch.testing._internal.distributed.fake_pg``) lets Dynamo trace a rank's graph of a
tiny Flux, Wan and Qwen-Image transformer with ``enable_parallelism(ulysses_degree=2)`` without a second process:
the collectives are in the graph, never run. The two-process runs are in
tests/integration/test_context_parallel_ras.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rascompile.passes import parallel_ops
from rascompile.passes.context import PassContext
from rascompile.passes.graph_utils import copy_graph_module, is_sdpa, record_dense_shapes
from rascompile.passes.pipeline import build_ras_graph
from rascompile.passes.unshard_ulysses import has_collectives, unshard_ulysses
from rascompile.runtime import parallel
from tests.support.context_parallel import FAMILIES, build_family, enable_ulysses

fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg", reason="torch has no fake process group")


@pytest.fixture(scope="module")
def rank_graphs():
    """``{family: (dynamo graph of rank 0, example inputs, the same model's output in one process)}``."""
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=2)
    try:
        graphs = {}
        for family in FAMILIES:
            model, call = build_family(family)
            with torch.no_grad():
                expected = model(**call)[0]
            enable_ulysses(model, degree=2)
            parallel.prepare_for_compile(model)
            captured = []

            def grab(gm, example_inputs, captured=captured):
                captured.append((gm, example_inputs))
                return gm.forward

            with torch.no_grad():
                torch.compile(model, backend=grab, fullgraph=True, dynamic=False)(**call)
            graphs[family] = (*captured[0], expected)
        yield graphs
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_unsharded_graph_is_the_model_in_one_process(rank_graphs, family):
    gm, example_inputs, expected = rank_graphs[family]
    assert has_collectives(gm)
    record_dense_shapes(gm)
    ctx = PassContext()
    out = unshard_ulysses(copy_graph_module(gm), ctx)
    assert not has_collectives(out)
    assert (ctx.context_parallel.degree, ctx.context_parallel.rank) == (2, 0)
    nodes = list(out.graph.nodes)
    assert sum(n.meta.get("ras_cp_gather") is not None for n in nodes) == 1
    assert sum(n.meta.get("ras_cp_shard") is not None for n in nodes) >= 1
    attentions = [n for n in nodes if is_sdpa(n)]
    assert any(n.meta.get("ras_cp_attention") for n in attentions)
    with torch.no_grad():
        got = out(*example_inputs)[0]
    # every token, every head, in one process: the model's own output without parallelism
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_ras_step_takes_a_slice_of_the_active_list_and_caches_its_heads(rank_graphs, family):
    gm, _, _ = rank_graphs[family]
    ras, signature, ctx = build_ras_graph(gm)
    assert signature.token_multiple == 2 and signature.parallel_group is not None
    calls = [n.target for n in ras.graph.nodes if n.op == "call_function"]
    attentions = sum(bool(n.meta.get("ras_cp_attention")) for n in ras.graph.nodes if is_sdpa(n))
    assert calls.count(parallel_ops.heads_to_ranks) >= 3 * attentions > 0  # q, and k and v before their caches
    assert calls.count(parallel_ops.rows_to_ranks) == attentions
    assert calls.count(parallel_ops.gather_rows) == 1
    assert parallel_ops.rank_slice in calls
    # the caches hold one rank's heads: [B, H / 2, N, D]
    assert ctx.kv_slots and all(s.shape[1] == 1 and s.shape[2] == ctx.num_tokens for s in ctx.kv_slots)
    # the cache writes and the output merge read the whole active list; everything else this rank's slice
    idx = next(n for n in ras.graph.nodes if n.name == ctx.active_idx)
    full = {u.target.__name__ for u in idx.users}
    assert "rank_slice" in full and "merge_output" in full
    assert full <= {"rank_slice", "merge_output", "update_kv_cache", "update_joint_rows_cache", "_local_count",
                    "gather_tokens"}  # fmt: skip


def test_a_graph_without_collectives_is_left_alone():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    ctx = PassContext()
    assert unshard_ulysses(gm, ctx) is gm and ctx.context_parallel is None


def test_joint_rows_keep_the_text_once_and_every_rank_image_rows_in_rank_order():
    text, image = torch.arange(3.0), torch.arange(4.0)
    rank = [torch.cat([text, image[:2] + 10]), torch.cat([text, image[2:] + 10])]  # [text; this rank's image rows]
    x = torch.cat(rank)[None, None, :, None]  # heads_to_ranks' order: rank 0's rows, then rank 1's
    got = parallel_ops.joint_rows(x, 2, world=2, before=3, image=2)
    assert got.flatten().tolist() == [0, 1, 2, 10, 11, 12, 13]


def test_rank_slice_is_the_ranks_chunk_of_the_list():
    idx = torch.tensor([[5, 1, 7, 3]])
    assert parallel_ops.rank_slice(idx, 1, 1, 2).tolist() == [[7, 3]]
