"""Every model in tests/support/zoo.py through the passes, checked by the model-agnostic invariants.

For a model RAS applies to:
(a) a capture step (all N tokens active) equals the dense graph;
(b) a random permutation of all N tokens equals dense (position tables and masks follow the tokens);
(c) after a capture step, a RAS step with k < N tokens on unchanged inputs reproduces dense from the caches;
(d) a whole generation through the real pipeline runs RAS steps with k < N and stays finite; a pipeline that
    calls the transformer once per guidance branch gives what batched guidance gives.
For a model that runs dense: the passes refuse it with the reason the zoo states.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from rascompile.passes.context import RewriteError
from rascompile.passes.pipeline import build_ras_graph
from rascompile.passes.snapshot import graph_summary
from rascompile.runtime.origin import layer_reason
from rascompile.runtime.registry import controllers_of
from tests.support.capture import GraphCapture, run_ras_step
from tests.support.zoo import CASES, ROOT, supported_models_table

ZOO = [c for c in CASES if c.zoo_tests]
RAS_CASES = [c for c in ZOO if c.ras]
SNAPSHOTS = Path(__file__).parents[1] / "support" / "snapshots"
STEPS = 8
OPTIONS = dict(
    num_inference_steps=STEPS,
    scheduler_start_step=2,
    error_reset_steps=(5,),
    sample_ratio=0.5,
    inner_backend="aot_eager",
)
_CAPTURED: dict = {}


def _graphs(case):
    """The Dynamo graphs of one call of the tiny model with its pipeline's arguments, and their inputs; graphs that
    are a layer of the model (the backend does not rewrite them) are left out, their reasons kept."""
    if case.key not in _CAPTURED:
        reasons = []  # read inside Dynamo's call, the only place its record of the traced frame exists

        def layer_of_model(gm, example_inputs):
            reasons.append(layer_reason(gm))
            return gm.forward

        capture = GraphCapture(layer_of_model)
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(case.transformer(), backend=capture)(**case.call_kwargs())
        torch._dynamo.reset()
        _CAPTURED[case.key] = [g for g, r in zip(capture.graphs, reasons) if r is None]
        _CAPTURED[("layers", case.key)] = [r for r in reasons if r is not None]
    return _CAPTURED[case.key]


def _rewrite(case):
    """(RAS graph, context, inputs, dense output) of the graph the passes rewrite."""
    key = ("rewritten", case.key)
    if key not in _CAPTURED:
        found = []
        for gm, inputs in _graphs(case):
            try:
                ras, _, ctx = build_ras_graph(gm)
            except RewriteError:
                continue
            with torch.no_grad():
                outputs = [o for o in gm(*inputs) if isinstance(o, torch.Tensor)]
            found.append(((ras, ctx, inputs, outputs[0]), outputs))
        assert len(found) == 1, f"{case.key}: {len(found)} graphs rewrite, expected exactly one"
        _CAPTURED[key], _CAPTURED[("dense outputs", case.key)] = found[0]
    return _CAPTURED[key]


def _all(ctx):
    return torch.arange(ctx.num_tokens).expand(ctx.batch_size, ctx.num_tokens).contiguous()


@pytest.mark.parametrize("case", ZOO, ids=lambda c: c.key)
def test_rewrite_or_dense_reason(case):
    graphs = _graphs(case)
    reasons = list(_CAPTURED[("layers", case.key)])
    rewritten = []
    for gm, _ in graphs:
        try:
            _, _, ctx = build_ras_graph(gm)
            rewritten.append(ctx)
        except RewriteError as exc:
            reasons.append(str(exc))
    if case.ras:
        assert len(rewritten) == 1, reasons
        assert rewritten[0].latent_layout == case.layout
    else:
        assert not rewritten
        assert any(case.reason in r for r in reasons), reasons


@pytest.mark.parametrize("case", RAS_CASES, ids=lambda c: c.key)
def test_capture_step_equals_dense(case):
    ras, ctx, inputs, dense = _rewrite(case)
    out, _, _ = run_ras_step(ras, ctx, inputs, _all(ctx))
    torch.testing.assert_close(out, dense, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", RAS_CASES, ids=lambda c: c.key)
def test_permuted_tokens_equal_dense(case):
    ras, ctx, inputs, dense = _rewrite(case)
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(ctx.num_tokens, generator=g) for _ in range(ctx.batch_size)])
    out, _, _ = run_ras_step(ras, ctx, inputs, idx)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", RAS_CASES, ids=lambda c: c.key)
def test_subsets_on_unchanged_inputs_reuse_caches(case):
    ras, ctx, inputs, dense = _rewrite(case)
    n, b = ctx.num_tokens, ctx.batch_size
    _, output_cache, kv = run_ras_step(ras, ctx, inputs, _all(ctx))
    g = torch.Generator().manual_seed(1)
    for k in (1, n // 4, n - 1):
        idx = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b)])
        out, _, _ = run_ras_step(ras, ctx, inputs, idx, output_cache, kv)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"k={k}: {m}")


@pytest.mark.parametrize("case", [c for c in RAS_CASES if c.pipeline], ids=lambda c: c.key)
def test_pipeline_generation_runs_ras(case):
    ctx = _rewrite(case)[1]
    n = ctx.num_tokens
    pipe = case.pipeline(case.transformer())
    with torch.no_grad():
        dense = pipe(**case.pipeline_kwargs())[0]
    pipe = case.pipeline(case.transformer())
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = pipe(**case.pipeline_kwargs())[0]
    assert not [str(w.message) for w in caught if "rascompile" in str(w.message)]
    (control,) = controllers_of(pipe.transformer)
    kinds = [d.kind for d in control.history]
    assert kinds == ["capture", "capture", "ras", "ras", "ras", "capture", "ras", "ras"]
    assert all(d.num_active < n for d in control.history if d.kind == "ras")
    assert control.cache_peak_branches == (2 if case.per_branch else 1)
    assert control.cache_bytes == 0, "the caches are freed after the last RAS step"
    # per-token step counts drawn on the layout's token grid (a heatmap per frame for video)
    assert control.step_count_grid().shape[1:] == ctx.latent.token_grid
    assert torch.isfinite(got).all()
    assert 0 < (got - dense).abs().max() < dense.abs().max()


def _row(kwargs: dict, row: int, batch: int = 2) -> dict:
    """One row of batch-2 call arguments (tensors and lists with a leading batch axis are sliced)."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
            out[key] = value[row : row + 1]
        elif isinstance(value, list) and len(value) == batch:
            out[key] = value[row : row + 1]
        else:
            out[key] = value
    return out


