"""Stacks that split the transformer into graphs keep RAS with ``graph_pieces=True``: block-level group offloading,
FirstBlockCache and regional compilation (``compile_repeated_blocks``), on the tiny Flux pipeline."""

from __future__ import annotations

import warnings

import pytest
import torch

import rascompile.runtime.registry as registry
from tests.support.models import flux_call_kwargs, tiny_flux_pipeline
from tests.support.stacks import STACKS

STEPS = 8
OPTIONS = {"sample_ratio": 0.5, "num_inference_steps": STEPS, "inner_backend": "aot_eager", "graph_pieces": True}
PIECE_STACKS = [s for s in STACKS if s.pieces]
_WHOLE: list = []


def _pipeline(stack, options):
    pipe = tiny_flux_pipeline()
    if stack is not None:
        stack.apply(pipe)
    if options is None:
        return pipe
    if stack is not None and stack.compile is not None:
        stack.compile(pipe, options)
    else:
        pipe.transformer.compile(backend="ras", options=options)
    return pipe


def _generations(pipe, count: int = 3):
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [pipe(**flux_call_kwargs(batch=1, steps=STEPS, seed=0))[0] for _ in range(count)]
    return outs, [str(w.message) for w in caught if "rascompile" in str(w.message)]


def _whole_graph_ras():
    """Three generations of the plain pipeline under RAS, its transformer one graph."""
    if not _WHOLE:
        torch._dynamo.reset()
        _WHOLE.extend(_generations(_pipeline(None, OPTIONS))[0])
    return _WHOLE


@pytest.mark.parametrize("stack", PIECE_STACKS, ids=lambda s: s.key)
def test_stack_at_ratio_one_equals_the_stack_without_rascompile(stack):
    torch._dynamo.reset()
    expected, _ = _generations(_pipeline(stack, None), count=1)
    outs, messages = _generations(_pipeline(stack, {**OPTIONS, "sample_ratio": 1.0}), count=2)
    assert not messages, messages
    for out in outs:
        torch.testing.assert_close(out, expected[0], rtol=0, atol=0)


@pytest.mark.parametrize("stack", [s for s in PIECE_STACKS if s.key != "first_block_cache"], ids=lambda s: s.key)
def test_stack_runs_ras_across_its_graphs_and_equals_ras_on_the_whole_transformer(stack):
    """Offloading moves weights and regional compilation compiles block by block; neither changes what a step
    computes, so RAS across the pieces equals RAS on the transformer compiled whole, from the second generation
    (the first one's first call compiles the pieces and runs dense)."""
    whole = _whole_graph_ras()
    torch._dynamo.reset()
    pipe = _pipeline(stack, OPTIONS)
    outs, messages = _generations(pipe)
    assert not messages, messages
    (control,) = registry.controllers_of(pipe.transformer)
    assert [d.kind for d in control.history].count("ras") >= 4, control.history
    assert control.generations == 3
    for out, expected in zip(outs[1:], whole[1:]):
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_first_block_cache_runs_ras_and_its_cached_steps_keep_the_skipped_tokens(monkeypatch):
    """FirstBlockCache decides per step whether the blocks after the first run. On a step it skips them, the
    active tokens take the cache's approximation and the others their last prediction; the step is still a RAS
    step (the first block ran on the active tokens). Identical generations are identical; the blocks it skipped
    refresh their caches over all tokens the next time they run."""
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    decisions = []
    should_compute = FBCHeadBlockHook._should_compute_remaining_blocks

    def recorded(self, residual):
        decisions.append(should_compute(self, residual))
        return decisions[-1]

    monkeypatch.setattr(FBCHeadBlockHook, "_should_compute_remaining_blocks", recorded)
    stack = next(s for s in PIECE_STACKS if s.key == "first_block_cache")
    torch._dynamo.reset()
    pipe = _pipeline(stack, OPTIONS)
    outs, messages = _generations(pipe)
    assert not messages, messages
    assert False in decisions, "the cache never skipped a step: the test would not reach its cached path"
    (control,) = registry.controllers_of(pipe.transformer)
    assert [d.kind for d in control.history].count("ras") >= 4, control.history
    torch.testing.assert_close(outs[2], outs[1], rtol=0, atol=0)
    assert torch.isfinite(outs[2]).all()


@pytest.mark.parametrize("key", ["pyramid_attention_broadcast", "taylorseer"])
def test_a_stack_whose_pieces_cannot_be_rewritten_runs_dense_as_a_whole(key):
    """PyramidAttentionBroadcast hands the single-stream blocks' joint [text; image] sequences between pieces and
    also routes some steps through the whole graph; TaylorSeer reads the sizes of its cached image-token tensors:
    the passes refuse those pieces. Never half RAS: every generation runs dense, equals the stack without
    rascompile, and a warning says why."""
    stack = next(s for s in STACKS if s.key == key)
    torch._dynamo.reset()
    expected, _ = _generations(_pipeline(stack, None), count=1)
    pipe = _pipeline(stack, OPTIONS)
    outs, messages = _generations(pipe)
    assert any("RAS is off for this transformer" in m and stack.says in m for m in messages), messages
    for out in outs:
        torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-5)
    assert not any(d.kind == "ras" for c in registry.controllers_of(pipe.transformer) for d in c.history)


@pytest.mark.parametrize("stack", PIECE_STACKS, ids=lambda s: s.key)
def test_every_step_over_all_tokens_equals_the_stack_without_rascompile(stack):
    """The piece runtime at work with every token active: each call a capture step (every piece gathers all
    tokens, runs its RAS form, scatters into its caches; the scope merges the output) equals the stack without
    rascompile. ``sample_ratio=1.0`` alone would not show it: it compiles every graph dense, without the scope."""
    from rascompile.runtime.controller import Decision

    torch._dynamo.reset()
    expected, _ = _generations(_pipeline(stack, None), count=1)
    pipe = _pipeline(stack, OPTIONS)
    _generations(pipe, count=1)  # Dynamo compiles the pieces; the scope installs
    backends = registry._SHARED_BACKENDS.values()
    (scope,) = [b._scopes[pipe.transformer] for b in backends if pipe.transformer in b._scopes]
    everything = torch.arange(64)[None]  # flux_call_kwargs: 128 pixels, N = 64 tokens, batch 1
    with scope.forcing(Decision("capture", 0, everything)):
        got, messages = _generations(pipe, count=1)
    assert not messages, messages
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
