"""scatter_output: the final projection's fresh rows are merged with the output cache before unpatchify."""

import pytest
import torch
import torch.nn.functional as F

from rascompile.passes import ops
from rascompile.passes.context import RewriteError, module_path
from rascompile.passes.graph_utils import is_linear
from tests.support.passes import (
    ACTIVE_IDX,
    OUTPUT_CACHE,
    WIDTH,
    TinyDiT,
    TinyPackedDiT,
    TinyRowsDiT,
    added_placeholders,
    all_tokens,
    assert_ras_matches_dense,
    calls,
    capture,
    dense,
    order,
    placeholders,
    run_graph,
    run_until,
    subset,
)

PASS = "scatter_output"


def _tokens(image):
    """[B, 16, 4, 4] TinyDiT output -> its [B, N, 16] token rows."""
    return image.flatten(2).transpose(1, 2)


def test_an_output_cache_placeholder_of_the_projections_shape_is_added():
    gm, _ = capture(TinyDiT())
    out, _ = run_until(gm, PASS)
    added = added_placeholders(out)
    assert list(added) == [ACTIVE_IDX, OUTPUT_CACHE]
    assert added[OUTPUT_CACHE] == ((2, 16, 16), torch.float32)
    assert placeholders(out)[-1].name == OUTPUT_CACHE


def test_the_last_token_wise_linear_is_merged_and_its_readers_read_the_merge():
    gm, _ = capture(TinyDiT(blocks=2))
    out, _ = run_until(gm, PASS)
    (merge,) = calls(out, ops.merge_output)
    cache, projection, idx = merge.args
    assert (cache.name, idx.name) == (OUTPUT_CACHE, ACTIVE_IDX)
    # the blocks' output projections are [B, N, C] linears too: the merge goes after the last one, ``proj``
    assert module_path(projection) == "proj" and projection.target is F.linear
    assert list(projection.users) == [merge] and order(out)[merge] == order(out)[projection] + 1
    assert merge.users and all(module_path(u) != "proj" for u in merge.users)
    assert merge.meta.get("ras_impure") and merge.meta["ras_dense_shape"] == (2, 16, 16)


def test_all_tokens_give_the_dense_outputs_and_fill_the_cache():
    gm, inputs = capture(TinyDiT())
    out, _ = run_graph_and_cache(gm, inputs, all_tokens(2, 16))
    expected = dense(gm, inputs)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(out[1], _tokens(expected), rtol=0, atol=0)


def run_graph_and_cache(gm, inputs, idx, cache=None):
    out, _ = run_until(gm, PASS)
    cache = torch.zeros(2, 16, 16) if cache is None else cache
    return (run_graph(out, inputs, idx, output_cache=cache)[0], cache), out


def test_rows_outside_the_active_tokens_come_from_the_cache():
    gm, inputs = capture(TinyDiT())
    idx = subset(2, 16, 5)
    sentinel = torch.full((2, 16, 16), 7.0)
    (image, cache), _ = run_graph_and_cache(gm, inputs, idx, sentinel)
    rows = _tokens(image)
    active = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(rows[~active], torch.full_like(rows[~active], 7.0))
    assert not torch.isclose(rows[active], torch.tensor(7.0)).any()
    torch.testing.assert_close(cache, rows, rtol=0, atol=0)  # the cache now holds every token's last output


def test_a_packed_model_returns_the_merge_itself():
    gm, inputs = capture(TinyPackedDiT())
    out, _ = run_until(gm, PASS)
    (merge,) = calls(out, ops.merge_output)
    output = next(n for n in out.graph.nodes if n.op == "output")
    assert merge in output.all_input_nodes
    assert added_placeholders(out)[OUTPUT_CACHE] == ((2, 16, 16), torch.float32)
    torch.testing.assert_close(run_graph(out, inputs, all_tokens(2, 16))[0], dense(gm, inputs), rtol=0, atol=0)


class MatmulHead(torch.nn.Module):
    """Attention straight over the patch tokens, and a final projection written as a matmul: no linear at all."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, WIDTH, 2, stride=2)
        self.weight = torch.nn.Parameter(torch.randn(WIDTH, 16))

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        heads = tokens.unflatten(2, (2, 4)).transpose(1, 2)
        tokens = tokens + F.scaled_dot_product_attention(heads, heads, heads).transpose(1, 2).flatten(2)
        return tokens @ self.weight


def test_a_model_without_a_token_wise_linear_is_refused():
    gm, _ = capture(MatmulHead(), torch.randn(2, 4, 8, 8))
    run_until(gm, PASS, before=True)  # the passes before it apply: the refusal is this pass's
    with pytest.raises(RewriteError, match="no final projection"):
        run_until(gm, PASS)


def test_a_joint_output_taken_apart_row_by_row_merges_its_image_rows():
    """Z-Image: the final linear's ``[B, N + L, C]`` output (image rows first) is unbound and each row's ``[:N]``
    unpatchified; its first k rows merge with the output cache and the sequence leaves at its dense length."""
    gm, inputs = capture(TinyRowsDiT())
    out, _ = run_until(gm, PASS)
    (merge,) = calls(out, ops.merge_joint_output)
    assert is_linear(merge.args[1])
    assert added_placeholders(out)[OUTPUT_CACHE][0] == (2, 16, 16)
    ras, _ = run_until(gm, "verify_ras_graph")
    assert_ras_matches_dense(gm, inputs, ras, ks=(1, 5, 15))
