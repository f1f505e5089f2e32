"""The ``ras`` backend end to end: dense parity, compile counts, generation boundaries, fallbacks."""

import subprocess
import sys
import warnings

import pytest
import torch

import rascompile
from rascompile import RASConfig
from tests.support.models import lumina_call_kwargs, sd3_call_kwargs, tiny_lumina_pipeline, tiny_sd3_pipeline
from tests.support.synthetic import TokenPoolingDiT

STEPS = 8
SHORT = dict(num_inference_steps=STEPS, scheduler_start_step=2, error_reset_steps=(5,))
MODELS = {
    "sd3": (tiny_sd3_pipeline, sd3_call_kwargs),
    "lumina": (tiny_lumina_pipeline, lumina_call_kwargs),
}


def generate(pipe, kwargs_fn, **overrides):
    kwargs = {**kwargs_fn(num_prompts=2, num_images_per_prompt=2, steps=STEPS), **overrides}
    with torch.no_grad():
        return pipe(**kwargs)[0]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_sample_ratio_one_equals_uncompiled(model):
    build, kwargs_fn = MODELS[model]
    expected = generate(build(), kwargs_fn)
    pipe = build()
    options = {"sample_ratio": 1.0, "inner_backend": "aot_eager", **SHORT}
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=options, dynamic=False)
    torch.testing.assert_close(generate(pipe, kwargs_fn), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_compiles_once_per_token_count_and_never_across_generations(model):
    build, kwargs_fn = MODELS[model]
    pipe = build()
    backend = rascompile.apply(pipe, RASConfig(sample_ratio=0.5, **SHORT), inner_backend="aot_eager")
    first = generate(pipe, kwargs_fn)
    assert len(backend.graphs) == 1
    # dense steps that fill the caches (k = N) and the RAS steps (k = N / 2): two compiled graphs
    assert backend.compile_count == 2
    second = generate(pipe, kwargs_fn)
    assert len(backend.graphs) == 1 and backend.compile_count == 2, "a new generation must not recompile"
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    kinds = [d.kind for d in backend.graphs[0].controller.history]
    assert kinds == ["capture", "capture", "ras", "ras", "ras", "capture", "ras", "ras"]
    assert backend.graphs[0].controller.generations == 2


def test_torch_compile_options_and_apply_agree():
    build, kwargs_fn = MODELS["sd3"]
    config = RASConfig(sample_ratio=0.5, **SHORT)
    pipe_a = build()
    rascompile.apply(pipe_a, config, inner_backend="aot_eager")
    pipe_b = build()
    options = {**SHORT, "sample_ratio": 0.5, "inner_backend": "aot_eager"}
    pipe_b.transformer = torch.compile(pipe_b.transformer, backend="ras", options=options)
    torch.testing.assert_close(generate(pipe_b, kwargs_fn), generate(pipe_a, kwargs_fn), rtol=0, atol=0)


def _interrupt_after(step):
    def callback(pipe, i, t, tensors):
        if i == step:
            pipe._interrupt = True
        return tensors

    return callback


@pytest.mark.parametrize("path", ["apply", "options"])
def test_interrupted_generation_then_new_one_is_clean(path):
    build, kwargs_fn = MODELS["sd3"]
    config = RASConfig(sample_ratio=0.5, **SHORT)

    def compiled():
        pipe = build()
        if path == "apply":
            rascompile.apply(pipe, config, inner_backend="aot_eager")
        else:
            options = {**SHORT, "sample_ratio": 0.5, "inner_backend": "aot_eager"}
            pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=options)
        return pipe

    expected = generate(compiled(), kwargs_fn)
    torch._dynamo.reset()
    pipe = compiled()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the timestep path says the interrupted generation ended early
        generate(pipe, kwargs_fn, callback_on_step_end=_interrupt_after(3))
    torch.testing.assert_close(generate(pipe, kwargs_fn), expected, rtol=0, atol=0)


def test_resolution_change_mid_generation_starts_clean():
    build, kwargs_fn = MODELS["lumina"]
    config = RASConfig(sample_ratio=0.5, **SHORT)
    reference = build()
    rascompile.apply(reference, config, inner_backend="aot_eager")
    expected_square = generate(reference, kwargs_fn)
    expected_wide = generate(reference, lambda **kw: kwargs_fn(latent_width=24, **kw))
    torch._dynamo.reset()

    pipe = build()
    backend = rascompile.apply(pipe, config, inner_backend="aot_eager")
    generate(pipe, kwargs_fn, callback_on_step_end=_interrupt_after(4))
    wide = generate(pipe, lambda **kw: kwargs_fn(latent_width=24, **kw))
    square = generate(pipe, kwargs_fn)
    torch.testing.assert_close(wide, expected_wide, rtol=0, atol=0)
    torch.testing.assert_close(square, expected_square, rtol=0, atol=0)
    assert len(backend.graphs) == 2, "one graph per resolution"


