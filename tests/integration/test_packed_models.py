"""DiTs with packed latents [B, N, C] through the passes, checked by the model-agnostic invariants: Flux.1 (RoPE
over the joint [text; image] sequence, single-stream blocks; also through the real FluxPipeline, with and
without true CFG), Qwen-Image (per-stream RoPE, a text mask over the joint keys) and FLUX.2 called with float
position ids (a second floating input of the tokens' shape)."""

import warnings

import pytest
import torch

from rascompile.passes.pipeline import build_ras_graph
from rascompile.runtime.registry import controllers_of
from tests.support.capture import capture_pipeline_graph, run_ras_step
from tests.support.models import (
    flux_call_kwargs,
    qwen_image_call_kwargs,
    tiny_flux_pipeline,
    tiny_qwen_image_transformer,
)

STEPS = 8
OPTIONS = dict(
    num_inference_steps=STEPS,
    scheduler_start_step=2,
    error_reset_steps=(5,),
    sample_ratio=0.5,
    inner_backend="aot_eager",
)


def _capture_call(model, kwargs):
    graphs = []

    def backend(gm, example_inputs, **_):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(**kwargs)
    torch._dynamo.reset()
    return graphs[0]


def _flux2_float_ids():
    """FLUX.2 with ``img_ids`` and ``txt_ids`` passed as floats (its pipeline passes int64): the ids then have the
    latents' floating [B, N, C] shape too; the latents are the input ``x_embedder`` projects."""
    from tests.support.models_image import flux2_call_kwargs, tiny_flux2_transformer

    kwargs = flux2_call_kwargs()
    kwargs.update(img_ids=kwargs["img_ids"].float(), txt_ids=kwargs["txt_ids"].float())
    return _capture_call(tiny_flux2_transformer(), kwargs)


CAPTURES = {
    "flux": lambda: capture_pipeline_graph(tiny_flux_pipeline(), flux_call_kwargs()),
    "qwen-image": lambda: _capture_call(tiny_qwen_image_transformer(), qwen_image_call_kwargs()),
    "flux2-float-ids": _flux2_float_ids,
}


@pytest.fixture(scope="module", params=sorted(CAPTURES))
def rewritten(request):
    gm, inputs = CAPTURES[request.param]()
    ras, _, ctx = build_ras_graph(gm)
    with torch.no_grad():
        dense = gm(*inputs)[0]
    return ras, ctx, inputs, dense


@pytest.fixture(scope="module")
def flux_rewritten():
    gm, inputs = CAPTURES["flux"]()
    return build_ras_graph(gm)


def test_flux_graph_is_rewritten_with_packed_latents_and_joint_caches(flux_rewritten):
    _, _, ctx = flux_rewritten
    assert ctx.latent_layout == "packed" and ctx.num_tokens == 64 and ctx.batch_size == 2
    kinds = [r.kind for r in ctx.records]
    assert "joint_table" in kinds, "RoPE over [text; image] follows the active tokens"
    # the double-stream block caches its joint keys/values (RoPE applied after the concatenation); the
    # single-stream block its joint projections (text and image concatenated before the projection)
    assert kinds.count("kv_joint") == 4
    assert all(s.shape[s.axis] == 64 for s in ctx.kv_slots), "caches hold the 64 image rows, none of the 5 text rows"


def test_packed_latents_are_found(rewritten):
    _, ctx, _, _ = rewritten
    assert ctx.latent_layout == "packed" and ctx.num_tokens == 64 and ctx.batch_size == 2


def test_capture_step_equals_dense(rewritten):
    ras, ctx, inputs, dense = rewritten
    n, b = ctx.num_tokens, ctx.batch_size
    out, _, _ = run_ras_step(ras, ctx, inputs, torch.arange(n).expand(b, n).contiguous())
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)


def test_permuted_tokens_equal_dense(rewritten):
    ras, ctx, inputs, dense = rewritten
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(ctx.num_tokens, generator=g) for _ in range(ctx.batch_size)])
    out, _, _ = run_ras_step(ras, ctx, inputs, idx)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 16, 63])
def test_subset_on_unchanged_inputs_reuses_caches(rewritten, k):
    ras, ctx, inputs, dense = rewritten
    n, b = ctx.num_tokens, ctx.batch_size
    _, output_cache, kv = run_ras_step(ras, ctx, inputs, torch.arange(n).expand(b, n).contiguous())
    g = torch.Generator().manual_seed(k)
    idx = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b)])
    out = run_ras_step(ras, ctx, inputs, idx, output_cache, kv)[0]
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("true_cfg", [False, True], ids=["guidance-distilled", "true-cfg"])
def test_flux_pipeline_runs_ras(true_cfg):
    """A whole generation through FluxPipeline runs RAS steps with k < N (true CFG: one call per branch)."""
    pipe = tiny_flux_pipeline()
    with torch.no_grad():
        dense = pipe(**flux_call_kwargs(true_cfg=true_cfg))[0]
    pipe = tiny_flux_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = pipe(**flux_call_kwargs(true_cfg=true_cfg))[0]
    assert not [str(w.message) for w in caught if "rascompile" in str(w.message)]
    (control,) = controllers_of(pipe.transformer)
    kinds = [d.kind for d in control.history]
    assert kinds == ["capture", "capture", "ras", "ras", "ras", "capture", "ras", "ras"]
    assert all(d.num_active < 64 for d in control.history if d.kind == "ras")
    assert control.cache_peak_branches == (2 if true_cfg else 1)
    assert torch.isfinite(got).all()
    # RAS approximates the dense generation: close, but not the same
    assert 0 < (got - dense).abs().max() < 0.5 * dense.abs().max()


def test_qwen_image_text_mask_takes_effect():
    """The invariants above run with a padded text mask; it must matter, or they would not test its handling."""
    model = tiny_qwen_image_transformer()
    with torch.no_grad():
        padded = model(**qwen_image_call_kwargs(padded_text=True))[0]
        full = model(**qwen_image_call_kwargs(padded_text=False))[0]
    assert (padded - full).abs().max() > 1e-3


def test_graph_snapshot(rewritten, request):
    """A canonical summary of each rewritten graph; a diffusers or torch upgrade that changes it fails here.

    Regenerate with RASCOMPILE_UPDATE_SNAPSHOTS=1 after reading the diff.
    """
    import os
    from pathlib import Path

    from rascompile.passes.snapshot import graph_summary

    _, ctx, _, _ = rewritten
    name = request.node.callspec.params["rewritten"]
    path = Path(__file__).parents[1] / "support" / "snapshots" / f"{name}.txt"
    if os.environ.get("RASCOMPILE_UPDATE_SNAPSHOTS"):
        path.write_text(graph_summary(ctx))
    assert graph_summary(ctx) == path.read_text(), f"rewritten graph of {name} changed; diff against {path}"
