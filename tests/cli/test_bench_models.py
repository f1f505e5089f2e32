"""``rascompile bench --model sd3|flux|wan``: each family's inputs are what its diffusers pipeline passes (the
bench's denoising loop reproduces the pipeline's output), the measured FLOPs agree with the analytic SD3 model,
the report names the model and shapes, and a model RAS does not apply to is reported as such."""

import json
import warnings
from dataclasses import replace

import pytest
import torch

import rascompile.bench.runner as bench
import rascompile.runtime.backend
import rascompile.runtime.step_graphs
from rascompile.bench.models import bench_model, flux_image_ids, flux_pack_latents, flux_rope_axes, flux_shift
from rascompile.capture import GraphCapture
from rascompile.cli.main import build_parser
from rascompile.passes.context import RewriteError


def _settings(model: str, **changes) -> bench.BenchSettings:
    """The ``--smoke`` settings of ``model`` with the tests' fast inner backend."""
    args = build_parser().parse_args(["bench", "--model", model, "--smoke", "--no-progress"])
    settings = bench.settings_from_args(args)
    return replace(settings, inner_backend="aot_eager", **changes)


# ============================================================================================ settings


def test_default_shapes_are_mid_size_per_family():
    parse = lambda *argv: bench.settings_from_args(build_parser().parse_args(["bench", *argv]))  # noqa: E731
    sd3, flux, wan = parse(), parse("--model", "flux"), parse("--model", "wan")
    assert sd3 == bench.BenchSettings()  # --model sd3 is the default and changes nothing
    assert (sd3.num_tokens, sd3.batch, sd3.hidden, sd3.text_tokens) == (1024, 2, 768, 77)
    assert (flux.num_tokens, flux.batch, flux.hidden, flux.layers, flux.single_layers) == (1024, 1, 768, 2, 4)
    assert (wan.num_tokens, wan.batch, wan.hidden, wan.frames, wan.latent_size) == (1024, 1, 768, 4, 32)
    assert sum(flux_rope_axes(64)) == 64 and flux_rope_axes(128) == (16, 56, 56)  # FLUX.1's axes at head_dim 128


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--frames", "2"], "--frames applies to --model wan only"),
        (["--model", "flux", "--frames", "2"], "--frames applies to --model wan only"),
        (["--model", "wan", "--single-layers", "2"], "--single-layers applies to --model flux only"),
        (["--model", "flux", "--head-dim", "4"], "--head-dim=4"),
    ],
)
def test_family_options_are_checked(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: pytest.fail("ran the benchmark"))
    assert bench.main_from_args(build_parser().parse_args(["bench", "--smoke", *argv])) == 2
    assert message in capsys.readouterr().err


# ============================================================================================ pipeline inputs


def _spy(model):
    """Record the keyword arguments of every call of ``model`` (a forward pre-hook)."""
    calls = []
    model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    return calls


def _assert_same_calls(ours: list[dict], theirs: list[dict]):
    assert len(ours) == len(theirs)
    for mine, pipe in zip(ours, theirs):
        tensors = {k for k, v in pipe.items() if isinstance(v, torch.Tensor)}
        assert tensors == {k for k, v in mine.items() if isinstance(v, torch.Tensor)}
        for name in tensors:
            assert mine[name].dtype == pipe[name].dtype, name
            torch.testing.assert_close(mine[name], pipe[name], rtol=0, atol=0, msg=name)


def _pipeline(model: str, transformer, scheduler):
    if model == "sd3":
        from diffusers import StableDiffusion3Pipeline

        none = dict.fromkeys(
            ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"]
        )
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, **none)
    elif model == "flux":
        from diffusers import FluxPipeline

        none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, **none)
    else:
        from diffusers import WanPipeline

        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_kwargs(model: str, s, inputs) -> dict:
    size = dict(height=8 * s.latent_size, width=8 * s.latent_size, output_type="latent", return_dict=False)
    if model == "sd3":
        negative, positive = inputs.prompt_embeds.chunk(2)
        negative_pooled, pooled = inputs.pooled.chunk(2)
        return dict(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
            latents=inputs.latents,
            guidance_scale=s.guidance_scale,
            **size,
        )
    if model == "flux":
        return dict(
            prompt_embeds=inputs.prompt_embeds,
            pooled_prompt_embeds=inputs.pooled,
            latents=inputs.latents,
            guidance_scale=s.guidance_scale,
            **size,
        )
    return dict(
        prompt_embeds=inputs.prompt_embeds,
        negative_prompt_embeds=inputs.negative_prompt_embeds,
        latents=inputs.latents,
        num_frames=4 * (s.frames - 1) + 1,
        guidance_scale=s.guidance_scale,
        **size,
    )


