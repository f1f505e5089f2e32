"""``rascompile.plan``: on tiny configs its caches are the bytes and shapes a real generation allocates, and its
built-in transformer calls are the calls the real pipelines make; it runs on the meta device without weights."""

import pytest
import torch

import rascompile
from rascompile.memory_plan import activation_peak_bytes
from rascompile.plan_inputs import CallSize, transformer_call
from rascompile.runtime.registry import controllers_of
from tests.support import models
from tests.support.capture import transformer_call_kwargs
from tests.support.zoo import BY_KEY

OPTIONS = dict(
    num_inference_steps=8, scheduler_start_step=2, error_reset_steps=(5,), sample_ratio=0.5, inner_backend="aot_eager"
)
PIPELINES = {
    "sd3": (models.tiny_sd3_pipeline, models.sd3_call_kwargs),
    "flux": (models.tiny_flux_pipeline, lambda: models.flux_call_kwargs(true_cfg=True)),
    **{key: (BY_KEY[key].pipeline, BY_KEY[key].pipeline_kwargs) for key in ("qwen-image", "wan", "hunyuan-video")},
}


def _on_meta(call: dict) -> dict:
    call = dict(call)
    if call.get("encoder_hidden_states_mask") is not None:
        # Qwen-Image's text mask: no cache's shape depends on it, and Dynamo cannot trace its use on the meta device
        call["encoder_hidden_states_mask"] = None
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in call.items()}


@pytest.mark.parametrize("key", PIPELINES)
def test_the_plan_is_what_a_generation_allocates_and_the_built_in_call_is_the_pipelines(key):
    make, pipeline_kwargs = PIPELINES[key]
    first = transformer_call_kwargs(make(), pipeline_kwargs())
    pipe = make()
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    with torch.no_grad():
        pipe(**pipeline_kwargs())
    (control,) = controllers_of(pipe.transformer)
    assert control.cache_peak_bytes > 0 and [d for d in control.history if d.kind == "ras"]

    kwargs = pipeline_kwargs()
    planned = rascompile.plan(
        pipe.transformer,
        height=kwargs["height"],
        width=kwargs["width"],
        frames=kwargs.get("num_frames"),
        call_kwargs=_on_meta(first),
        branches=control.cache_peak_branches,
    )
    assert planned.ras and planned.num_tokens == control.layout.num_tokens
    assert planned.cache_bytes == control.cache_peak_bytes, planned.format()
    layout = control.layout
    expected = [layout.output_cache, *layout.kv_caches]
    assert [(c.shape, c.dtype) for c in planned.caches] == [(s, str(d).removeprefix("torch.")) for s, d in expected]
    model = pipe.transformer._orig_mod
    assert planned.weights_bytes == sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert planned.batch == layout.batch_size

    # the built-in call of this family at the pipeline's size is the call the pipeline made, tensor by tensor
    latents = first["hidden_states"]
    text = first["encoder_hidden_states"].shape[1]
    size = CallSize(kwargs["height"], kwargs["width"], kwargs.get("num_frames"), latents.shape[0], text, latents.dtype)
    built = transformer_call(pipe.transformer._orig_mod, size)
    for name, value in built.items():
        if isinstance(value, torch.Tensor):
            assert tuple(value.shape) == tuple(first[name].shape), name
        elif value is not None and name != "return_dict":
            assert value == first[name], name
    shown = planned.format()
    assert f"{planned.num_tokens} image tokens" in shown and "ras_output_cache" in shown


def test_a_float8_plan_is_what_a_float8_generation_allocates_and_what_the_model_dtype_plan_derives():
    make, pipeline_kwargs = PIPELINES["flux"]
    first = transformer_call_kwargs(make(), pipeline_kwargs())
    pipe = make()
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS | {"kv_cache_dtype": "fp8_e4m3"})
    with torch.no_grad():
        pipe(**pipeline_kwargs())
    (control,) = controllers_of(pipe.transformer)
    kinds = {str(dtype) for _, dtype in control.layout.kv_caches}
    assert kinds == {"torch.float8_e4m3fn", "torch.float32"}, "float8 caches and their scales"
    size = dict(height=128, width=128, call_kwargs=_on_meta(first), branches=control.cache_peak_branches)
    fp8 = rascompile.plan(pipe.transformer, kv_cache_dtype="fp8_e4m3", **size)
    assert fp8.cache_bytes == control.cache_peak_bytes
    plain = rascompile.plan(pipe.transformer, **size)
    assert plain.with_kv_cache_dtype("fp8_e4m3").caches == fp8.caches
    assert 0.25 < fp8.cache_bytes / plain.cache_bytes <= 0.5  # float32: 4 bytes -> 1 + 4 / head dim (4 here)


def test_the_plan_of_a_pipeline_directory_reads_its_config_only(tmp_path):
    model = models.tiny_sd3_transformer()
    model.save_config(tmp_path / "transformer")
    planned = rascompile.plan(tmp_path, height=128, width=128, batch=2, text_tokens=7)
    direct = rascompile.plan(model, height=128, width=128, batch=2, text_tokens=7, dtype=torch.bfloat16)
    assert planned.caches == direct.caches and planned.weights_bytes == direct.weights_bytes
    assert {c.dtype for c in planned.caches} == {"bfloat16"}
    with pytest.raises(ValueError, match="neither transformer/config.json"):
        rascompile.plan(tmp_path / "missing", height=128, width=128)


