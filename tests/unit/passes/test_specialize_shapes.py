"""specialize_shapes: a graph Dynamo traced with symbolic sizes becomes a static graph for one call's inputs."""

import pytest
import torch

from rascompile.passes.context import RewriteError
from rascompile.passes.graph_utils import example_value
from rascompile.passes.specialize_shapes import has_symbolic_shapes, specialize_shapes
from tests.support.passes import (
    TinyDiT,
    assert_ras_matches_dense,
    capture,
    capture_dynamic,
    fact,
    graph_signature,
    placeholders,
    run_all,
)


@pytest.fixture(scope="module")
def dynamic():
    """The dynamic graph of TinyDiT traced at 8 x 8, and the graph inputs of calls at 8 x 8 and 12 x 12."""
    model = TinyDiT()
    x, timestep = model.inputs()
    gm, inputs8 = capture_dynamic(model, x, timestep)
    x12 = torch.randn(2, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    _, inputs12 = capture_dynamic(model, x12, timestep)
    torch._dynamo.reset()
    return model, gm, {8: (inputs8, (x, timestep)), 12: (inputs12, (x12, timestep))}


def _symbolic(value):
    return isinstance(value, torch.SymInt) or (
        isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape)
    )


def test_the_traced_graph_is_symbolic(dynamic):
    _, gm, _ = dynamic
    assert has_symbolic_shapes(gm)
    assert [isinstance(example_value(p), torch.SymInt) for p in placeholders(gm)][:2] == [True, True]


@pytest.mark.parametrize("size", [8, 12])
def test_every_size_becomes_concrete_and_the_calling_convention_stays(dynamic, size):
    model, gm, calls_at = dynamic
    inputs, model_inputs = calls_at[size]
    static = specialize_shapes(gm, inputs)
    assert not has_symbolic_shapes(static)
    assert [p.name for p in placeholders(static)] == [p.name for p in placeholders(gm)]
    batch, height = (example_value(p) for p in placeholders(static)[:2])
    assert (batch, height) == (2, size) and all(not placeholders(static)[i].users for i in (0, 1))
    sizes = {p.name for p in placeholders(gm) if isinstance(example_value(p), torch.SymInt)}
    assert len(sizes) == 2
    for n in static.graph.nodes:
        assert not _symbolic(example_value(n)), n.name
        assert not {a.name for a in n.all_input_nodes} & sizes, n.name  # sizes are literals now
    assert not [n for n in static.graph.nodes if n.op == "call_function" and "floordiv" in str(n.target)]
    with torch.no_grad():
        torch.testing.assert_close(static(*inputs)[0], model(*model_inputs), rtol=0, atol=0)


def test_the_dynamic_graph_is_left_as_it_was(dynamic):
    _, gm, calls_at = dynamic
    before = graph_signature(gm)
    specialize_shapes(gm, calls_at[12][0])
    assert graph_signature(gm) == before and has_symbolic_shapes(gm)


def test_the_specialised_graph_goes_through_the_ras_passes_at_its_resolution(dynamic):
    _, gm, calls_at = dynamic
    inputs, _ = calls_at[12]
    static = specialize_shapes(gm, inputs)
    ras, ctx = run_all(static)
    assert fact(ctx, "num_tokens") == 36 and tuple(fact(ctx, "latent_hw")) == (12, 12)
    assert_ras_matches_dense(static, inputs, ras, ks=(1, 20))


def test_a_call_with_another_number_of_inputs_is_refused(dynamic):
    _, gm, calls_at = dynamic
    inputs, _ = calls_at[8]
    with pytest.raises(RewriteError, match=f"graph has {len(inputs)} inputs, call has {len(inputs) - 1}"):
        specialize_shapes(gm, inputs[:-1])


def test_a_static_graph_has_no_symbolic_shapes():
    gm, _ = capture(TinyDiT())
    assert not has_symbolic_shapes(gm)