def test_two_pipelines_with_different_configs_share_nothing():
    build, kwargs_fn = MODELS["sd3"]
    half, quarter = RASConfig(sample_ratio=0.5, **SHORT), RASConfig(sample_ratio=0.25, **SHORT)
    alone = []
    for config in (half, quarter):
        pipe = build()
        rascompile.apply(pipe, config, inner_backend="aot_eager")
        alone.append(generate(pipe, kwargs_fn))
        torch._dynamo.reset()
    pipe_a, pipe_b = build(), build()
    rascompile.apply(pipe_a, half, inner_backend="aot_eager")
    rascompile.apply(pipe_b, quarter, inner_backend="aot_eager")
    a1, b1, a2 = generate(pipe_a, kwargs_fn), generate(pipe_b, kwargs_fn), generate(pipe_a, kwargs_fn)
    torch.testing.assert_close(a1, alone[0], rtol=0, atol=0)
    torch.testing.assert_close(a2, alone[0], rtol=0, atol=0)
    torch.testing.assert_close(b1, alone[1], rtol=0, atol=0)
    assert not torch.equal(a1, b1)


def test_step_count_mismatch_is_an_error():
    build, kwargs_fn = MODELS["sd3"]
    pipe = build()
    options = {**SHORT, "num_inference_steps": STEPS - 2, "error_reset_steps": (), "inner_backend": "aot_eager"}
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=options)
    with pytest.raises(ValueError, match="num_inference_steps=6"):
        generate(pipe, kwargs_fn)

    pipe = build()
    rascompile.apply(pipe, RASConfig(**{**SHORT, "num_inference_steps": 10}), inner_backend="aot_eager")
    with pytest.raises(ValueError, match="num_inference_steps=10"):
        generate(pipe, kwargs_fn)


def test_invalid_options_name_the_field():
    model = TokenPoolingDiT()
    compiled = torch.compile(model, backend="ras", options={"sample_ratio": 2.0, "num_inference_steps": 4})
    with pytest.raises(Exception, match=r"sample_ratio=2\.0 is invalid"):
        compiled(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="inner_backend='tvm' is invalid"):
        rascompile.RASBackend(RASConfig(**SHORT), inner_backend="tvm")
    with pytest.raises(ValueError, match="num_inference_steps=None"):
        rascompile.RASBackend(RASConfig())
    with pytest.raises(Exception, match="mode='max-autotune'\\): give the inner backend's mode in options"):
        torch.compile(model, backend="ras", mode="max-autotune")(torch.randn(2, 4, 8, 8))


def _run_recording_warnings(model, x, calls):
    options = {"num_inference_steps": 4, "scheduler_start_step": 1, "error_reset_steps": (), "inner_backend": "eager"}
    compiled = torch.compile(model, backend="ras", options=options)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outs = [compiled(x) for _ in range(calls)]
    return outs, caught


def test_unsupported_graph_runs_dense_and_warns_once():
    model = TokenPoolingDiT()
    x = torch.randn(2, 4, 8, 8)
    outs, caught = _run_recording_warnings(model, x, calls=3)
    messages = [str(w.message) for w in caught if "rascompile" in str(w.message)]
    assert len(messages) == 1 and "runs dense" in messages[0] and "token axis" in messages[0]
    for out in outs:
        torch.testing.assert_close(out, model(x))


