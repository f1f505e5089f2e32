"""The diffusers transformers that Dynamo splits into pieces, under RAS across the pieces (``graph_pieces=True``):
the model-agnostic invariants at the level of the whole transformer call, and a denoising loop that runs RAS steps.

(a) a capture step (every token active) equals the uncompiled model;
(b) a RAS step over a permutation of all tokens equals it (position tables and masks follow the tokens in every
    piece);
(c) after a capture step, a RAS step over a subset of the tokens on unchanged inputs reproduces it from the caches
    (the pieces' K/V and boundary caches, and the scope's output cache for the tokens left out).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rascompile.runtime.registry as registry
from rascompile.runtime.controller import Decision
from tests.support.zoo import CASES

PIECE_CASES = [c for c in CASES if c.pieces]
OPTIONS = dict(
    graph_pieces=True,
    num_inference_steps=6,
    scheduler_start_step=1,
    error_reset_steps=(4,),
    sample_ratio=0.5,
    inner_backend="aot_eager",
)
_BUILT: dict = {}


def _scope_of(model):
    for backend in registry._SHARED_BACKENDS.values():
        if model in backend._scopes:
            return backend._scopes[model]
    raise AssertionError(f"no piece scope for {type(model).__name__}")


def _timestep(case, kwargs, fraction: float) -> dict:
    key = case.timestep_key
    return {**kwargs, key: torch.full_like(kwargs[key], fraction * case.timestep_scale)}


def _compiled(case):
    """(uncompiled output, compiled model, its scope, call kwargs) after one compiling call, built once per case."""
    if case.key not in _BUILT:
        torch._dynamo.reset()
        model = case.transformer()
        kwargs = case.call_kwargs()
        with torch.no_grad():
            reference = _sample(model(**kwargs))
        compiled = torch.compile(model, backend="ras", options=OPTIONS)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled(**kwargs)  # Dynamo compiles the pieces; this call runs dense
        _BUILT[case.key] = (reference, compiled, _scope_of(model), kwargs)
    return _BUILT[case.key]


def _sample(out):
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


def _forced(case, decision):
    reference, compiled, scope, kwargs = _compiled(case)
    with torch.no_grad(), scope.forcing(decision):
        out = _sample(compiled(**kwargs))
    assert scope.broken is None, scope.broken
    return reference, out


def _all_tokens(scope, kwargs):
    latents = kwargs["hidden_states"]
    shape = tuple(latents.shape)
    head = scope.head_for(shape)
    if head is not None:
        n = head.num_tokens
    elif latents.dim() == 5:  # Mochi: the patch embedding runs per frame
        n = scope._per_frame_head(shape)[1]
    else:
        n = shape[1]  # packed: a token per row
    b = shape[0]
    return torch.arange(n).expand(b, n).contiguous()


@pytest.mark.parametrize("case", PIECE_CASES, ids=lambda c: c.key)
def test_capture_permutation_and_subset_steps_equal_the_uncompiled_model(case):
    reference, compiled, scope, kwargs = _compiled(case)
    everything = _all_tokens(scope, kwargs)
    b, n = everything.shape
    _, out = _forced(case, Decision("capture", 1, everything))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(0)
    permutation = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    _, out = _forced(case, Decision("ras", 2, permutation))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)

    subset = torch.stack([torch.randperm(n, generator=g)[: n // 3].sort().values for _ in range(b)])
    _, out = _forced(case, Decision("ras", 3, subset))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)

    assert set(scope.frames) <= scope.frames_checked  # a per-frame patch embedding's token order was checked
    forms = {form.kind for graph in _graphs_of(compiled) for form in graph.forms.values()}
    assert forms & {"through", "tail"}, forms  # and a head or patchify piece: _all_tokens found its layout


def _graphs_of(compiled):
    params = {id(p) for p in compiled._orig_mod.parameters()}
    return [
        g
        for b in registry._SHARED_BACKENDS.values()
        for g in b.graphs
        if g.parameter_ids & params and hasattr(g, "forms")
    ]


@pytest.mark.parametrize("case", PIECE_CASES, ids=lambda c: c.key)
def test_a_denoising_loop_runs_ras_steps_and_stays_finite(case):
    """Two generations of six steps: RAS steps happen in each, nothing is said, and identical generations are
    identical (the second and third; the first's first call compiled the pieces)."""
    torch._dynamo.reset()
    _BUILT.pop(case.key, None)
    model = case.transformer()
    compiled = torch.compile(model, backend="ras", options=OPTIONS)
    results = []
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            kwargs = case.call_kwargs()
            for i in range(6):
                kwargs = _timestep(case, kwargs, 1.0 - i / 6)
                out = _sample(compiled(**kwargs))
                latents = kwargs["hidden_states"].clone()
                if out.dim() == 3 and out.shape[1] > latents.shape[1]:
                    out = out[:, -latents.shape[1] :]  # Qwen-Image 2.1 returns its joint sequence, image rows last
                latents[:, : out.shape[1]] -= 0.1 * out  # HunyuanVideo 1.5 predicts 4 of its 9 input channels
                kwargs["hidden_states"] = latents
            results.append(kwargs["hidden_states"])
    messages = [str(w.message) for w in caught if "rascompile" in str(w.message)]
    assert not messages, messages
    (control,) = registry.controllers_of(compiled)
    assert [d.kind for d in control.history].count("ras") >= 3, control.history
    assert torch.isfinite(results[-1]).all()
    torch.testing.assert_close(results[2], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("case", [c for c in PIECE_CASES if c.pipeline], ids=lambda c: c.key)
def test_a_generation_through_the_pipeline_runs_ras(case):
    """The real pipeline (guidance as one transformer call per branch, each branch on its own caches, or batched)
    through ``rascompile.apply``: the scheduler gives the steps, RAS steps happen in every generation after the
    first call (and in both branches), nothing is said, and identical generations are identical."""
    import rascompile
    from rascompile.config import RASConfig

    torch._dynamo.reset()
    pipe = case.pipeline()
    backend = rascompile.apply(pipe, RASConfig(graph_pieces=True, sample_ratio=0.5), inner_backend="aot_eager")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [pipe(**case.pipeline_kwargs())[0] for _ in range(3)]
    messages = [str(w.message) for w in caught if "rascompile" in str(w.message)]
    assert not messages, messages
    (control,) = backend.controllers_of(pipe.transformer)
    assert registry.controllers_of(pipe.transformer) == [control]  # rascompile.status reads it too
    report = rascompile.status(pipe.transformer)
    assert "call scope: RAS across the pieces of each call" in report and "RAS across its pieces" in report, report
    assert ("attention runs eagerly" in report) == (case.key == "mochi"), report
    assert control.generations == 3
    assert [d.kind for d in control.history].count("ras") >= 2, control.history
    if case.per_branch:  # else guidance is batched: one call per step (Mochi)
        assert any(d.kind == "ras" for d in control.branch_history), control.branch_history
    assert all(torch.isfinite(out).all() for out in outs)
    torch.testing.assert_close(outs[2], outs[1], rtol=0, atol=0)


def test_status_reports_each_piece_and_its_form():
    case = next(c for c in PIECE_CASES if c.key == "hunyuan-image-glyph")
    _, compiled, _, _ = _compiled(case)
    _forced(case, Decision("capture", 1, _all_tokens(*_compiled(case)[2:4])))
    report = registry.status(compiled)
    assert "RAS across its pieces: head at 2 x 64 tokens" in report, report
    assert "through at 2 x 64 tokens" in report and "token-free" in report, report
    assert "controller (2 x 64 tokens)" in report, report


def test_prompts_of_different_lengths_in_one_batch_run_dense_and_say_so():
    """Lumina-Image 2.0 with two prompts of different lengths in one batch: each row's image rows start at its own
    offset in the joint sequence, which the rewrite refuses; the transformer runs dense, equal to the uncompiled
    model, and the warning says why in the user's terms."""
    from tests.support import models_classic

    torch._dynamo.reset()
    model = models_classic.tiny_lumina2_transformer()
    kwargs = models_classic.lumina2_call_kwargs(valid=(6, 4))
    with torch.no_grad():
        expected = _sample(model(**kwargs))
    compiled = torch.compile(model, backend="ras", options=OPTIONS)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(_sample(compiled(**kwargs)), expected, rtol=1e-5, atol=1e-5)
    messages = [str(w.message) for w in caught if "rascompile" in str(w.message)]
    assert any("own offset (6, 4): prompts of different lengths in one batch" in m for m in messages), messages
