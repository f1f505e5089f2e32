"""The pass pipeline on the Dynamo graphs of the tiny SD3 and Lumina-Next transformers."""

import os
from pathlib import Path

import pytest
import torch

from rascompile.passes.context import RewriteError
from rascompile.passes.pipeline import RAS_PASSES, build_ras_graph
from rascompile.passes.signature import step_signature
from rascompile.passes.snapshot import graph_summary
from tests.support.capture import capture_graph, capture_pipeline_graph, run_ras_step
from tests.support.models import lumina_call_kwargs, sd3_call_kwargs, tiny_lumina_pipeline, tiny_sd3_pipeline
from tests.support.synthetic import TokenPoolingDiT

SNAPSHOTS = Path(__file__).parents[1] / "support" / "snapshots"
MODELS = {
    "sd3": (tiny_sd3_pipeline, sd3_call_kwargs),
    "lumina": (tiny_lumina_pipeline, lumina_call_kwargs),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def captured(request):
    build, kwargs = MODELS[request.param]
    gm, inputs = capture_pipeline_graph(build(), kwargs())
    return request.param, gm, inputs


def test_graph_snapshot(captured):
    """A canonical summary of each rewritten graph; a diffusers or torch upgrade that changes it fails here.

    Regenerate with RASCOMPILE_UPDATE_SNAPSHOTS=1 after reading the diff.
    """
    name, gm, _ = captured
    _, _, ctx = build_ras_graph(gm)
    summary = graph_summary(ctx)
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get("RASCOMPILE_UPDATE_SNAPSHOTS"):
        path.write_text(summary)
    assert summary == path.read_text(), f"rewritten graph of {name} changed; diff against {path}"


def test_every_attention_over_image_keys_is_cached(captured):
    name, gm, _ = captured
    _, _, ctx = build_ras_graph(gm)
    attentions = {s.attention for s in ctx.kv_slots}
    # SD3: one joint attention per block; Lumina-Next: self-attention (attn1) per block, attn2 sees text only.
    expected = {
        "sd3": {"transformer_blocks.0.attn", "transformer_blocks.1.attn"},
        "lumina": {"layers.0.attn1", "layers.1.attn1"},
    }[name]
    assert attentions == expected
    assert sorted(s.kind for s in ctx.kv_slots) == ["key", "key", "value", "value"]


def _rewritten(captured):
    """(RAS graph, its context, the graph inputs, the dense graph's output)."""
    _, gm, inputs = captured
    ras, _, ctx = build_ras_graph(gm)
    with torch.no_grad():
        dense = gm(*inputs)[0]
    return ras, ctx, inputs, dense


def test_all_tokens_in_order_equal_dense(captured):
    """k = N with the identity index is the dense step that fills the caches: same output as the graph."""
    ras, ctx, inputs, dense = _rewritten(captured)
    n, b = ctx.num_tokens, ctx.batch_size
    out, _, kv = run_ras_step(ras, ctx, inputs, torch.arange(n).expand(b, n).contiguous())
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)
    assert all(bool(c.abs().sum() > 0) for c in kv), "the dense step must fill every K/V cache"


def test_permuted_tokens_equal_dense(captured):
    """Every token active but in a different order per row: position tables and masks must follow the tokens."""
    ras, ctx, inputs, dense = _rewritten(captured)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(ctx.num_tokens, generator=g) for _ in range(ctx.batch_size)])
    out, _, _ = run_ras_step(ras, ctx, inputs, idx)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_subset_on_unchanged_inputs_reuses_cache(captured):
    """After a dense step, a RAS step on the same inputs reproduces the dense output exactly."""
    ras, ctx, inputs, dense = _rewritten(captured)
    n, b = ctx.num_tokens, ctx.batch_size
    _, output_cache, kv = run_ras_step(ras, ctx, inputs, torch.arange(n).expand(b, n).contiguous())
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(n, generator=g)[: n // 3].sort().values for _ in range(b)])
    with torch.no_grad():
        out = ras(*step_signature(ras, ctx).bind(inputs, idx, output_cache, kv))[0]
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_token_mixing_is_refused():
    gm, _ = capture_graph(TokenPoolingDiT(), torch.randn(2, 4, 8, 8))
    with pytest.raises(RewriteError, match="token axis"):
        build_ras_graph(gm)


def test_no_image_input_is_refused():
    gm, _ = capture_graph(torch.nn.Linear(4, 4), torch.randn(2, 4))
    with pytest.raises(RewriteError, match="no image-token source"):
        build_ras_graph(gm)


def test_graph_dumps_before_and_after_every_pass(captured, tmp_path):
    _, gm, _ = captured
    build_ras_graph(gm, dump_dir=str(tmp_path))
    names = sorted(p.name for p in tmp_path.iterdir())
    last = len(RAS_PASSES.passes) - 1
    assert len(names) == 2 * (last + 1) and names[0] == "00_unshard_ulysses.after.py"
    assert "ras_active_idx" in (tmp_path / f"{last:02d}_verify_ras_graph.after.py").read_text()
    assert "ras_active_idx" not in (tmp_path / "03_find_token_source.before.py").read_text()
