"""RAS under what users stack on the transformer: never silently wrong, and when off, said in the user's words."""

import warnings

import pytest
import torch
from diffusers import PyramidAttentionBroadcastConfig

import rascompile.runtime.backend as backend_module
from rascompile.runtime.graph import DenseGraph, RASGraph
from tests.support.models import flux_call_kwargs, tiny_flux_pipeline

STEPS = 8
OPTIONS = {"sample_ratio": 0.5, "num_inference_steps": STEPS, "inner_backend": "aot_eager"}


def _generate(pipe, seed=0):
    with torch.no_grad():
        return pipe(**flux_call_kwargs(batch=1, steps=STEPS, seed=seed))[0]


def _pab_pipeline():
    pipe = tiny_flux_pipeline()
    pipe.transformer.enable_cache(
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: pipe.current_timestep,
        )
    )
    return pipe


def test_pyramid_attention_broadcast_with_ras_gives_identical_results_and_says_why():
    """PAB's hooks split the transformer's calls over several Dynamo graphs, and the RAS graph sees only some
    of a generation's steps. Every call then runs dense: three identical calls give identical results, equal to
    PAB without rascompile, and the warning, repeated as generations go by, names PAB."""
    expected = _generate(_pab_pipeline())
    pipe = _pab_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [_generate(pipe) for _ in range(3)]
    for out in outs:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    messages = [str(w.message) for w in caught if "RAS is off for this transformer" in str(w.message)]
    assert any("PyramidAttentionBroadcast (transformer.enable_cache) splits" in m for m in messages), messages
    # said again as generations go by, not once per process (the graph that warns is a piece of the transformer
    # under PAB, so its count of generations is its own)
    assert len(set(messages)) >= 2, messages
    backend = next(b for b in backend_module._SHARED_BACKENDS.values() if any(g.hooks for g in b.graphs))
    assert any(isinstance(g, RASGraph) for g in backend.graphs)
    assert any(isinstance(g, DenseGraph) and g.hooks for g in backend.graphs)
    assert all(not c.history for c in backend.controllers_of(pipe.transformer)), "no RAS step may run"


def test_a_dense_graph_of_another_model_does_not_switch_ras_off():
    """Only graphs that share the transformer's parameters count as splitting it."""
    pipe = tiny_flux_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    other = torch.nn.Linear(4, 4)
    compiled_other = torch.compile(lambda x: other(x).sum(dim=1), backend="ras", options=OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled_other(torch.randn(2, 4))
        _generate(pipe)
    [control] = backend_module.controllers_of(pipe.transformer)
    assert any(d.kind == "ras" for d in control.history)


def _lora_pipeline():
    from peft import LoraConfig

    pipe = tiny_flux_pipeline()
    gen = torch.Generator().manual_seed(7)
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False),
        adapter_name="style",
    )
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return pipe


def test_a_new_lora_weight_after_compile_never_raises():
    """``set_adapters`` with a new weight after compiling makes peft's scale a graph input that inductor reads with
    ``.item()``; the inner compile of that graph fails outside Dynamo's tracing context. The call still returns the
    model's output (that graph runs uncompiled, with a warning), equal to the same LoRA state without rascompile."""
    pytest.importorskip("peft")
    reference = _lora_pipeline()
    reference.transformer.set_adapters(["style"], weights=[0.5])
    expected = _generate(reference)
    pipe = _lora_pipeline()
    options = {"sample_ratio": 1.0, "num_inference_steps": STEPS, "inner_backend": "aot_eager"}
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _generate(pipe)
        pipe.transformer.set_adapters(["style"], weights=[0.5])
        out = _generate(pipe)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def _ras_generate(pipe, options, seed=0):
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _generate(pipe, seed=seed)
    return out, [str(w.message) for w in caught if "rascompile" in str(w.message)]


def test_model_cpu_offload_keeps_ras():
    """``enable_model_cpu_offload`` wraps the transformer's forward in accelerate's hook, so Dynamo roots the module
    paths at the hook's ``module`` instead of ``self``. RAS stays on, and its images equal RAS without offloading
    (CPU to CPU here: the offload moves nothing, the hook is what changes the graph)."""
    plain, plain_warnings = _ras_generate(tiny_flux_pipeline(), OPTIONS)
    pipe = tiny_flux_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    offloaded, offload_warnings = _ras_generate(pipe, OPTIONS)
    assert not plain_warnings and not offload_warnings, offload_warnings
    [control] = backend_module.controllers_of(pipe.transformer)
    assert [d.kind for d in control.history].count("ras") >= 4
    torch.testing.assert_close(offloaded, plain, rtol=1e-5, atol=1e-5)


def _enable_group_offload(pipe):
    cpu = torch.device("cpu")
    pipe.transformer.enable_group_offload(
        onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
    )


def _enable_first_block_cache(pipe):
    from diffusers import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))


@pytest.mark.parametrize(
    "stack, names, advice",
    [
        (_enable_group_offload, "group offloading (enable_group_offload)", "pipe.enable_model_cpu_offload() keeps RAS"),
        (_enable_first_block_cache, "FirstBlockCache (transformer.enable_cache)", "transformer.disable_cache()"),
    ],
    ids=["group_offload_block_level", "first_block_cache"],
)
def test_stacks_that_split_the_graph_run_dense_exactly_and_say_what_to_do(stack, names, advice):
    """Group offloading and FirstBlockCache split the transformer into pieces RAS cannot rewrite (keeping RAS
    across such pieces is the graph-break work): every generation equals the stack without rascompile, and the
    warnings and ``rascompile.status`` name the hook and what keeps RAS."""
    import rascompile

    reference = tiny_flux_pipeline()
    stack(reference)
    expected = _generate(reference)
    pipe = tiny_flux_pipeline()
    stack(pipe)
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [_generate(pipe) for _ in range(2)]
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    messages = [str(w.message) for w in caught if "rascompile" in str(w.message)]
    assert any(names in m and advice in m for m in messages), messages
    report = rascompile.status(pipe.transformer)
    assert names in report and "dense:" in report, report


def test_status_reports_ras_and_the_last_generation():
    import rascompile

    pipe = tiny_flux_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    _generate(pipe)
    report = rascompile.status(pipe.transformer)
    [control] = backend_module.controllers_of(pipe.transformer)
    ras_steps = [d.kind for d in control.history].count("ras")
    assert "graph 0: RAS over 64 image tokens, batch 1" in report, report
    assert f"1 generation(s) with a RAS schedule; the last ran {ras_steps} ras," in report, report
