"""batch_row_loops: a joint sequence built row by row into a ``new_zeros`` buffer and an output unpatchified row by
row and stacked (Lumina-Image 2.0's forward, which Dynamo unrolls over the batch) become batched ops, so the RAS
rewrite applies; rows that place the image tokens at different offsets are refused with that reason."""

import pytest
import torch
import torch.nn.functional as F

from rascompile.passes.context import RewriteError
from rascompile.passes.pipeline import build_ras_graph
from tests.support.passes import _init_, all_tokens, calls, capture, dense, make_context, run_pass, run_step, run_until

PATCH, CHANNELS, SIDE, WIDTH, TEXT = 2, 4, 8, 8, 3
N = (SIDE // PATCH) ** 2


class RowJointDiT(torch.nn.Module):
    """Latents [B, 4, 8, 8], patch 2 (N = 16); text [B, 3, 8] of which row b keeps ``text_lengths[b]`` tokens;
    joint [text_b; image] written row by row into a zero buffer, one attention block over it, a projection, and a
    row-by-row unpatchify of each row's image rows, stacked."""

    def __init__(self, text_lengths=(2, 2)):
        super().__init__()
        self.text_lengths = list(text_lengths)
        self.embed = torch.nn.Linear(PATCH * PATCH * CHANNELS, WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = torch.nn.Linear(WIDTH, PATCH * PATCH * CHANNELS)
        _init_(self)

    def inputs(self):
        g = torch.Generator().manual_seed(1)
        batch = len(self.text_lengths)
        return torch.randn(batch, CHANNELS, SIDE, SIDE, generator=g), torch.randn(batch, TEXT, WIDTH, generator=g)

    def forward(self, latents, text):
        b, c, h, w = latents.shape
        p = PATCH
        tokens = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        tokens = self.embed(tokens)
        longest = max(self.text_lengths) + N
        joint = tokens.new_zeros(b, longest, WIDTH)
        for i, length in enumerate(self.text_lengths):
            joint[i, :length] = text[i, :length]
            joint[i, length : length + N] = tokens[i]
        q, k, v = (t.view(b, longest, 2, WIDTH // 2).transpose(1, 2) for t in self.qkv(joint).chunk(3, dim=-1))
        joint = joint + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, longest, WIDTH)
        out = self.proj(joint)
        rows = []
        for i, length in enumerate(self.text_lengths):
            rows.append(
                out[i][length : length + N]
                .view(h // p, w // p, p, p, c)
                .permute(4, 0, 2, 1, 3)
                .flatten(3, 4)
                .flatten(1, 2)
            )
        return (torch.stack(rows, dim=0),)


def _count_setitems(gm):
    return sum(n.op == "call_function" and n.target.__name__ == "setitem" for n in gm.graph.nodes)


def test_rows_written_alike_become_one_concatenation_and_rows_stacked_one_chain():
    model = RowJointDiT((2, 2))
    gm, inputs = capture(model)
    assert _count_setitems(gm) == 4 and calls(gm, torch.stack)
    batched, ctx = run_until(gm, "batch_row_loops")
    assert _count_setitems(batched) == 0 and not calls(batched, torch.stack)
    assert calls(batched, torch.cat)
    kinds = [r.kind for r in ctx.records if r.pass_name == "batch_row_loops"]
    assert kinds == ["row_writes", "row_stack"], kinds
    torch.testing.assert_close(dense(batched, inputs), dense(gm, inputs), rtol=0, atol=0)


def test_the_batched_graph_rewrites_and_a_step_over_all_tokens_equals_dense():
    model = RowJointDiT((2, 2))
    gm, inputs = capture(model)
    ras, _, ctx = build_ras_graph(gm)
    assert ctx.num_tokens == N
    got, _, _ = run_step(ras, inputs, all_tokens(2, N))
    torch.testing.assert_close(got, dense(gm, inputs), rtol=1e-5, atol=1e-5)


def test_a_step_over_a_subset_reproduces_dense_from_the_caches():
    model = RowJointDiT((1, 1))
    gm, inputs = capture(model)
    ras, _, _ = build_ras_graph(gm)
    expected = dense(gm, inputs)
    _, output_cache, kv = run_step(ras, inputs, all_tokens(2, N))
    subset = torch.tensor([[0, 3, 9], [2, 5, 15]])
    got, _, _ = run_step(ras, inputs, subset, output_cache, kv)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_image_rows_at_a_different_offset_in_each_row_are_refused_with_that_reason():
    gm, _ = capture(RowJointDiT((2, 1)))
    with pytest.raises(RewriteError, match=r"image tokens of each batch row at its own offset \(2, 1\)"):
        build_ras_graph(gm)


def test_rows_written_differently_without_image_tokens_are_left_as_written():
    class TextRows(torch.nn.Module):
        def forward(self, latents, text):
            buffer = text.new_zeros(2, TEXT, WIDTH)
            buffer[0, :2] = text[0, :2]
            buffer[1, :1] = text[1, :1]
            return (latents * 2.0, buffer)

    gm, _ = capture(TextRows(), *RowJointDiT().inputs())
    ctx = make_context()
    ctx.latents = next(n.name for n in gm.graph.nodes if n.op == "placeholder" and "latents" in n.name)
    assert _count_setitems(run_pass(gm, ctx, "batch_row_loops")) == 2
