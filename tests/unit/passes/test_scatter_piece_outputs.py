"""scatter_piece_outputs, and find_token_source's piece path: the pieces of a transformer that a graph break split
(the head hands its image tokens on at full width; a later piece takes them at the transformer's (B, N))."""

import pytest
import torch

from rascompile.passes.context import RewriteError
from rascompile.passes.pipeline import build_ras_graph
from tests.support.passes import BrokenDiT, TinyDiT, capture, fact, run_until


def _pieces():
    """The two Dynamo graphs of BrokenDiT (head: patch embedding and block 0; tail: block 1 and the projection)."""
    model = BrokenDiT().eval()
    graphs = []

    def record(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record)(*model.inputs())
    assert len(graphs) == 2
    return graphs


def _all_tokens(batch, n):
    return torch.arange(n).expand(batch, n).contiguous()


def test_the_head_hands_its_tokens_on_through_a_cache_at_full_width():
    (head, inputs), _ = _pieces()
    graph, ctx = run_until(head, "scatter_piece_outputs", piece_outputs=True)
    assert ctx.output_cache == "ras_output_cache" and ctx.output_cache_shape == (2, 16, 8)
    merged = [n for n in graph.graph.nodes if n.op == "call_function" and "merge_output" in str(n.target)]
    assert len(merged) == 1 and merged[0] in next(n for n in graph.graph.nodes if n.op == "output").all_input_nodes


def _capture_step(gm, rewrite, inputs, batch=2, n=16):
    """The dense output of ``gm`` and its RAS graph's step over all tokens on fresh caches: ``(dense, got, cache,
    kv)``."""
    ras, signature, ctx = rewrite
    with torch.no_grad():
        (dense,) = gm(*inputs)
        cache = torch.zeros(ctx.output_cache_shape)
        kv = [torch.zeros(s.shape) for s in signature.kv_caches]
        (got,) = ras(*signature.bind(inputs, _all_tokens(batch, n), cache, kv))
    return dense, got, cache, kv


def test_a_head_step_over_all_tokens_equals_dense_and_fills_the_cache():
    (head, inputs), _ = _pieces()
    dense, got, cache, _ = _capture_step(head, build_ras_graph(head, piece_outputs=True), inputs)
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache, dense, rtol=1e-6, atol=1e-6)


def test_a_later_piece_takes_the_input_of_the_transformers_token_count():
    _, (tail, inputs) = _pieces()
    with pytest.raises(RewriteError, match="no image-token source"):
        build_ras_graph(tail)  # on its own it has no latents
    _, ctx = run_until(tail, "find_token_source", piece_tokens=(2, 16))
    assert fact(ctx, "token_source") == fact(ctx, "latents") and fact(ctx, "num_tokens") == 16
    with pytest.raises(RewriteError, match="a \\[B, N, C\\] input of the transformer's 12 image tokens: none"):
        run_until(tail, "find_token_source", piece_tokens=(2, 12))


def test_a_piece_without_a_token_output_to_hand_on_is_refused():
    gm, _ = capture(TinyDiT())  # a whole model: its only output is the image
    with pytest.raises(RewriteError, match="image-token output to hand on; it hands its tokens on in another layout"):
        build_ras_graph(gm, piece_outputs=True)


class TwoOutputHead(TinyDiT):
    """A head that hands on two image-token tensors, as FirstBlockCache's first block does (its output and its
    residual)."""

    def forward(self, x, timestep, text=None):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.temb(timestep[:, None])[:, None, :]
        out = self.blocks[0](tokens, text, self.table, self.mask, self.freqs)
        return out, out - tokens