def _guided_loop(case, per_branch: bool) -> torch.Tensor:
    """An Euler loop with classifier-free guidance over ``case``'s transformer under RAS: one batch-2 call per
    step ([uncond; cond]) or one batch-1 call per branch."""
    layout = _rewrite(case)[1].latent
    channel_axis = layout.channel_axis if layout is not None and layout.kind != "packed" else 1
    model = torch.compile(case.transformer(), backend="ras", options=OPTIONS)
    kwargs = case.call_kwargs()
    x = kwargs[case.latents_key][:1].clone()
    sigmas = torch.linspace(1.0, 0.1, STEPS)
    with torch.no_grad():
        for sigma in sigmas:
            t = torch.full((2,), float(sigma) * case.timestep_scale)
            call = {**kwargs, case.latents_key: torch.cat([x, x]), case.timestep_key: t}
            if per_branch:
                uncond = model(**_row(call, 0))[0]
                cond = model(**_row(call, 1))[0]
            else:
                out = model(**call)[0]
                uncond, cond = out[:1], out[1:]
            update = 0.1 * (uncond + 3.0 * (cond - uncond))
            # a model whose input carries condition channels after the latents (image-to-video: mask, encoded
            # image) predicts fewer channels than it takes: the update moves the latents, the conditions stay
            moved, kept = x.split(
                [update.shape[channel_axis], x.shape[channel_axis] - update.shape[channel_axis]], channel_axis
            )
            x = torch.cat([moved - update, kept], dim=channel_axis)
    (control,) = controllers_of(model)
    assert "ras" in [d.kind for d in control.history]
    return x


