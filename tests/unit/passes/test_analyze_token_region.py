"""analyze_token_region: records the token region's axes and joint-sequence image rows, and changes nothing."""

import pytest
import torch

from rascompile.passes.context import RewriteError
from rascompile.passes.graph_utils import is_sdpa
from tests.support.passes import TEXT, TinyDiT, capture, run_until

PASS = "analyze_token_region"


def _nodes(gm, predicate):
    return [n for n in gm.graph.nodes if n.op == "call_function" and predicate(n)]


def test_records_token_axes_and_leaves_the_graph_alone():
    gm, _ = capture(TinyDiT(blocks=2))
    before, _ = run_until(gm, PASS, before=True)
    after, ctx = run_until(gm, PASS)
    assert after.code == before.code, "an analysis pass must not change the graph"
    axes = ctx.token_region.axes
    attentions = _nodes(after, is_sdpa)
    assert len(attentions) == 2
    # SDPA works on [B, heads, k, head_dim]: the active tokens are on axis 2
    assert all(axes[a.name] == 2 for a in attentions)
    # the final projection sees [B, k, C] tokens
    proj = _nodes(after, lambda n: n.target is torch.nn.functional.linear)[-1]
    assert axes[proj.name] == 1
    # image-only sequences: the image rows start at row 0 everywhere
    assert set(ctx.token_region.image_offsets.values()) == {0}


class SingleStreamDiT(torch.nn.Module):
    """Text and image tokens joined before the projections, [text; image] (Flux's single-stream blocks)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, 8, 2, stride=2)
        self.qkv = torch.nn.Linear(8, 24)
        self.proj = torch.nn.Linear(8, 16)

    def forward(self, x, text):
        b = x.shape[0]
        tokens = torch.cat([text, self.embed(x).flatten(2).transpose(1, 2)], dim=1)
        q, k, v = (t.view(b, -1, 2, 4).transpose(1, 2) for t in self.qkv(tokens).chunk(3, dim=-1))
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, 8)
        image = (tokens + attended)[:, TEXT:]
        return self.proj(image).transpose(1, 2).reshape(b, 16, 4, 4)


def test_a_joint_sequence_records_where_its_image_rows_start():
    gm, _ = capture(SingleStreamDiT(), torch.randn(2, 4, 8, 8), torch.randn(2, TEXT, 8))
    after, ctx = run_until(gm, PASS)
    (join,) = _nodes(after, lambda n: n.target is torch.cat)
    (attention,) = _nodes(after, is_sdpa)
    offsets, axes = ctx.token_region.image_offsets, ctx.token_region.axes
    assert (offsets[join.name], axes[join.name]) == (TEXT, 1)  # [B, TEXT + k, C]: image rows after the text
    assert (offsets[attention.name], axes[attention.name]) == (TEXT, 2)  # [B, heads, TEXT + k, head_dim]
    proj = _nodes(after, lambda n: n.target is torch.nn.functional.linear)[-1]
    assert offsets[proj.name] == 0, "after the split the image rows start at 0"


def test_skipped_without_kv_caches():
    gm, _ = capture(TinyDiT())
    _, ctx = run_until(gm, PASS, kv_cache=False)
    assert ctx.token_region is None


def test_refuses_a_mean_over_tokens():
    gm, _ = capture(TinyDiT(mix="mean"))
    run_until(gm, PASS, before=True)  # the earlier passes accept the graph: the refusal is this pass's
    with pytest.raises(RewriteError, match="token"):
        run_until(gm, PASS)
