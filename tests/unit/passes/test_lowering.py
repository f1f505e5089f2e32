"""lower_for_export (passes/export/lowering.py): constants inlined, portable ops, complex RoPE in real arithmetic."""

import pytest
import torch

from rascompile.passes.export import portable_ops
from rascompile.passes.export.lowering import PORTABLE, ExportError
from tests.support.passes import (
    TinyDiT,
    all_tokens,
    calls,
    capture,
    dense,
    lower,
    placeholders,
    run_all,
    run_graph,
    subset,
    zero_caches,
)


def _targets(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def test_parameters_and_buffers_become_constants_of_the_graph():
    gm, inputs = capture(TinyDiT(mask=True))
    lowered, runtime = lower(gm, inputs)
    assert [p.name for p in placeholders(lowered)] == ["l_x_", "l_timestep_"]
    assert len(runtime) == 2
    attrs = [n for n in lowered.graph.nodes if n.op == "get_attr"]
    assert len(attrs) == len(inputs) - 2
    for attr in attrs:
        original = attr.target.removeprefix("const_")
        value = inputs[[p.name for p in placeholders(gm)].index(original)]
        assert torch.equal(getattr(lowered, attr.target), value)
    torch.testing.assert_close(lowered(*runtime)[0], dense(gm, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"text": True}])
def test_the_ops_the_passes_insert_are_swapped_for_portable_ones(options):
    gm, inputs = capture(TinyDiT(**options))
    ras, _ = run_all(gm)
    used = {op: len(calls(ras, op)) for op in PORTABLE if calls(ras, op)}
    assert used and sum(used.values()) >= 3  # the output merge and the key and value caches
    lowered, _ = lower(ras, inputs)
    assert not _targets(lowered) & set(PORTABLE)
    assert {PORTABLE[op]: n for op, n in used.items()} == {
        PORTABLE[op]: len(calls(lowered, PORTABLE[op])) for op in used
    }


@pytest.mark.parametrize("options", [{}, {"text": True}, {"rope": "complex"}])
def test_a_lowered_ras_step_equals_the_ras_step_and_writes_the_same_caches(options):
    gm, inputs = capture(TinyDiT(**options))
    ras, _ = run_all(gm)
    lowered, runtime = lower(ras, inputs)
    results = []
    for graph, args in ((ras, inputs), (lowered, runtime)):
        output_cache, kv = zero_caches(ras)
        run_graph(graph, args, all_tokens(2, 16), output_cache, kv)
        out = run_graph(graph, args, subset(2, 16, 5), output_cache, kv)[0]
        results.append((out, output_cache, kv))
    (out, output_cache, kv), (low_out, low_output_cache, low_kv) = results
    torch.testing.assert_close(low_out, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(low_output_cache, output_cache, rtol=1e-5, atol=1e-6)
    for a, b in zip(low_kv, kv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(low_out, dense(gm, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rewrite", [False, True])
def test_complex_rope_becomes_real_arithmetic_over_real_tables(rewrite):
    gm, inputs = capture(TinyDiT(rope="complex"))
    graph = run_all(gm)[0] if rewrite else gm
    lowered, runtime = lower(graph, inputs)
    assert not _targets(lowered) & {torch.view_as_complex, torch.view_as_real}
    assert len(calls(lowered, portable_ops.rope_real)) == 2  # the query and the key
    for n in lowered.graph.nodes:
        if n.op == "get_attr" and n.users:
            assert not getattr(lowered, n.target).is_complex(), n.name
    if not rewrite:
        torch.testing.assert_close(lowered(*runtime)[0], dense(gm, inputs), rtol=1e-5, atol=1e-6)


class ComplexProduct(torch.nn.Module):
    """Patch tokens multiplied as complex numbers by a tensor computed from them: no RoPE table, no constant."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, 8, 2, stride=2)
        self.proj = torch.nn.Linear(8, 16)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        z = torch.view_as_complex(tokens.reshape(2, 16, 4, 2).contiguous())
        tokens = torch.view_as_real(z * z.conj()).flatten(2)
        return self.proj(tokens)


def test_complex_arithmetic_other_than_rope_is_refused():
    gm, inputs = capture(ComplexProduct(), torch.randn(2, 4, 8, 8))
    with pytest.raises(ExportError, match="complex arithmetic other than RoPE"):
        lower(gm, inputs)