def test_a_family_without_a_built_in_call_is_told_to_pass_one():
    model = BY_KEY["cogvideox"].transformer()
    with pytest.raises(ValueError, match="no built-in call for CogVideoXTransformer3DModel: pass call_kwargs"):
        rascompile.plan(model, height=64, width=64)


def test_sizes_the_pipeline_would_refuse_name_the_field():
    model = models.tiny_flux_transformer()
    with pytest.raises(ValueError, match="height=100 is invalid for this model: must be a multiple of 16"):
        rascompile.plan(model, height=100, width=128)
    with pytest.raises(ValueError, match="frames=6 is invalid for this model: must be 4 . k \\+ 1"):
        rascompile.plan(BY_KEY["wan"].transformer(), height=64, width=64, frames=6)


def test_the_activation_estimate_counts_live_tensors_once_per_storage():
    class Chain(torch.nn.Module):
        def forward(self, x):
            a = x * 2  # 4 KiB, live until c
            b = a.view(-1)  # a view: no new storage
            c = b + 1  # 4 KiB; a dies here
            return c.sum()

    gm = torch.fx.symbolic_trace(Chain())
    values = {}
    for node in gm.graph.nodes:  # run it, keeping each node's value as Dynamo's graphs carry them
        if node.op == "placeholder":
            values[node] = torch.zeros(32, 32)
        elif node.op != "output":
            args = torch.fx.node.map_arg(node.args, values.__getitem__)
            run = getattr(args[0], node.target) if node.op == "call_method" else node.target
            values[node] = node.meta["example_value"] = run(*(args[1:] if node.op == "call_method" else args))
    assert activation_peak_bytes(gm) == 2 * 32 * 32 * 4


# ------------------------------------------------------------------------------------ published configs

#: per published model: (attention layers over the image tokens, heads x head dim, output channels per token)
CACHE_SIZES = {
    "sd3-medium": lambda c: (
        c["num_layers"],
        c["num_attention_heads"] * c["attention_head_dim"],
        4 * c["out_channels"],
    ),
    "flux-dev": lambda c: (
        c["num_layers"] + c["num_single_layers"],
        c["num_attention_heads"] * c["attention_head_dim"],
        c["in_channels"],
    ),
    "qwen-image": lambda c: (
        c["num_layers"],
        c["num_attention_heads"] * c["attention_head_dim"],
        4 * c["out_channels"],
    ),
    "wan2.1-t2v-14b": lambda c: (
        c["num_layers"],
        c["num_attention_heads"] * c["attention_head_dim"],
        4 * c["out_channels"],
    ),
    "hunyuan-video": lambda c: (
        c["num_layers"] + c["num_single_layers"],  # the token refiner's layers see the text only
        c["num_attention_heads"] * c["attention_head_dim"],
        4 * c["out_channels"],
    ),
}


def _image_tokens(entry) -> int:
    rows, columns = entry.height // 16, entry.width // 16  # VAE factor 8, patch 2 (or Flux's 2x2 packing)
    frames = (entry.frames - 1) // 4 + 1 if entry.frames else 1  # the video VAE's 4x temporal factor
    return frames * rows * columns


@pytest.mark.parametrize("name", list(CACHE_SIZES))
def test_published_configs_on_the_meta_device_plan_the_caches_of_the_cache_formula(name):
    """cache bytes = branches x [2 x layers x B x N x H x D x s + B x N x C_out x s] (bf16: s = 2), built from the
    published config values alone; the weights are never allocated."""
    from rascompile.published_configs import PUBLISHED, build_on_meta

    entry = PUBLISHED[name]
    model = build_on_meta(name)
    planned = rascompile.plan(
        model, height=entry.height, width=entry.width, frames=entry.frames, batch=entry.batch, branches=entry.branches
    )
    layers, width, out = CACHE_SIZES[name](entry.config)
    n, b = _image_tokens(entry), entry.batch
    assert planned.ras and planned.num_tokens == n
    assert planned.cache_bytes == entry.branches * (2 * layers * b * n * width * 2 + b * n * out * 2)
    assert len(planned.caches) == 1 + 2 * layers
    assert planned.weights_bytes == sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    assert all(p.device.type == "meta" for p in model.parameters())


def test_the_memory_table_is_rendered_from_the_committed_plans():
    """``benchmarks/memory_table.py`` wrote docs/memory/plans.json with ``rascompile.plan``; the README shows it."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("memory_table", root / "benchmarks" / "memory_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    rows = json.loads((root / "docs" / "memory" / "plans.json").read_text())["rows"]
    readme = (root / "docs" / "memory.md").read_text()
    assert table.render_readme(readme, rows) == readme
    assert [r["model"] for r in rows] == [row[0] for row in table.ROWS]
    # the rows at the published configs' default sizes are the ones the formula test above checks
    from rascompile.published_configs import PUBLISHED

    for row, (name, _, height, width, frames, batch, branches) in zip(rows, table.ROWS):
        entry = PUBLISHED[name]
        if (height, width, frames, batch, branches) == (
            entry.height,
            entry.width,
            entry.frames,
            entry.batch,
            entry.branches,
        ):
            layers, width_hd, out = CACHE_SIZES[name](entry.config)
            n = _image_tokens(entry)
            assert row["cache_bytes"] == branches * (2 * layers * batch * n * width_hd * 2 + batch * n * out * 2)
