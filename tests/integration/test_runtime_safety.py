"""The backend and runtime never crash and are never silently wrong: per-branch guidance, threads, calls after
the last step, grad-mode calls mid-generation, Dynamo's recompile limit, failures inside the passes."""

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rascompile
from rascompile import RASConfig
from rascompile.runtime.backend import BACKEND_OPTIONS, RASBackend
from rascompile.runtime.registry import controllers_of
from rascompile.runtime.selector import select_active_tokens
from tests.support.capture import capture_graph
from tests.support.models import sd3_call_kwargs, tiny_sd3_pipeline
from tests.support.synthetic import KeywordAttentionDiT

STEPS = 8
SHORT = dict(num_inference_steps=STEPS, scheduler_start_step=2, error_reset_steps=(5,))
OPTIONS = {**SHORT, "sample_ratio": 0.5, "inner_backend": "aot_eager"}


def _branches(batch=2, seed=0):
    """Latents and the two guidance branches' embeddings for the tiny SD3 transformer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    cond = dict(
        encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
    )
    uncond = dict(
        encoder_hidden_states=torch.randn(batch, 7, 32, generator=g),
        pooled_projections=torch.randn(batch, 16, generator=g),
    )
    return x, cond, uncond


def euler_per_branch(transformer, scheduler, x, cond, uncond, guidance=4.0, on_step=None):
    """A pipeline loop that calls the transformer once per guidance branch, as Wan, Lumina2 or CogView4 do."""
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if on_step is not None:
                on_step(i)
            timestep = t.expand(x.shape[0])
            c = transformer(hidden_states=x, timestep=timestep, **cond, return_dict=False)[0]
            u = transformer(hidden_states=x, timestep=timestep, **uncond, return_dict=False)[0]
            x = scheduler.step(u + guidance * (c - u), t, x, return_dict=False)[0]
    return x


def euler_batched(transformer, scheduler, x, cond, uncond, guidance=4.0):
    """The same loop with batched guidance: one call on [uncond; cond] rows, as SD3's pipeline makes it."""
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = transformer(
                hidden_states=torch.cat([x, x]), timestep=t.expand(2 * x.shape[0]), **both, return_dict=False
            )[0]
            u, c = out.chunk(2)
            x = scheduler.step(u + guidance * (c - u), t, x, return_dict=False)[0]
    return x


def _compiled_pipe(path):
    pipe = tiny_sd3_pipeline()
    if path == "apply":
        backend = rascompile.apply(pipe, RASConfig(sample_ratio=0.5, **SHORT), inner_backend="aot_eager")
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
        backend = None
    return pipe, backend


