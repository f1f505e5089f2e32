"""functionalize_inplace_writes: writes into token tensors become out-of-place ops with the same values."""

import operator

import pytest
import torch

from rascompile.passes import ops
from rascompile.passes.context import RewriteError
from tests.support.passes import TinyDiT, calls, capture, dense, fact, node, order, run_graph, run_until

PASS = "functionalize_inplace_writes"


def _in_place_methods(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_method" and n.target.endswith("_")]


def _methods(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == name]


def test_setitem_into_a_fresh_buffer_becomes_setitem_copy():
    gm, inputs = capture(TinyDiT(write="setitem", blocks=2))
    assert len(calls(gm, operator.setitem)) == 4  # two halves in each of two blocks
    out, _ = run_until(gm, PASS)
    assert not calls(out, operator.setitem)
    copies = calls(out, ops.setitem_copy)
    assert len(copies) == 4
    # each copy writes into the previous one: zeros_like -> first half -> second half -> the query
    for first, second in zip(copies[::2], copies[1::2]):
        assert second.args[0] is first and calls(out, "zeros_like").count(first.args[0]) == 1
        assert [u.target for u in second.users] and first.users.keys() == {second}
    torch.testing.assert_close(run_graph(out, inputs)[0], dense(gm, inputs), rtol=0, atol=0)


def test_an_in_place_method_becomes_its_out_of_place_twin_read_by_every_later_user():
    gm, inputs = capture(TinyDiT(write="add_"))
    (write,) = _methods(gm, "add_")
    written = write.args[0]
    later = {u.name for u in written.users if u is not write}
    out, _ = run_until(gm, PASS)
    assert "add_" not in _in_place_methods(out)
    (copy,) = _methods(out, "add")
    assert copy.args[0].name == written.name and copy.args[1:] == (0.5,)
    assert later and {u.name for u in copy.users} == later  # the block's projection reads the written copy
    assert order(out)[copy] < min(order(out)[u] for u in copy.users)
    torch.testing.assert_close(run_graph(out, inputs)[0], dense(gm, inputs), rtol=0, atol=0)


def test_a_write_that_is_the_token_source_moves_the_token_source_to_the_copy():
    gm, inputs = capture(TinyDiT(write="tokens"))
    before, ctx_before = run_until(gm, PASS, before=True)
    assert node(before, fact(ctx_before, "token_source")).target == "mul_"
    out, ctx = run_until(gm, PASS)
    source = node(out, fact(ctx, "token_source"))
    assert (source.op, source.target, source.meta["ras_dense_shape"]) == ("call_method", "mul", (2, 16, 8))
    torch.testing.assert_close(run_graph(out, inputs)[0], dense(gm, inputs), rtol=0, atol=0)


def test_a_write_the_latents_never_reach_is_left_alone():
    gm, _ = capture(TinyDiT(write="timestep"))
    out, _ = run_until(gm, PASS)
    assert _in_place_methods(out) == ["add_"]
    assert not _methods(out, "add")


def test_a_write_into_storage_another_view_reads_later_is_refused():
    gm, _ = capture(TinyDiT(write="alias"))
    with pytest.raises(RewriteError, match=r"in-place mul_ into storage that .* reads afterwards"):
        run_until(gm, PASS)


def test_a_write_into_a_graph_input_is_refused():
    gm, _ = capture(TinyDiT(write="input"))
    with pytest.raises(RewriteError, match=r"in-place mul_ into storage that .*a graph input or constant"):
        run_until(gm, PASS)
