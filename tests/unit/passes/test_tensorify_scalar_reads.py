"""tensorify_scalar_reads: ``x * s.item()`` becomes ``x * s.reshape(())`` when the read only scales tensors."""

import operator

import torch
import torch.fx

from rascompile.passes.tensorify_scalar_reads import tensorify_scalar_reads
from tests.support.passes import make_context


def _traced(fn, *inputs):
    """``fn`` traced by torch.fx, each node's example value recorded as Dynamo records it."""
    gm = torch.fx.symbolic_trace(fn)

    class Record(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            node.meta["example_value"] = value
            return value

    Record(gm).run(*inputs)
    return gm


def _reads(gm):
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "item"]


def test_a_scale_read_becomes_a_zero_dim_tensor_and_the_graph_serves_every_value():
    def lora(x, w, scale):
        return x + (x @ w) * scale.item() - x / scale.item()

    x, w = torch.randn(2, 5, 4), torch.randn(4, 4)
    gm = _traced(lora, x, w, torch.tensor(0.5, dtype=torch.float64))
    ctx = make_context()
    out = tensorify_scalar_reads(gm, ctx)
    assert not _reads(out)
    assert [r.kind for r in ctx.records] == ["scalar_read", "scalar_read"]
    for value in (0.5, 1.25, -3.0):  # the scale stays an input: no value is baked in
        scale = torch.tensor(value, dtype=torch.float64)
        result = out(x, w, scale)
        assert result.dtype == torch.float32
        torch.testing.assert_close(result, lora(x, w, scale), rtol=0, atol=0)


def test_reads_that_feed_anything_else_stay():
    def used_as_python(x, scale):
        s = scale.item()
        return x * s, x.new_zeros(3) + operator.mul(s, 2.0)

    def scales_a_zero_dim(t, scale):  # a 0-d tensor times a 0-d float64 tensor would promote to float64
        return t * scale.item()

    def integer(x, count):
        return x * count.item()

    for fn, inputs in [
        (used_as_python, (torch.randn(2, 3), torch.tensor(0.5))),
        (scales_a_zero_dim, (torch.tensor(2.0), torch.tensor(0.5, dtype=torch.float64))),
        (integer, (torch.randn(2, 3), torch.tensor(3))),
    ]:
        gm = _traced(fn, *inputs)
        assert _reads(tensorify_scalar_reads(gm, make_context())), fn.__name__