def test_each_token_output_crosses_through_its_own_cache():
    model = TwoOutputHead().eval()
    gm, inputs = capture(model)
    ras, signature, ctx = build_ras_graph(gm, piece_outputs=True)
    boundary = [c for c in signature.kv_caches if c.kind == "boundary"]
    assert ctx.output_cache == "ras_output_cache" and len(boundary) == 1
    assert [c.kind for c in signature.kv_caches][0] == "boundary"  # bound before the K/V caches
    with torch.no_grad():
        dense = gm(*inputs)
        cache = torch.zeros(ctx.output_cache_shape)
        kv = [torch.zeros(c.shape) for c in signature.kv_caches]
        got = ras(*signature.bind(inputs, _all_tokens(2, 16), cache, kv))
        torch.testing.assert_close(got[0], dense[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], dense[1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cache, dense[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kv[0], dense[1], rtol=1e-6, atol=1e-6)
        # a step over half the tokens on the same inputs: the fresh rows equal dense, the others come from the caches
        half = torch.arange(0, 16, 2).expand(2, 8).contiguous()
        again = ras(*signature.bind(inputs, half, cache, kv))
        torch.testing.assert_close(again[0], dense[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again[1], dense[1], rtol=1e-5, atol=1e-5)


class JointPiece(torch.nn.Module):
    """A piece that takes a joint sequence [B, 3 + 16, 8], text rows first, and hands it on after one attention
    block over all of it (Qwen-Image 2.1's body between its graph breaks)."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.out = torch.nn.Linear(8, 8)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, joint):
        b, s, _ = joint.shape
        q, k, v = (t.view(b, s, 2, 4).transpose(1, 2) for t in self.qkv(joint).chunk(3, dim=-1))
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 8)
        return (joint + self.out(attended),)


def _joint_piece():
    model = JointPiece().eval()
    joint = torch.randn(2, 19, 8, generator=torch.Generator().manual_seed(4))
    gm, inputs = capture(model, joint)
    position = next(i for i, v in enumerate(inputs) if tuple(v.shape) == (2, 19, 8))
    return gm, inputs, (position, 3)


def test_a_joint_sequence_piece_gathers_its_image_rows_and_hands_the_sequence_on_whole():
    gm, inputs, joint = _joint_piece()
    rewrite = build_ras_graph(gm, piece_tokens=(2, 16), piece_outputs=True, piece_joint=joint)
    ras, signature, ctx = rewrite
    assert ctx.num_tokens == 16 and ctx.output_cache_shape == (2, 16, 8)
    dense, full, cache, kv = _capture_step(gm, rewrite, inputs)
    torch.testing.assert_close(full, dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache, dense[:, 3:], rtol=1e-6, atol=1e-6)
    subset = torch.tensor([[1, 4, 9], [0, 7, 15]])
    with torch.no_grad():
        (again,) = ras(*signature.bind(inputs, subset, cache, kv))  # unchanged inputs: the caches give the rest
    torch.testing.assert_close(again, dense, rtol=1e-5, atol=1e-5)


def test_a_joint_sequence_that_cannot_hold_the_image_rows_is_refused():
    gm, _, (position, _) = _joint_piece()
    with pytest.raises(RewriteError, match="overflow"):
        build_ras_graph(gm, piece_tokens=(2, 16), piece_outputs=True, piece_joint=(position, 4))


class StorePiece(torch.nn.Module):
    """Writes its image tokens into the joint sequence it is given, in place, and returns nothing of them."""

    def forward(self, joint, tokens, text):
        joint[:, 3:] = tokens.to(joint.dtype)
        return (text * 2.0,)


def test_a_piece_that_only_stores_its_tokens_into_another_input_is_recognised():
    from rascompile.passes.find_token_source import stores_tokens_only
    from rascompile.passes.graph_utils import placeholders

    args = torch.zeros(2, 19, 8), torch.randn(2, 16, 8), torch.randn(2, 3, 8)
    gm, _ = capture(StorePiece(), *args)
    tokens = [i for i, n in enumerate(placeholders(gm)) if tuple(n.meta["example_value"].shape) == (2, 16, 8)]
    assert stores_tokens_only(gm, tokens)

    class Leaks(StorePiece):
        def forward(self, joint, tokens, text):
            joint[:, 3:] = tokens
            return (text * 2.0, tokens.mean(dim=1))

    gm, _ = capture(Leaks(), *args)
    tokens = [i for i, n in enumerate(placeholders(gm)) if tuple(n.meta["example_value"].shape) == (2, 16, 8)]
    assert not stores_tokens_only(gm, tokens)


class TwoInputPiece(torch.nn.Module):
    """A piece that takes two image-token tensors [B, 16, 8] (a block's residual beside its attention output)."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(8, 8)
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, residual, attended):
        h = residual + self.mix(attended)
        b, n, _ = h.shape
        q, k, v = (t.view(b, n, 2, 4).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        return (h + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 8),)


def test_a_piece_with_two_image_token_inputs_gathers_both_at_the_same_rows():
    g = torch.Generator().manual_seed(5)
    args = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g)
    gm, inputs = capture(TwoInputPiece().eval(), *args)
    rewrite = build_ras_graph(gm, piece_tokens=(2, 16), piece_outputs=True)
    ras, signature, ctx = rewrite
    assert len(ctx.more_token_sources) == 1
    dense, _, cache, kv = _capture_step(gm, rewrite, inputs)
    subset = torch.tensor([[2, 5, 11], [0, 8, 13]])
    with torch.no_grad():
        (got,) = ras(*signature.bind(inputs, subset, cache, kv))
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
