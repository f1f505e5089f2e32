"""normalize_attention_args: every attention call reads (query, key, value) positionally, the rest by name."""

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from rascompile.passes.context import RewriteError
from rascompile.passes.graph_utils import is_sdpa
from tests.support.passes import TinyDiT, capture, graph_signature, run_graph, run_until

PASS = "normalize_attention_args"


def _attention(gm):
    (node,) = [n for n in gm.graph.nodes if is_sdpa(n)]
    return node


def _named(node):
    """Arguments of an attention node by parameter name, as node names or values."""
    params = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    given = {**dict(zip(params, node.args)), **node.kwargs}
    return {k: (v.name if isinstance(v, torch.fx.Node) else v) for k, v in given.items()}


@pytest.mark.parametrize(
    "call, keywords",
    [
        ("positional", {"attn_mask": "l_self_buffers_mask_", "dropout_p": 0.0, "is_causal": False}),
        ("keyword", {"attn_mask": "l_self_buffers_mask_", "dropout_p": 0.0, "is_causal": False}),
        ("mixed", {"attn_mask": "l_self_buffers_mask_", "scale": 0.5}),
    ],
)
def test_query_key_value_become_positional_and_the_rest_keywords(call, keywords):
    gm, _ = capture(TinyDiT(call=call, mask=True))
    before = _named(_attention(gm))
    out, _ = run_until(gm, PASS)
    node = _attention(out)
    assert [a.name for a in node.args] == [before["query"], before["key"], before["value"]]
    assert all(isinstance(a, torch.fx.Node) for a in node.args)
    mask = node.kwargs["attn_mask"]
    assert mask.op == "placeholder" and "mask" in mask.name
    assert {k: (v.name if isinstance(v, torch.fx.Node) else v) for k, v in node.kwargs.items()} == {
        k: (before[k] if k == "attn_mask" else v) for k, v in keywords.items()
    }


def test_every_attention_node_is_normalized_and_nothing_else_changes():
    gm, _ = capture(TinyDiT(call="keyword", blocks=2))
    out, _ = run_until(gm, PASS)
    attention = [n for n in out.graph.nodes if is_sdpa(n)]
    assert len(attention) == 2
    for node in attention:
        assert len(node.args) == 3 and not {"query", "key", "value"} & set(node.kwargs)
    others = [s for s, n in zip(graph_signature(out), out.graph.nodes) if not is_sdpa(n)]
    assert others == [s for s, n in zip(graph_signature(gm), gm.graph.nodes) if not is_sdpa(n)]


@pytest.mark.parametrize("call", ["positional", "keyword", "mixed"])
def test_the_normalized_graph_computes_what_the_dense_graph_computes(call):
    gm, inputs = capture(TinyDiT(call=call, mask=True))
    out, _ = run_until(gm, PASS)
    assert out is not gm
    torch.testing.assert_close(run_graph(out, inputs)[0], gm(*inputs)[0], rtol=0, atol=0)


def _hand_built(args, kwargs):
    """A graph whose one attention call takes ``args`` (placeholder names) and ``kwargs`` as given."""
    graph = torch.fx.Graph()
    values = {name: graph.placeholder(name) for name in ("q", "k", "v", "m")}
    load = lambda a: values.get(a, a) if isinstance(a, str) else a  # noqa: E731
    attention = graph.call_function(
        F.scaled_dot_product_attention, tuple(map(load, args)), {k: load(v) for k, v in kwargs.items()}
    )
    graph.output(attention)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize(
    "args, kwargs, reason",
    [
        (("q", "k", "v"), {"bogus": 1}, "unexpected attention argument 'bogus'"),
        (("q", "k"), {"key": "v"}, "unexpected attention argument 'key'"),  # given twice
        (("q", "k"), {}, "attention without value"),
        (("q", "k", "v", "m", 0.0, False, 1.0, False, None), {}, "more positional arguments"),
    ],
)
def test_calls_attention_cannot_take_are_refused(args, kwargs, reason):
    with pytest.raises(RewriteError, match=reason):
        run_until(_hand_built(args, kwargs), PASS)


def test_a_hand_built_keyword_call_is_put_in_order():
    gm = _hand_built((), {"value": "v", "attn_mask": "m", "key": "k", "query": "q"})
    out, _ = run_until(gm, PASS)
    node = _attention(out)
    assert [a.name for a in node.args] == ["q", "k", "v"] and node.kwargs == {"attn_mask": node.kwargs["attn_mask"]}
    assert node.kwargs["attn_mask"].name == "m"
    q, k, v = (torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    m = torch.randn(1, 1, 5, 5)
    torch.testing.assert_close(out(q, k, v, m), F.scaled_dot_product_attention(q, k, v, m), rtol=0, atol=0)