@pytest.mark.parametrize("model", ["sd3", "flux", "wan"])
def test_bench_loop_is_the_pipeline(model):
    """The bench's calls and denoising loop are the pipeline's: the same transformer inputs at every call (latents
    layout, position ids, timestep scale, guidance, the branches' text) and the same final latents."""
    s = _settings(model, steps=3)
    family = bench_model(model)
    transformer = bench.build_model(s)
    inputs = bench.make_inputs(s)
    calls = _spy(transformer)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = family.denoise(transformer, s, inputs, s.steps)
        ours_calls, calls[:] = list(calls), []
        pipe = _pipeline(model, transformer, family.make_scheduler(s))
        theirs = pipe(num_inference_steps=s.steps, **_pipeline_kwargs(model, s, inputs))[0]
    assert len(ours_calls) == s.steps * family.calls_per_step
    _assert_same_calls(ours_calls, calls)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    first = ours_calls[0]["hidden_states"]
    expected = {
        "sd3": [2, s.latent_channels, s.latent_size, s.latent_size],
        "flux": [1, s.num_tokens, 4 * s.latent_channels],
        "wan": [1, s.latent_channels, s.frames, s.latent_size, s.latent_size],
    }[model]
    assert list(first.shape) == expected


def test_flux_helpers_are_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

    latents = torch.randn(1, 4, 6, 8)
    torch.testing.assert_close(flux_pack_latents(latents), FluxPipeline._pack_latents(latents, 1, 4, 6, 8))
    torch.testing.assert_close(flux_image_ids(3, 4), FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", None))
    assert flux_shift(1024) == pytest.approx(calculate_shift(1024, 256, 4096, 0.5, 1.15))


# ============================================================================================ FLOPs


def _one_graph(s):
    """The smoke model of ``s``, its first call's kwargs, and its RAS graph and graph inputs."""
    family = bench_model(s.model)
    model = bench.build_model(s)
    inputs = bench.make_inputs(s)
    backend = rascompile.runtime.backend.RASBackend(s.loop_config(), inner_backend="eager")
    captured = GraphCapture(backend)
    scheduler = family.make_scheduler(s)
    family.set_timesteps(s, scheduler, s.steps)
    call = family.call_kwargs(s, inputs, inputs.latents, scheduler.timesteps[0], 0)
    with torch.no_grad():
        torch.compile(model, backend=captured)(**call)
    (graph,) = backend.graphs
    return model, call, graph, captured.example_inputs[0]


def _idx(s, k: int) -> torch.Tensor:
    return bench._random_active(s.batch, s.num_tokens, k, seed=k)


def test_measured_flops_reproduce_the_analytic_sd3_model():
    """FlopCounterMode on the eager model (dense) and on the rewritten graph run eagerly at k (RAS) gives the
    analytic SD3 FLOPs (the attention of scaled_dot_product_attention on the CPU included)."""
    s = _settings("sd3", text_tokens=5)
    spec = s.spec()
    model, call, graph, args = _one_graph(s)
    dense = bench.dense_step_flops(model, call)
    assert dense == pytest.approx(bench.step_flops(spec, s.num_tokens), rel=0.01)
    for k in (s.num_tokens, 40, 16, 1):
        measured = bench.ras_step_flops(graph, args, _idx(s, k))
        assert measured == pytest.approx(bench.step_flops(spec, k), rel=0.01), k


def test_cpu_attention_is_counted():
    from rascompile.bench.flops import count_flops

    q = torch.randn(2, 3, 10, 8)
    k = torch.randn(2, 3, 7, 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(sdpa, q, k, k) == 2 * (2 * 2 * 3 * 10 * 7 * 8)  # Q K^T and P V
    assert count_flops(torch.mm, torch.randn(4, 5), torch.randn(5, 6)) == 2 * 4 * 5 * 6


def test_flux_ras_flops_fall_with_k():
    s = _settings("flux")
    model, call, graph, args = _one_graph(s)
    assert graph.controller is not None, graph.fallback_reason
    dense = bench.dense_step_flops(model, call)
    flops = [bench.ras_step_flops(graph, args, _idx(s, k)) for k in (s.num_tokens, 32, 16, 8)]
    assert flops[0] == pytest.approx(dense, rel=0.01)  # the capture step does the dense step's work
    assert all(a > b for a, b in zip(flops, flops[1:]))
    # the text rows of the joint sequence are computed at every k: the ideal stays below N / k
    assert 1 < dense / flops[-1] < s.num_tokens / 8


# ============================================================================================ whole runs


def _run(s, tmp_path):
    # the eager inner backend: these runs check the benchmark's plumbing, not compilation (test_cli's smoke
    # run covers aot_eager)
    s = replace(s, repeats=1, loop_repeats=1, inner_backend="eager")
    results = bench.run_bench(s, log=lambda _: None)
    report = bench.format_report(results)
    (tmp_path / "r.json").write_text(json.dumps(results, default=str))  # the --json file is JSON
    return results, report


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_bench_runs_and_names_model_and_shapes(model, tmp_path):
    s = _settings(model, ratios=(0.25,), eager_loop=False)
    results, report = _run(s, tmp_path)
    info = results["model"]
    family = bench_model(model)
    assert info["name"] == model and info["class"] == family.class_name
    assert f"--model {model}" in report and f"model: {family.class_name}" in report
    assert info["num_tokens"] == s.num_tokens and info["batch"] == 1
    shapes = {"flux": [1, 64, 64], "wan": [1, 16, 2, 8, 8]}[model]
    assert info["inputs"]["hidden_states"] == shapes
    assert "hidden_states [" + ", ".join(map(str, shapes)) + "]" in report
    if not results["ras"]["applies"]:  # wan before the passes learn video latents: the reason, no speedups
        assert results["ras"]["reason"] in report and "speedup" not in report
        return
    assert results["flops"]["source"] == "measured"
    rows = {r["name"]: r for r in results["per_step"]}
    ras = rows["RAS ratio 0.25"]
    assert ras["k"] == s.num_tokens // 4 and ras["flops"] == ras["measured_flops"]
    assert 1 < ras["ideal_speedup"] == pytest.approx(rows["dense compiled"]["flops"] / ras["flops"])
    assert ras["fraction_of_ideal"] == pytest.approx(ras["speedup"] / ras["ideal_speedup"])
    assert results["loop"]["calls_per_step"] == family.calls_per_step
    assert results["loop"]["run_ras_steps"] == results["loop"]["planned_ras_steps"] > 0
    assert "FLOPs measured with FlopCounterMode" in report


def test_model_ras_does_not_apply_to_is_reported(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise RewriteError("no image-token source found (a test's refusal)")

    monkeypatch.setattr(rascompile.runtime.step_graphs, "build_ras_graph", refuse)
    s = _settings("flux", ratios=(0.25,))
    with pytest.warns(UserWarning, match="runs dense"):
        results, report = _run(s, tmp_path)
    assert results["ras"] == {"applies": False, "reason": "no image-token source found (a test's refusal)"}
    assert [r["name"] for r in results["per_step"]] == ["dense compiled", "dense eager"]
    assert all(r["flops"] > 0 and r["median_s"] > 0 for r in results["per_step"])
    assert "loop" not in results and "controller" not in results
    assert "RAS DOES NOT APPLY to FluxTransformer2DModel" in report
    assert "reason: no image-token source found (a test's refusal)" in report
    for claim in ("speedup", "ideal", "meas/ideal", "RAS ratio", "Denoising loop"):
        assert claim not in report, claim
