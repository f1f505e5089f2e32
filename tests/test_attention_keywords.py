"""Attention and reductions called with keyword arguments, as diffusers' attention dispatcher calls them."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from rascompile.passes import RewriteError, build_ras_graph
from test_passes import _capture, _run_ras


class KeywordAttentionDiT(torch.nn.Module):
    """Patch embedding, one attention block calling SDPA with keywords (and a mask over image tokens), a
    final projection: the shape of ``dispatch_attention_fn``'s call in Flux, Wan, Qwen-Image, LTX, ..."""

    def __init__(self, num_tokens: int = 16, with_mask: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = torch.nn.Conv2d(4, 24, 2, stride=2)
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(24, 24) for _ in range(3))
        self.proj = torch.nn.Linear(24, 12)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        bias = torch.randn(1, 1, num_tokens, num_tokens, generator=g) if with_mask else None
        self.register_buffer("bias", bias)

    def forward(self, x):
        b, _, h, w = x.shape
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = (f(tokens).view(b, -1, 3, 8).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        attended = F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=self.bias, dropout_p=0.0)
        tokens = tokens + attended.transpose(1, 2).reshape(b, -1, 24)
        out = self.proj(tokens)
        return out.transpose(1, 2).reshape(b, 12, h // 2, w // 2)


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_keyword_attention_is_rewritten_and_keeps_the_invariants(with_mask):
    model = KeywordAttentionDiT(with_mask=with_mask)
    x = torch.randn(2, 4, 8, 8)
    gm, inputs = _capture(model, x)
    ras, ctx = build_ras_graph(gm)
    assert [s.kind for s in ctx.kv_slots] == ["key", "value"]
    if with_mask:
        assert any(line.startswith("mask:") for line in ctx.log), "the mask rows must follow the active queries"
    with torch.no_grad():
        dense = gm(*inputs)[0]
    n, b = ctx.num_tokens, ctx.batch_size
    everything = torch.arange(n).expand(b, n).contiguous()
    out, output_cache, kv = _run_ras(ras, ctx, inputs, everything)
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)  # a capture step equals dense
    g = torch.Generator().manual_seed(0)
    permuted = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    torch.testing.assert_close(_run_ras(ras, ctx, inputs, permuted)[0], dense, rtol=1e-5, atol=1e-5)
    _, output_cache, kv = _run_ras(ras, ctx, inputs, everything)
    subset = torch.stack([torch.randperm(n, generator=g)[: n // 3].sort().values for _ in range(b)])
    with torch.no_grad():
        reused = ras(*inputs, subset, output_cache, *kv)[0]
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
    gm, _ = _capture(KeywordPoolingDiT(reduction), torch.randn(2, 4, 8, 8))
    with pytest.raises(RewriteError, match="token axis|mixes|reduces"):
        build_ras_graph(gm)


def test_reductions_over_channels_by_keyword_are_allowed():
    model = KeywordPoolingDiT(lambda h: torch.mean(input=h, dim=-1, keepdim=True))
    gm, inputs = _capture(model, torch.randn(2, 4, 8, 8))
    ras, ctx = build_ras_graph(gm)
    n, b = ctx.num_tokens, ctx.batch_size
    g = torch.Generator().manual_seed(0)
    permuted = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    with torch.no_grad():
        dense = gm(*inputs)[0]
    torch.testing.assert_close(_run_ras(ras, ctx, inputs, permuted)[0], dense, rtol=1e-5, atol=1e-5)
