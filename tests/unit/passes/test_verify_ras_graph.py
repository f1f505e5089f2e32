"""verify_ras_graph: the rewritten graph propagates at k = 1, N - 1 and N with dense output shapes; dead code goes."""

import operator

import pytest

from rascompile.passes import ops
from rascompile.passes.context import RewriteError
from tests.support.passes import (
    ACTIVE_IDX,
    TinyDiT,
    assert_ras_matches_dense,
    calls,
    capture,
    fact,
    node,
    run_pass,
    run_until,
)

PASS = "verify_ras_graph"


def _before(options=None, **settings):
    gm, inputs = capture(TinyDiT(**(options or {})))
    out, ctx = run_until(gm, PASS, before=True, **settings)
    return gm, inputs, out, ctx


def _count_nodes(gm):
    return [u for u in node(gm, ACTIVE_IDX).users if u.op == "call_method" and u.target == "size"]


def test_a_correct_graph_passes_and_still_reproduces_dense():
    gm, inputs, out, ctx = _before({"literal": True, "table": True, "mask": True})
    out = run_pass(out, ctx, PASS)
    out.graph.lint()
    assert_ras_matches_dense(gm, inputs, out, ks=(2, 15))


def test_dead_nodes_go_and_nodes_that_write_into_caches_stay():
    _, _, out, ctx = _before()
    (count,) = _count_nodes(out)
    assert not count.users  # no literal followed k in this model: the count is dead
    (update, _) = calls(out, ops.update_kv_cache)
    with out.graph.inserting_after(update):
        dead = out.graph.call_function(operator.add, (update, 1.0))
        unused_write = out.graph.call_function(ops.update_kv_cache, update.args)
    unused_write.meta["ras_impure"] = True
    out = run_pass(out, ctx, PASS)
    names = {n.name for n in out.graph.nodes}
    assert count.name not in names and dead.name not in names
    assert unused_write.name in names
    assert len(calls(out, ops.update_kv_cache)) == 3 and len(calls(out, ops.merge_output)) == 1


def test_a_graph_that_only_works_at_the_probe_count_is_refused():
    _, _, out, ctx = _before({"literal": True})
    probe = fact(ctx, "probe_tokens")
    count = _count_nodes(out)[0]
    (view,) = [u for u in count.users if u.target == "view"]  # the query's head split, made relative to k
    view.args = tuple(probe if a is count else a for a in view.args)  # as if the literal had been left at k
    out.recompile()
    with pytest.raises(RewriteError, match=r"with 1 active tokens"):
        run_pass(out, ctx, PASS)


def test_an_output_that_is_not_the_dense_shape_is_refused():
    _, _, out, ctx = _before()
    (gather,) = calls(out, ops.gather_tokens)
    output = next(n for n in out.graph.nodes if n.op == "output")
    output.args = (tuple(output.args[0]) + (gather,),)  # the active tokens handed out: [B, k, C], not [B, N, C]
    out.recompile()
    with pytest.raises(RewriteError, match=r"with 1 active tokens the outputs are .*\(2, 1, 8\).* dense outputs"):
        run_pass(out, ctx, PASS)