@pytest.mark.parametrize("case", [c for c in RAS_CASES if c.per_branch], ids=lambda c: c.key)
def test_per_branch_guidance_equals_batched(case):
    """The branches of one step share one selection and keep their own caches: the same as batched rows."""
    torch._dynamo.reset()
    batched = _guided_loop(case, per_branch=False)
    torch._dynamo.reset()
    per_branch = _guided_loop(case, per_branch=True)
    torch.testing.assert_close(per_branch, batched, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", RAS_CASES, ids=lambda c: c.key)
def test_graph_snapshot(case):
    """A canonical summary of each family's rewritten graph; a diffusers or torch upgrade that changes it fails
    here. Regenerate with RASCOMPILE_UPDATE_SNAPSHOTS=1 after reading the diff."""
    _, ctx, _, _ = _rewrite(case)
    path = SNAPSHOTS / f"{case.key}.txt"
    if os.environ.get("RASCOMPILE_UPDATE_SNAPSHOTS"):
        path.write_text(graph_summary(ctx))
    assert graph_summary(ctx) == path.read_text(), f"rewritten graph of {case.key} changed; diff against {path}"


def test_supported_models_table_is_generated_from_the_zoo():
    readme = (ROOT / "docs" / "supported.md").read_text()
    start, end = "<!-- supported-models:start -->\n", "<!-- supported-models:end -->"
    assert start in readme and end in readme, "README lacks the supported-models markers"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == supported_models_table(), "README's model table is stale: run python tests/support/zoo.py"


@pytest.mark.parametrize("case", [c for c in ZOO if not c.ras], ids=lambda c: c.key)
def test_dense_models_run_through_the_backend_unchanged(case):
    """A model RAS does not reach still compiles with backend="ras": no RAS step runs, warnings say why (by the
    second call: a model split into pieces whose last piece runs uncompiled is found out when its next call
    begins), and every call equals the uncompiled model."""
    model = case.transformer()
    kwargs = case.call_kwargs()
    with torch.no_grad():
        expected = model(**kwargs)[0]
    compiled = torch.compile(model, backend="ras", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for _ in range(2):
            got = compiled(**case.call_kwargs())[0]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    messages = [str(w.message) for w in caught if "rascompile" in str(w.message)]
    assert any("runs dense" in m for m in messages), messages
    assert not any(d.kind == "ras" for c in controllers_of(compiled) for d in c.history)


def test_data_dependent_sizes_run_dense_instead_of_raising():
    """Lumina2 under ``capture_scalar_outputs``: its graph has sizes that depend on tensor data; the passes
    refuse it with that reason and the dense graph is compiled inside Dynamo's call, where its tracing context
    is (a first-call compile raised ``DataDependentOutputException``)."""
    case = next(c for c in CASES if c.key == "lumina2")
    model = case.transformer()
    with torch.no_grad():
        expected = model(**case.call_kwargs())[0]
    compiled = torch.compile(model, backend="ras", options=OPTIONS)
    with torch._dynamo.config.patch(capture_scalar_outputs=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = compiled(**case.call_kwargs())[0]
    assert any("depend on tensor data" in str(w.message) for w in caught)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_branches_with_prompts_of_different_lengths_share_one_selection():
    """CogView4 with a negative prompt of another length (GLM pads each to its own multiple of 16): the branches
    are two Dynamo graphs, driven by one controller, so both run RAS on the same tokens (the negative branch used
    to run dense while the positive one ran RAS). Their caches hold the image rows only, so both branches' caches
    have one shape whatever the prompts' lengths."""
    from tests.support import models_image

    case = next(c for c in CASES if c.key == "cogview4")
    pipe = case.pipeline(case.transformer())
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS | {"keep_caches": True})
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = pipe(**models_image.cogview4_pipeline_kwargs(negative_text_len=3))[0]
    assert not [str(w.message) for w in caught if "rascompile" in str(w.message)]
    (control,) = controllers_of(pipe.transformer)
    assert [d.kind for d in control.branch_history] == [d.kind for d in control.history]
    assert all(
        torch.equal(first.active_idx, second.active_idx)
        for first, second in zip(control.history, control.branch_history)
        if first.kind == "ras"
    )
    assert len(control.branch_caches) == 2, "one cache set per branch"
    shapes = [[tuple(c.shape) for c in (output, *kv)] for output, kv in control.branch_caches]
    assert shapes[0] == shapes[1] and {s[2] for s in shapes[0][1:]} == {64}, shapes
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("key", ["ltx2", "kandinsky6"])
def test_every_output_of_a_joint_audio_and_video_model_keeps_the_invariants(key):
    """LTX-2 and Kandinsky 6 return audio beside the video; their audio tokens run whole and attend to the video
    tokens' keys and values, which RAS steps read from the caches: every output equals dense, not only the first."""
    case = next(c for c in CASES if c.key == key)
    ras, ctx, inputs, _ = _rewrite(case)
    dense = _CAPTURED[("dense outputs", case.key)]
    assert len(dense) > 1
    got, output_cache, kv = run_ras_step(ras, ctx, inputs, _all(ctx), every_output=True)
    for out, expected in zip(got, dense, strict=True):
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    n, b = ctx.num_tokens, ctx.batch_size
    g = torch.Generator().manual_seed(1)
    for k in (1, n // 4, n - 1):
        idx = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(b)])
        got, _, _ = run_ras_step(ras, ctx, inputs, idx, output_cache, kv, every_output=True)
        for out, expected in zip(got, dense, strict=True):
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