class BreakingDiT(TokenPoolingDiT):
    def forward(self, x):
        h = self.block(self.embed(x).flatten(2).transpose(1, 2))
        torch._dynamo.graph_break()
        out = self.proj(h)
        return out.transpose(1, 2).reshape(x.shape[0], 16, x.shape[2] // 2, x.shape[3] // 2)


def test_graph_break_runs_dense_and_warns():
    model = BreakingDiT()
    x = torch.randn(2, 4, 8, 8)
    (out,), caught = _run_recording_warnings(model, x, calls=1)
    assert any("runs dense" in str(w.message) for w in caught)
    torch.testing.assert_close(out, model(x))


def test_grad_mode_runs_dense_with_a_warning():
    build, kwargs_fn = MODELS["sd3"]
    pipe = build()
    backend = rascompile.apply(pipe, RASConfig(sample_ratio=0.5, **SHORT), inner_backend="aot_eager")
    x = torch.randn(2, 4, 16, 16)
    args = dict(
        hidden_states=x,
        timestep=torch.tensor([900.0, 900.0]),
        encoder_hidden_states=torch.randn(2, 7, 32),
        pooled_projections=torch.randn(2, 16),
        return_dict=False,
    )
    pipe.scheduler.set_timesteps(STEPS)
    with pytest.warns(UserWarning, match="grad mode is on"):
        out = pipe.transformer(**args)[0]
    torch.testing.assert_close(out, pipe.transformer.forward(**args)[0], rtol=1e-5, atol=1e-5)
    assert out.requires_grad
    assert backend.graphs[0].controller.generations == 0


def test_backend_is_found_through_its_entry_point():
    code = (
        "import torch\n"
        "m = torch.nn.Linear(3, 3)\n"
        "f = torch.compile(m, backend='ras', options={'num_inference_steps': 28, 'inner_backend': 'eager'})\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "print(torch.allclose(f(torch.ones(2, 3)), m(torch.ones(2, 3))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("True")


def test_resolution_changes_without_dynamic_false_keep_ras():
    """Dynamo traces the second resolution with symbolic sizes; each resolution still gets a static RAS graph."""
    build, kwargs_fn = MODELS["sd3"]
    config = RASConfig(sample_ratio=0.5, **SHORT)
    reference = build()
    rascompile.apply(reference, config, inner_backend="aot_eager")
    sizes = [dict(), dict(latent_width=24), dict(latent_height=24, latent_width=32)]
    expected = [generate(reference, lambda s=s, **kw: kwargs_fn(**s, **kw)) for s in sizes]
    torch._dynamo.reset()

    pipe = build()
    backend = rascompile.RASBackend(config, inner_backend="aot_eager")
    pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense fallback, no ended-early warning
        got = [generate(pipe, lambda s=s, **kw: kwargs_fn(**s, **kw)) for s in sizes]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert len(backend.graphs) == 3 and all(g.fallback_reason is None for g in backend.graphs)
    assert all(g.controller.generations == 1 for g in backend.graphs)


def test_batch_equal_to_token_count_runs_dense_and_warns():
    """A known limitation: with a transformer batch equal to N the passes cannot tell the batch axis from the
    token axis in shape literals. The graph must then run dense with a warning, never a wrong image."""
    build, kwargs_fn = MODELS["sd3"]
    call = dict(num_prompts=32, num_images_per_prompt=1, steps=STEPS)  # CFG: batch 64 = 8 x 8 tokens
    pipe = build()
    with torch.no_grad():
        expected = pipe(**kwargs_fn(**call))[0]
    pipe = build()
    rascompile.apply(pipe, RASConfig(**SHORT), inner_backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = pipe(**kwargs_fn(**call))[0]
    assert any("runs dense" in str(w.message) for w in caught)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_the_controller_records_staleness_and_keeps_the_bound():
    """Each token's longest run of skipped RAS steps is recorded per generation (reset by dense steps); with
    ``max_skip_steps`` no token of a real generation exceeds it, without it the reference's selection leaves
    tokens uncomputed from the first RAS step to the reset."""
    runs = {}
    for name, config in (
        ("reference", RASConfig.reference_defaults(sample_ratio=0.25, num_inference_steps=12, scheduler_start_step=2)),
        ("bounded", RASConfig(sample_ratio=0.25, num_inference_steps=12, scheduler_start_step=2, max_skip_steps=3)),
    ):
        pipe = tiny_sd3_pipeline()
        backend = rascompile.apply(pipe, config.replace(error_reset_steps=(8,)), inner_backend="aot_eager")
        with torch.no_grad():
            pipe(**sd3_call_kwargs(num_prompts=1, num_images_per_prompt=1, steps=12))
        control = backend.graphs[0].controller
        runs[name] = control.staleness()
        assert control.max_skip_run_grid().shape == (2, 8, 8)  # both guidance rows, on the token grid
    assert runs["reference"]["max"] == 6  # RAS steps 2..7, before the reset at 8
    assert runs["bounded"]["max"] == 3
