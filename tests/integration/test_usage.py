"""How users call the backend beyond the plain form: second-order schedulers, ``mode=``, inner compiles that fail.

Each either keeps RAS, runs dense with a warning that says why, or is refused with a usage error that says what to
write instead; none raises out of a generation.
"""

import warnings

import pytest
import torch
from diffusers import FlowMatchHeunDiscreteScheduler

import rascompile
import rascompile.runtime.registry as registry
from rascompile import RASConfig
from tests.support.models import sd3_call_kwargs, tiny_sd3_pipeline

STEPS = 8


def _generate(pipe, steps=STEPS, seed=0):
    with torch.no_grad():
        return pipe(**sd3_call_kwargs(num_prompts=1, num_images_per_prompt=2, steps=steps, seed=seed))[0]


def _heun_pipeline():
    pipe = tiny_sd3_pipeline()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
    return pipe


def test_heun_through_backend_ras_runs_dense_with_a_warning_never_restarting():
    """FlowMatchHeunDiscreteScheduler calls the transformer 2T-1 times per generation, the second evaluation of a
    step at the previous call's timestep. The backend never reads those calls as 2-step generations; from the
    second evaluation on the generation runs dense, and the next generation from its first call."""
    dense = _generate(_heun_pipeline(), seed=1)
    pipe = _heun_pipeline()
    options = {"sample_ratio": 0.5, "num_inference_steps": STEPS, "inner_backend": "aot_eager"}
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _generate(pipe)
        second = _generate(pipe, seed=1)
    assert any("second-order schedulers" in str(w.message) for w in caught), [str(w.message) for w in caught]
    [control] = registry.controllers_of(pipe.transformer)
    # one generation begun per pipeline call, never one per repeated timestep
    assert control.steps.generation == 2
    assert control.generations == 1  # the second generation ran dense from its first call: no schedule began
    torch.testing.assert_close(second, dense, rtol=1e-5, atol=1e-5)


def test_mode_alone_is_one_clear_usage_error():
    pipe = tiny_sd3_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", mode="max-autotune-no-cudagraphs")
    with pytest.raises(Exception, match=r"give the inner backend's mode in options instead, options=\{'mode'"):
        _generate(pipe, steps=2)


def test_mode_reaches_inductor_through_options_and_apply(monkeypatch):
    """``options={"mode": ...}`` and ``rascompile.apply(..., mode=...)`` compile every graph with that mode's
    inductor settings (``torch._inductor.list_mode_options``)."""
    import torch._inductor.compile_fx as compile_fx_module

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **_):
        seen.append(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    expected = _generate(tiny_sd3_pipeline())
    pipe = tiny_sd3_pipeline()
    options = {"sample_ratio": 0.5, "num_inference_steps": STEPS, "mode": "max-autotune-no-cudagraphs"}
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=options)
    out = _generate(pipe)
    assert seen and all(p == {"max_autotune": True, "coordinate_descent_tuning": True} for p in seen), seen
    assert not torch.equal(out, expected)  # RAS ran

    seen.clear()
    pipe = tiny_sd3_pipeline()
    rascompile.apply(pipe, RASConfig(sample_ratio=0.5), mode="max-autotune-no-cudagraphs")
    _generate(pipe)
    assert seen and all(p == {"max_autotune": True, "coordinate_descent_tuning": True} for p in seen), seen


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "fastest"}, "mode='fastest' is invalid: must be None or one of default, lite, max-autotune"),
        ({"mode": "max-autotune", "inner_backend": "aot_eager"}, "mode='max-autotune' is invalid with inner_backend"),
    ],
)
def test_bad_modes_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rascompile.RASBackend(RASConfig(num_inference_steps=4), **kwargs)


def test_a_failing_inner_compile_runs_the_graph_uncompiled(monkeypatch):
    """An inner compile that raises (at the first call, outside Dynamo's tracing context) leaves the graph
    running uncompiled with a warning naming the failure, never an exception out of the user's call."""

    def failing_compile(self, gm, example_inputs):
        raise RuntimeError("inner compile exploded")

    monkeypatch.setattr(rascompile.RASBackend, "compile_graph", failing_compile)
    expected = _generate(tiny_sd3_pipeline())
    for ratio in (1.0, 0.5):
        pipe = tiny_sd3_pipeline()
        options = {"sample_ratio": ratio, "num_inference_steps": STEPS, "inner_backend": "aot_eager"}
        pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = _generate(pipe)
        assert any("failed to compile a graph (RuntimeError: inner compile exploded)" in str(w.message) for w in caught)
        if ratio == 1.0:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        else:
            assert torch.isfinite(out).all() and not torch.equal(out, expected)


def test_dynamic_true_says_what_to_do_when_it_cannot_specialise():
    """Flux traced with ``dynamic=True`` reads a position table's value (``.item()``), which shape
    specialisation cannot follow: the graph runs dense, equal to the model, and the warning names ``dynamic=True``
    and the way back to RAS."""
    from tests.support.models import flux_call_kwargs, tiny_flux_pipeline

    def generate(pipe):
        with torch.no_grad():
            return pipe(**flux_call_kwargs(batch=1, steps=STEPS))[0]

    expected = generate(tiny_flux_pipeline())
    pipe = tiny_flux_pipeline()
    options = {"sample_ratio": 0.5, "num_inference_steps": STEPS, "inner_backend": "aot_eager"}
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=options, dynamic=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(pipe)
    messages = [str(w.message) for w in caught if "rascompile" in str(w.message)]
    assert any("dynamic=True" in m and "Compile with dynamic=False" in m for m in messages), messages
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