@pytest.mark.parametrize("path", ["apply", "options"])
def test_one_call_per_guidance_branch_equals_batched_guidance_under_ras(path):
    """Each branch keeps its own caches and both branches of an image share one selection per step, as the
    rows of batched guidance do: the per-branch loop equals the batched loop, RAS steps included."""
    x, cond, uncond = _branches()
    pipe, backend = _compiled_pipe(path)
    batched = euler_batched(pipe.transformer, pipe.scheduler, x, cond, uncond)
    (control,) = _controllers(pipe, backend)
    batched_kinds = [d.kind for d in control.history]
    torch._dynamo.reset()
    pipe, backend = _compiled_pipe(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_branch = euler_per_branch(pipe.transformer, pipe.scheduler, x, cond, uncond)
        again = euler_per_branch(pipe.transformer, pipe.scheduler, x, cond, uncond)
    assert not [str(w.message) for w in caught if "rascompile" in str(w.message) or "generation" in str(w.message)]
    (control,) = _controllers(pipe, backend)
    kinds = [d.kind for d in control.history]
    assert kinds == ["capture", "capture", "ras", "ras", "ras", "capture", "ras", "ras"] == batched_kinds
    assert control.cache_peak_branches == 2, "one set of caches per branch"
    torch.testing.assert_close(per_branch, batched, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, per_branch, rtol=0, atol=0)


def test_a_branch_that_appears_mid_generation_fills_its_caches_first():
    """Guidance that starts at a RAS step (a guidance interval): the new branch's first call is a capture
    step, which equals the uncompiled transformer, never a RAS step over empty caches."""
    x, cond, uncond = _branches()
    pipe, _ = _compiled_pipe("options")
    reference = tiny_sd3_pipeline().transformer
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            timestep = t.expand(2)
            c = pipe.transformer(hidden_states=x, timestep=timestep, **cond, return_dict=False)[0]
            if i >= 3:  # steps 2-4 are RAS steps; the second branch joins at step 3
                u = pipe.transformer(hidden_states=x, timestep=timestep, **uncond, return_dict=False)[0]
                if i == 3:
                    expected = reference(hidden_states=x, timestep=timestep, **uncond, return_dict=False)[0]
                    torch.testing.assert_close(u, expected, rtol=1e-5, atol=1e-5)
                c = u + 4.0 * (c - u)
            x = scheduler.step(c, t, x, return_dict=False)[0]
    (control,) = _controllers(pipe)
    assert [d.kind for d in control.history][2:5] == ["ras", "ras", "ras"]


def test_batched_guidance_still_runs_ras_after_a_per_branch_generation():
    """The per-branch fallback lasts one generation: a following batched generation runs RAS again."""
    pipe = tiny_sd3_pipeline()
    backend = rascompile.apply(pipe, RASConfig(sample_ratio=0.5, **SHORT), inner_backend="aot_eager")
    x, cond, uncond = _branches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        euler_per_branch(pipe.transformer, pipe.scheduler, x, cond, uncond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    euler_per_branch(pipe.transformer, pipe.scheduler, torch.cat([x, x]), both, both)  # two identical calls
    with torch.no_grad():
        pipe(**sd3_call_kwargs(steps=STEPS))
    kinds = [d.kind for d in backend.graphs[-1].controller.history]
    assert kinds.count("ras") > 0, kinds


def test_concurrent_first_calls_of_two_compiled_pipelines_match_single_thread():
    def generate(pipe):
        with torch.no_grad():
            return pipe(**sd3_call_kwargs(num_prompts=2, steps=STEPS))[0]

    alone = []
    for _ in range(2):
        pipe = tiny_sd3_pipeline()
        rascompile.apply(pipe, RASConfig(sample_ratio=0.5, **SHORT), inner_backend="aot_eager")
        alone.append(generate(pipe))
        torch._dynamo.reset()
    pipes = []
    for _ in range(2):
        pipe = tiny_sd3_pipeline()
        pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
        pipes.append(pipe)
    start = threading.Barrier(2)

    def run(pipe):
        start.wait()
        return generate(pipe)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ThreadPoolExecutor(2) as pool:
            results = [f.result() for f in [pool.submit(run, p) for p in pipes]]
    for got in results:
        torch.testing.assert_close(got, alone[0], rtol=0, atol=0)
    assert not any("runs dense" in str(w.message) for w in caught)
    assert all(c.generations == 1 for p in pipes for c in _controllers(p))


def _controllers(pipe, backend=None):
    """The controllers that ran ``pipe``'s transformer instance (one per resolution and graph layout)."""
    return backend.controllers_of(pipe.transformer) if backend is not None else controllers_of(pipe.transformer)


def test_one_compiled_transformer_interleaved_by_two_threads_raises():
    pipe = tiny_sd3_pipeline()
    rascompile_backend = RASBackend(RASConfig(sample_ratio=0.5, **SHORT), inner_backend="aot_eager")
    compiled = torch.compile(pipe.transformer, backend=rascompile_backend)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    x, cond, _ = _branches(seed=1)
    y, _, _ = _branches(seed=2)

    def call(latents, step):
        t = scheduler.timesteps[step].expand(latents.shape[0])
        with torch.no_grad():
            return compiled(hidden_states=latents, timestep=t, **cond, return_dict=False)[0]

    with ThreadPoolExecutor(1) as first, ThreadPoolExecutor(1) as second:
        first.submit(call, x, 0).result()
        second.submit(call, y, 0).result()  # another generation begins in the other thread
        with pytest.raises(RuntimeError, match="another thread"):
            first.submit(call, x, 1).result()
        second.submit(call, y, 1).result()  # the thread that owns the generation goes on
    graph = rascompile_backend.graphs[0]
    assert [d.step for d in graph.controller.history] == [0, 1]

    graph.controller.busy.acquire()  # a call in flight in some thread
    try:
        with pytest.raises(RuntimeError, match="already running in another thread"):
            call(y, 2)
    finally:
        graph.controller.busy.release()


def test_a_call_after_the_last_step_runs_dense():
    pipe = tiny_sd3_pipeline()
    backend = rascompile.apply(pipe, RASConfig(sample_ratio=0.5, **SHORT), inner_backend="aot_eager")
    with torch.no_grad():
        pipe(**sd3_call_kwargs(steps=STEPS))
    assert pipe.scheduler.step_index == STEPS  # the scheduler now points past its last step
    x, cond, _ = _branches()
    t = pipe.scheduler.timesteps[-1].expand(2)
    args = dict(hidden_states=x, timestep=t, **cond, joint_attention_kwargs=None, return_dict=False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = pipe.transformer(**args)[0]
        expected = pipe.transformer.forward(**args)[0]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(backend.graphs) == 1, "the call must reach the generation's own graph"


def test_a_grad_mode_call_mid_generation_does_not_shift_the_step_count():
    pipe = tiny_sd3_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    x, cond, uncond = _branches()
    grad_step = 2

    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, t in enumerate(scheduler.timesteps):
            with torch.set_grad_enabled(i == grad_step):
                out = pipe.transformer(hidden_states=x, timestep=t.expand(2), **cond, return_dict=False)[0]
            x = scheduler.step(out.detach(), t, x, return_dict=False)[0]
    controllers = _controllers(pipe)
    assert len(controllers) == 1, "the grad-mode graph and the inference graph drive one controller"
    history = controllers[0].history
    assert [d.step for d in history] == [s for s in range(STEPS) if s != grad_step]
    by_step = {d.step: d.kind for d in history}
    assert by_step[5] in ("capture", "dense"), "the error-reset step must stay dense"
    assert by_step[grad_step + 1] == "capture", "the step after the missed one refills the caches"
    assert by_step[grad_step + 2] == "ras"


@pytest.mark.parametrize("scale", [1e39, -1e39, 1e300, 300.0, -300.0, 1e-300])
def test_extreme_starvation_scales_rank_by_the_score(scale):
    g = torch.Generator().manual_seed(0)
    metric = torch.rand(3, 40, generator=g) + 0.01
    metric[:, 5] = 0.0
    drops = torch.randint(-30, -20, (3, 40), generator=g).float()
    active = select_active_tokens(metric, drops.clone(), 20, 0.5, scale)
    # the order the scores define, compared exactly in log space: log m_i + s d_i
    log_m = [
        [float("-inf") if m == 0 else torch.tensor(m, dtype=torch.float64).log().item() for m in row]
        for row in metric.tolist()
    ]
    expected = []
    for row_m, row_d in zip(log_m, drops.tolist()):
        if abs(scale) > 256:
            key = lambda i, row_m=row_m, row_d=row_d: (row_d[i] * (1 if scale > 0 else -1), row_m[i])  # noqa: E731
        else:
            key = lambda i, row_m=row_m, row_d=row_d: row_m[i] + scale * row_d[i]  # noqa: E731
        order = sorted(range(40), key=key)
        expected.append(sorted(order[10:30]))
    assert active.tolist() == expected
    assert active.tolist() != [list(range(20))] * 3


@torch._dynamo.config.patch(recompile_limit=2)
def test_reaching_dynamos_recompile_limit_warns():
    model = KeywordAttentionDiT(num_tokens=16, with_mask=False)
    backend = RASBackend(
        RASConfig(num_inference_steps=4, scheduler_start_step=1, error_reset_steps=()), inner_backend="eager"
    )
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for side in (8, 12):
            compiled(torch.randn(2, 4, side, side))
    messages = [str(w.message) for w in caught if "recompile_limit" in str(w.message)]
    assert len(messages) == 1 and "recompile_limit=2" in messages[0] and "without RAS" in messages[0]


def test_an_internal_error_in_a_pass_runs_dense_with_one_warning(monkeypatch):
    from rascompile.passes.pipeline import RAS_PASSES

    def broken_pass(gm, ctx):
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(RAS_PASSES, "passes", [*RAS_PASSES.passes[:3], broken_pass, *RAS_PASSES.passes[3:]])
    model = KeywordAttentionDiT()
    options = {"num_inference_steps": 4, "scheduler_start_step": 1, "error_reset_steps": (), "inner_backend": "eager"}
    compiled = torch.compile(model, backend="ras", options=options)
    x = torch.randn(2, 4, 8, 8)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        outs = [compiled(x) for _ in range(3)]
    messages = [str(w.message) for w in caught if "rascompile" in str(w.message)]
    assert len(messages) == 1 and "internal error" in messages[0] and "ZeroDivisionError: injected" in messages[0]
    for out in outs:
        torch.testing.assert_close(out, model(x))


def test_backend_arguments_are_checked_up_front(tmp_path):
    with pytest.raises(TypeError, match=r"RASBackend\(config=...\) must be a RASConfig.*dict.*from_options"):
        RASBackend({"sample_ratio": 0.5})
    with pytest.raises(TypeError, match="dump_graphs=123 is invalid"):
        RASBackend(RASConfig(**SHORT), dump_graphs=123)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="dump_graphs=.*cannot create"):
        RASBackend(RASConfig(**SHORT), dump_graphs=str(blocker / "dumps"))
    backend = RASBackend(RASConfig(**SHORT), dump_graphs=tmp_path / "dumps")
    assert (tmp_path / "dumps").is_dir() and backend.dump_graphs == str(tmp_path / "dumps")


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-2, 12), max_size=4),
    st.sampled_from(["std", "l2norm", "random", "eager", "aot_eager"]),
)
_KEYS = st.sampled_from([*RASConfig.field_names(), *BACKEND_OPTIONS, "bogus"])


@pytest.fixture(scope="module")
def captured_dit():
    model = KeywordAttentionDiT()
    x = torch.randn(2, 4, 8, 8)
    gm, inputs = capture_graph(model, x)
    with torch.no_grad():
        dense = gm(*inputs)[0]
    return gm, inputs, dense


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.dictionaries(_KEYS, _VALUES, max_size=4))
def test_random_options_name_the_field_or_run_like_dense(options, captured_dit, tmp_path_factory):
    gm, inputs, dense = captured_dit
    options = {"num_inference_steps": 4, **options}
    if "dump_graphs" in options and isinstance(options["dump_graphs"], str):
        options["dump_graphs"] = str(tmp_path_factory.mktemp("dumps") / (options["dump_graphs"] or "d"))
    options.setdefault("inner_backend", "eager")
    try:
        backend = RASBackend.from_options(options)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        assert any(key in message for key in options), message
        return
    graph = backend(gm, list(inputs))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        out = graph(*inputs)[0]  # the first call of a generation: dense or a capture step
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
