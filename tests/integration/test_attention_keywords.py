"""Attention and reductions called with keyword arguments, as diffusers' attention dispatcher calls them."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from rascompile.passes.context import RewriteError
from rascompile.passes.pipeline import build_ras_graph
from tests.support.capture import capture_graph, run_ras_step
from tests.support.synthetic import KeywordAttentionDiT


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_keyword_attention_is_rewritten_and_keeps_the_invariants(with_mask):
    model = KeywordAttentionDiT(with_mask=with_mask)
    x = torch.randn(2, 4, 8, 8)
    gm, inputs = capture_graph(model, x)
    ras, _, ctx = build_ras_graph(gm)
    assert [s.kind for s in ctx.kv_slots] == ["key", "value"]
    if with_mask:
        assert any(r.kind == "mask" for r in ctx.records), "the mask rows must follow the active queries"
    with torch.no_grad():
        dense = gm(*inputs)[0]
    n, b = ctx.num_tokens, ctx.batch_size
    everything = torch.arange(n).expand(b, n).contiguous()
    out, output_cache, kv = run_ras_step(ras, ctx, inputs, everything)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)  # a capture step equals dense
    g = torch.Generator().manual_seed(0)
    permuted = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    torch.testing.assert_close(run_ras_step(ras, ctx, inputs, permuted)[0], dense, rtol=1e-5, atol=1e-5)
    _, output_cache, kv = run_ras_step(ras, ctx, inputs, everything)
    subset = torch.stack([torch.randperm(n, generator=g)[: n // 3].sort().values for _ in range(b)])
    reused = run_ras_step(ras, ctx, inputs, subset, output_cache, kv)[0]
    torch.testing.assert_close(reused, dense, rtol=1e-5, atol=1e-5)  # the caches hold what dense computes


def test_keyword_attention_runs_ras_through_torch_compile():
    model = KeywordAttentionDiT()
    options = {"num_inference_steps": 4, "scheduler_start_step": 1, "error_reset_steps": (), "inner_backend": "eager"}
    compiled = torch.compile(model, backend="ras", options=options)
    x = torch.randn(2, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense fallback
        with torch.no_grad():
            out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


class KeywordPoolingDiT(torch.nn.Module):
    """Adds ``torch.mean(input=tokens, dim=1)``: a reduction over tokens written with keywords."""

    def __init__(self, reduction):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, 8, 2, stride=2)
        self.block = torch.nn.Linear(8, 8)
        self.proj = torch.nn.Linear(8, 16)
        self.reduction = reduction

    def forward(self, x):
        h = self.block(self.embed(x).flatten(2).transpose(1, 2))
        h = h + self.reduction(h)
        q, k, v = h.unsqueeze(1), h.unsqueeze(1), h.unsqueeze(1)
        h = h + F.scaled_dot_product_attention(query=q, key=k, value=v).squeeze(1)
        out = self.proj(h)
        return out.transpose(1, 2).reshape(x.shape[0], 16, x.shape[2] // 2, x.shape[3] // 2)


@pytest.mark.parametrize(
    "reduction",
    [
        lambda h: torch.mean(input=h, dim=1, keepdim=True),
        lambda h: torch.sum(h, keepdim=True, dim=-2),
        lambda h: torch.roll(h, 1, dims=1),
        lambda h: torch.roll(input=h, shifts=1, dims=(1,)),
        lambda h: torch.cumsum(input=h, dim=1),
        lambda h: torch.matmul(input=torch.ones(1, 16), other=h).expand_as(h),
    ],
    ids=["mean", "sum", "roll", "roll-input", "cumsum", "matmul"],
)
def test_reductions_over_tokens_by_keyword_are_refused(reduction):
    gm, _ = capture_graph(KeywordPoolingDiT(reduction), torch.randn(2, 4, 8, 8))
    with pytest.raises(RewriteError, match="token axis|mixes|reduces"):
        build_ras_graph(gm)


def test_reductions_over_channels_by_keyword_are_allowed():
    model = KeywordPoolingDiT(lambda h: torch.mean(input=h, dim=-1, keepdim=True))
    gm, inputs = capture_graph(model, torch.randn(2, 4, 8, 8))
    ras, _, ctx = build_ras_graph(gm)
    n, b = ctx.num_tokens, ctx.batch_size
    g = torch.Generator().manual_seed(0)
    permuted = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    with torch.no_grad():
        dense = gm(*inputs)[0]
    torch.testing.assert_close(run_ras_step(ras, ctx, inputs, permuted)[0], dense, rtol=1e-5, atol=1e-5)
