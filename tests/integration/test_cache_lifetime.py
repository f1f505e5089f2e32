"""The caches' lifetime: freed after a generation's last RAS step (or kept on request), one set per guidance
branch whatever the prompts' lengths, freed by ``rascompile.release``, checked against free memory before a
generation allocates them, and never read before a step over all tokens filled them."""

import gc
import warnings
import weakref

import pytest
import torch

import rascompile
from rascompile.runtime import memory
from rascompile.runtime.registry import controllers_of
from tests.integration.test_runtime_safety import _branches, euler_per_branch
from tests.support.models import sd3_call_kwargs, tiny_sd3_pipeline

STEPS = 8
OPTIONS = dict(
    num_inference_steps=STEPS,
    scheduler_start_step=2,
    error_reset_steps=(5,),
    sample_ratio=0.5,
    inner_backend="aot_eager",
)


def _pipe(**options):
    pipe = tiny_sd3_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS | options)
    return pipe


def _generate(pipe, text_len=7, **kwargs):
    call = sd3_call_kwargs(steps=STEPS) | kwargs
    g = torch.Generator().manual_seed(text_len)
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        call[key] = torch.randn(call[key].shape[0], text_len, call[key].shape[2], generator=g)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = pipe(**call)[0]
    return out, [str(w.message) for w in caught if "rascompile" in str(w.message)]


def _cache_refs(control):
    return [weakref.ref(t) for c in control.cache_sets.values() for t in (c.output, *c.kv)]


def test_caches_are_freed_after_the_last_ras_step_and_nothing_else_holds_them():
    pipe = _pipe()
    seen = {}

    def keep_refs(pipe_, step, timestep, callback_kwargs):
        (control,) = controllers_of(pipe.transformer)
        if control.cache_sets:
            seen.setdefault("refs", _cache_refs(control))
            seen["bytes"] = control.cache_bytes
        return callback_kwargs

    _, messages = _generate(pipe, callback_on_step_end=keep_refs)
    assert not messages, messages
    (control,) = controllers_of(pipe.transformer)
    assert [d.kind for d in control.history] == ["capture", "capture", "ras", "ras", "ras", "capture", "ras", "ras"]
    assert control.cache_bytes == 0 and not control.cache_sets
    assert seen["bytes"] == control.cache_peak_bytes > 0
    gc.collect()
    assert seen["refs"] and all(ref() is None for ref in seen["refs"]), "a cache tensor outlived its generation"


def test_keep_caches_keeps_one_set_that_the_next_generation_reuses_and_release_frees_it():
    pipe = _pipe(keep_caches=True)
    first, _ = _generate(pipe)
    (control,) = controllers_of(pipe.transformer)
    held = control.cache_bytes
    assert held == control.cache_peak_bytes > 0
    pointers = [t.data_ptr() for c in control.cache_sets.values() for t in (c.output, *c.kv)]
    again, _ = _generate(pipe)
    assert [t.data_ptr() for c in control.cache_sets.values() for t in (c.output, *c.kv)] == pointers
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    refs = _cache_refs(control)
    assert rascompile.release(pipe.transformer) == held
    gc.collect()
    assert control.cache_bytes == 0 and all(ref() is None for ref in refs)
    third, _ = _generate(pipe)  # allocated again, filled by the first step
    torch.testing.assert_close(third, first, rtol=0, atol=0)


def test_prompts_of_three_lengths_in_a_row_hold_one_cache_set():
    """The joint attention's caches hold the image rows only, so a new prompt length needs no new set."""
    pipe = _pipe(keep_caches=True)
    peaks = []
    for text_len in (7, 9, 11):
        _generate(pipe, text_len=text_len)
        (control,) = controllers_of(pipe.transformer)
        peaks.append((control.cache_peak_branches, control.cache_peak_bytes, len(control.cache_sets)))
    assert peaks[0] == peaks[1] == peaks[2] and peaks[0][0] == peaks[0][2] == 1, peaks


def test_caches_that_do_not_fit_free_memory_run_the_generation_dense_with_one_warning(monkeypatch):
    expected, _ = _generate(_pipe(sample_ratio=1.0))
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1000)
    pipe = _pipe()
    got, messages = _generate(pipe)
    (control,) = controllers_of(pipe.transformer)
    assert control.cache_sets == {} and control.cache_peak_bytes == 0
    assert [d.kind for d in control.history] == ["dense"] * STEPS
    assert len(messages) == 1, messages
    need = memory.set_bytes(control.layout.output_cache, control.layout.kv_caches)
    assert f"need {memory.gib(need)}" in messages[0] and f"has {memory.gib(1000)} free: it runs dense" in messages[0]
    assert "rascompile.plan" in messages[0] and "kv_cache_dtype='fp8_e4m3'" in messages[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_second_guidance_branch_that_does_not_fit_turns_the_generation_dense_before_any_ras_step(monkeypatch):
    x, cond, uncond = _branches()
    pipe = tiny_sd3_pipeline()
    expected = euler_per_branch(pipe.transformer, pipe.scheduler, x, cond, uncond)
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    one_set = []

    def free_bytes(device):
        (control,) = controllers_of(pipe.transformer)
        one_set.append(memory.set_bytes(control.layout.output_cache, control.layout.kv_caches))
        return one_set[0] + 1 - control.cache_bytes  # room for one set only

    monkeypatch.setattr(memory, "free_bytes", free_bytes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = euler_per_branch(pipe.transformer, pipe.scheduler, x, cond, uncond)
    messages = [str(w.message) for w in caught if "rascompile" in str(w.message)]
    (control,) = controllers_of(pipe.transformer)
    assert len(messages) == 1 and "(2 guidance branch(es)" in messages[0] and "runs dense" in messages[0], messages
    kinds = [d.kind for d in control.history]
    assert kinds == ["capture"] + ["dense"] * (STEPS - 1), "the first step's first branch, then dense"
    assert not control.cache_sets
    # the first call ran the RAS graph over all tokens (a capture), the rest the dense graph
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_ras_step_on_caches_allocated_since_the_last_full_step_fills_them_instead():
    """Caches freed and allocated again (``release`` mid-generation) hold no rows: the step runs over all tokens."""
    pipe = _pipe()
    captured = {}

    def release_before_the_ras_step(pipe_, step, timestep, callback_kwargs):
        if step == 2:  # after step 2 (a RAS step follows at 3)
            captured["freed"] = rascompile.release(pipe.transformer)
        return callback_kwargs

    reference, _ = _generate(_pipe(sample_ratio=1.0))
    got, _ = _generate(pipe, callback_on_step_end=release_before_the_ras_step)
    assert captured["freed"] > 0
    (control,) = controllers_of(pipe.transformer)
    assert control.history[3].kind == "ras"  # planned as RAS; it ran over all tokens on the new caches
    assert torch.isfinite(got).all()
    plain, _ = _generate(_pipe())
    # one step more computed whole than the plain RAS generation: closer to dense than it, never garbage
    assert (got - reference).abs().max() <= (plain - reference).abs().max()


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_off_cuda_free_memory_is_not_checked(device):
    assert memory.free_bytes(torch.device(device)) is None
