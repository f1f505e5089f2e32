"""retarget_token_region: token-count literals, position tables and masks follow the k active tokens."""

import operator

import pytest

from rascompile.passes import ops
from rascompile.passes.context import RewriteError
from rascompile.passes.graph_utils import is_sdpa
from rascompile.passes.normalize_attention_args import sdpa_argument
from tests.support.passes import (
    ACTIVE_IDX,
    TinyDiT,
    TinyFoldedVideoDiT,
    assert_ras_matches_dense,
    calls,
    capture,
    node,
    run_until,
)

PASS = "retarget_token_region"


def _count(gm):
    """The active-token count node: ``ras_active_idx.size(1)``."""
    (count,) = [u for u in node(gm, ACTIVE_IDX).users if u.op == "call_method" and u.target == "size"]
    return count


def _views(gm):
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("view", "reshape")]


def test_token_count_literals_become_the_active_count_where_tokens_are_active():
    gm, _ = capture(TinyDiT(literal=True))
    before, _ = run_until(gm, PASS, before=True)
    assert [v.args[2:] for v in _views(before)][:4] == [(16, 2, 4)] * 3 + [(16, 8)]
    out, _ = run_until(gm, PASS)
    count = _count(out)
    query_view, key_view, value_view, merge_heads, unpatchify = _views(out)
    assert query_view.args[2:] == (count, 2, 4)  # the query's k active tokens
    assert key_view.args[2:] == value_view.args[2:] == (16, 2, 4)  # keys and values come from the N-token caches
    assert merge_heads.args[2:] == (count, 8)
    assert unpatchify.args[2:] == (16, 4, 4)  # after the merge: left alone (16 output channels, not tokens)


def test_a_position_table_is_gathered_once_for_every_block():
    gm, _ = capture(TinyDiT(table=True, blocks=3))
    out, _ = run_until(gm, PASS)
    (gather,) = calls(out, ops.gather_position_table)
    table, idx, axis, ndim = gather.args
    assert (table.op, idx.name, axis, ndim) == ("placeholder", ACTIVE_IDX, 1, 3)
    assert "table" in table.name
    readers = list(gather.users)
    assert len(readers) == 3 and all(r.target.__name__ == "add" for r in readers)
    assert not [u for u in table.users if u is not gather]  # no block reads the whole table any more


@pytest.mark.parametrize("kv_cache, axes", [(True, [2]), (False, [2, 3])])
def test_mask_rows_and_columns_of_active_tokens_are_gathered(kv_cache, axes):
    gm, _ = capture(TinyDiT(mask=True, call="keyword"))
    out, _ = run_until(gm, PASS, kv_cache=kv_cache)
    (attention,) = [n for n in out.graph.nodes if is_sdpa(n)]
    gathers = calls(out, ops.gather_position_table)
    # rows of the active queries; the columns too when the keys are the active tokens only (no K/V cache)
    assert [g.args[2:] for g in gathers] == [(axis, 4) for axis in axes]
    assert gathers[0].args[0].op == "placeholder" and "mask" in gathers[0].args[0].name
    for first, second in zip(gathers, gathers[1:]):
        assert second.args[0] is first
    assert sdpa_argument(attention, "attn_mask") is gathers[-1]


def test_token_axes_are_recorded_on_the_region_nodes():
    gm, _ = capture(TinyDiT())
    out, _ = run_until(gm, PASS)
    (attention,) = [n for n in out.graph.nodes if is_sdpa(n)]
    query = sdpa_argument(attention, "query")
    assert query.meta["ras_token_axis"] == 2 and attention.meta["ras_token_axis"] == 2
    assert "ras_token_axis" not in sdpa_argument(attention, "key").meta  # all N cached keys: no active axis
    (merge,) = calls(out, ops.merge_output)
    assert merge.args[1].meta["ras_token_axis"] == 1 and "ras_token_axis" not in merge.meta


@pytest.mark.parametrize(
    "options", [{"literal": True}, {"table": True, "blocks": 2}, {"mask": True, "call": "mixed"}, {"text": True}]
)
def test_the_retargeted_graph_reproduces_dense_at_every_k(options):
    gm, inputs = capture(TinyDiT(**options))
    out, _ = run_until(gm, PASS)
    assert_ras_matches_dense(gm, inputs, out, ks=(1, 5, 15))


def test_a_squeeze_of_the_token_axis_stays_a_no_op_with_one_active_token():
    gm, inputs = capture(TinyDiT(squeeze=True))
    out, ctx = run_until(gm, PASS)
    (squeeze,) = [n for n in out.graph.nodes if n.op == "call_method" and n.target == "squeeze"]
    assert squeeze.args[1] == ()
    assert [r.kind for r in ctx.records].count("squeeze") == 1
    assert_ras_matches_dense(gm, inputs, out, ks=(1, 5, 15))


@pytest.mark.parametrize(
    "options, reason",
    [
        ({"mix": "mean"}, "reduces or reorders along the token axis"),
        ({"mix": "gram"}, "contracts over the token axis"),
        ({"causal": True}, "causal attention over image tokens"),
        ({"call": "none"}, "no attention reads the image tokens"),
        ({"leak": True}, "graph output .* carries active tokens only"),
    ],
)
def test_what_would_mix_or_leak_active_tokens_is_refused(options, reason):
    gm, _ = capture(TinyDiT(**options))
    with pytest.raises(RewriteError, match=reason):
        run_until(gm, PASS, kv_cache=False)


def test_a_token_axis_fused_with_the_batch_follows_the_active_tokens():
    """Latte's temporal blocks: ``[B*N, F, C]`` (row b*N + n) from spatial tokens whose frames are folded into the
    batch; the B*N literal becomes B*k, the per-item, per-site table is gathered at rows b*N + idx[b], and the
    graph reproduces dense at every k (the table differs per item and per site, so a wrong row shows)."""
    gm, inputs = capture(TinyFoldedVideoDiT())
    before, _ = run_until(gm, PASS, before=True)
    assert [v.args[1:] for v in _views(before) if 50 in v.args[1:]] == [(50, 1, 8), (50, 3, -1)]  # table, sites
    out, ctx = run_until(gm, PASS)
    assert [v.args[1:] for v in _views(out) if 50 in v.args[1:]] == [(50, 1, 8)]  # the table stays dense
    (sites,) = [v for v in _views(out) if any(getattr(a, "target", None) is operator.mul for a in v.args[1:])]
    assert sites.args[1].args == (_count(out), 2)
    assert len(calls(out, ops.gather_fused_rows)) == 1
    assert "fused_table" in [r.kind for r in ctx.records]
    assert_ras_matches_dense(gm, inputs, out, ks=(1, 5, 24))


def test_a_token_axis_fused_with_the_batch_token_major_is_refused():
    gm, _ = capture(TinyFoldedVideoDiT(fold="token-major"))
    with pytest.raises(RewriteError, match="merges the token axis with another axis"):
        run_until(gm, PASS)
