"""gather_active_tokens: the active tokens [B, k, C] are gathered right after the token source."""

import pytest
import torch

from rascompile.passes import ops
from rascompile.passes.context import RewriteError
from tests.support.passes import (
    ACTIVE_IDX,
    WIDTH,
    TinyDiT,
    added_placeholders,
    all_tokens,
    calls,
    capture,
    dense,
    fact,
    node,
    order,
    permutation,
    placeholders,
    run_graph,
    run_until,
)

PASS = "gather_active_tokens"


def _source_and_users(gm):
    """The token source of the graph before the pass, and the names of the nodes that read it."""
    before, ctx = run_until(gm, PASS, before=True)
    source = node(before, fact(ctx, "token_source"))
    return source.name, {u.name for u in source.users}


def test_an_active_index_placeholder_and_its_count_are_added():
    gm, _ = capture(TinyDiT())
    out, ctx = run_until(gm, PASS)
    assert added_placeholders(out) == {ACTIVE_IDX: ((2, 9), torch.int64)}  # k = N // 2 + 1 while rewriting
    idx = placeholders(out)[-1]
    assert idx.name == ACTIVE_IDX and len(placeholders(out)) == len(placeholders(gm)) + 1
    (count,) = [u for u in idx.users if u.op == "call_method" and u.target == "size"]
    assert count.args == (idx, 1) and count.meta.get("ras_managed")
    assert fact(ctx, "probe_tokens") == 9


def test_the_gather_replaces_every_use_of_the_token_source():
    gm, _ = capture(TinyDiT(blocks=2))
    source_name, readers = _source_and_users(gm)
    out, _ = run_until(gm, PASS)
    (gather,) = calls(out, ops.gather_tokens)
    source = node(out, source_name)
    assert gather.args == (source, node(out, ACTIVE_IDX), 1)
    assert list(source.users) == [gather]
    assert {u.name for u in gather.users} == readers
    assert order(out)[gather] == order(out)[source] + 1  # right after the source
    assert gather.meta["ras_dense_shape"] == source.meta["ras_dense_shape"] == (2, 16, WIDTH)


def test_the_probe_token_count_setting_is_used():
    gm, _ = capture(TinyDiT())
    out, ctx = run_until(gm, PASS, probe_tokens=5)
    assert added_placeholders(out)[ACTIVE_IDX] == ((2, 5), torch.int64)


def test_all_tokens_give_the_dense_outputs_and_a_permutation_permutes_them():
    gm, inputs = capture(TinyDiT(blocks=2, call="keyword"))
    out, _ = run_until(gm, PASS)
    expected = dense(gm, inputs)  # [B, 16, 4, 4]: one pixel per token
    torch.testing.assert_close(run_graph(out, inputs, all_tokens(2, 16))[0], expected, rtol=0, atol=0)
    p = permutation(2, 16)
    # no position table and no mask: the blocks commute with a permutation of the tokens
    permuted = expected.flatten(2).gather(2, p[:, None, :].expand(-1, expected.shape[1], -1)).view_as(expected)
    torch.testing.assert_close(run_graph(out, inputs, p)[0], permuted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("probe", [1, 16, 40])
def test_a_probe_count_outside_two_to_n_minus_one_is_refused(probe):
    gm, _ = capture(TinyDiT())
    with pytest.raises(RewriteError, match=r"probe token count .* outside \[2, 15\]"):
        run_until(gm, PASS, probe_tokens=probe)


def test_fewer_than_four_tokens_are_refused():
    model = TinyDiT()
    gm, _ = capture(model, torch.randn(2, 4, 2, 6), torch.rand(2))  # 1 x 3 patches
    with pytest.raises(RewriteError, match="only 3 image tokens"):
        run_until(gm, PASS)
