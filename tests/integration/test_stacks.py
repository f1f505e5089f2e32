"""RAS under what users stack on the transformer: never silently wrong, and when off, said in the user's words."""

import warnings
from pathlib import Path

import pytest
import torch

import rascompile.runtime.registry as registry
from rascompile.runtime.graph import DenseGraph, RASGraph
from tests.support.models import flux_call_kwargs, tiny_flux_pipeline
from tests.support.stacks import STACKS, _lora, _pyramid_attention_broadcast, stacks_table

STEPS = 8


@pytest.fixture(autouse=True)
def _restore_attention_backend():
    """diffusers' ``set_attention_backend`` also sets a process-wide active backend; put it back after each test."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


OPTIONS = {"sample_ratio": 0.5, "num_inference_steps": STEPS, "inner_backend": "aot_eager"}


def _generate(pipe, seed=0):
    with torch.no_grad():
        return pipe(**flux_call_kwargs(batch=1, steps=STEPS, seed=seed))[0]


def _pab_pipeline():
    pipe = tiny_flux_pipeline()
    _pyramid_attention_broadcast(pipe)
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
    params = {id(p) for p in pipe.transformer.parameters()}
    graphs = [g for b in registry._SHARED_BACKENDS.values() for g in b.graphs if g.parameter_ids & params]
    backend = next(b for b in registry._SHARED_BACKENDS.values() if any(g in b.graphs for g in graphs))
    # every graph is a piece (a layer Dynamo traced alone, or one PAB's hooks shaped): none is a whole transformer
    assert not any(isinstance(g, RASGraph) for g in graphs)
    assert any(isinstance(g, DenseGraph) and g.hooks for g in graphs)
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
    [control] = registry.controllers_of(pipe.transformer)
    assert any(d.kind == "ras" for d in control.history)


def _lora_pipeline():
    pipe = tiny_flux_pipeline()
    _lora(pipe)
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
    pipe.transformer.compile(backend="ras", options=options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _generate(pipe, seed=seed)
    return out, [str(w.message) for w in caught if "rascompile" in str(w.message)]


def test_model_cpu_offload_keeps_ras():
    """``enable_model_cpu_offload`` wraps the transformer's forward in accelerate's hook, so Dynamo roots the module
    paths at the hook's ``module`` instead of ``self``. Compiled in place, RAS stays on, and its images equal RAS
    without offloading (CPU to CPU here: the offload moves nothing, the hook is what changes the graph)."""
    plain, plain_warnings = _ras_generate(tiny_flux_pipeline(), OPTIONS)
    pipe = tiny_flux_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    offloaded, offload_warnings = _ras_generate(pipe, OPTIONS)
    assert not plain_warnings and not offload_warnings, offload_warnings
    [control] = registry.controllers_of(pipe.transformer)
    assert [d.kind for d in control.history].count("ras") >= 4
    torch.testing.assert_close(offloaded, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stack", STACKS, ids=lambda s: s.key)
def test_every_stack_keeps_ras_or_runs_dense_exactly_and_says_why(stack):
    """Each row of the README's table of stacks: RAS runs (RAS steps happen, no fallback warning), or every
    generation runs dense, equals the stack without rascompile, and a warning names the stack in the user's words.
    Identical calls give identical results either way, and nothing raises."""
    if stack.needs:
        pytest.importorskip(stack.needs)
    reference = tiny_flux_pipeline()
    stack.apply(reference)
    expected = _generate(reference)
    pipe = tiny_flux_pipeline()
    stack.apply(pipe)
    if stack.compile is not None:
        stack.compile(pipe, OPTIONS)
    elif stack.in_place:
        pipe.transformer.compile(backend="ras", options=OPTIONS)
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [_generate(pipe) for _ in range(3)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    messages = [str(w.message) for w in caught if "rascompile" in str(w.message)]
    ras_steps = sum(d.kind == "ras" for c in registry.controllers_of(pipe.transformer) for d in c.history)
    if stack.ras:
        assert ras_steps > 0 and not messages, messages
        generations = sum(c.generations for c in registry.controllers_of(pipe.transformer))
        assert generations == 3, "every generation must run through the RAS graph"
    else:
        assert ras_steps == 0
        torch.testing.assert_close(outs[0], expected, rtol=1e-5, atol=1e-5)
        assert any(stack.says in m for m in messages), messages


def test_table_of_stacks_is_generated_from_the_tests():
    readme = (Path(__file__).resolve().parents[2] / "docs" / "supported.md").read_text()
    start, end = "<!-- supported-stacks:start -->\n", "<!-- supported-stacks:end -->"
    assert start in readme and end in readme, "README lacks the supported-stacks markers"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == stacks_table(), "README's table of stacks is stale: run python -m tests.support.stacks"


def test_dense_fallbacks_say_what_keeps_ras():
    """A hook-shaped dense graph's warning ends with the way out, and ``rascompile.status`` lists the hooks."""
    import rascompile
    from tests.support.stacks import _group_offload

    pipe = tiny_flux_pipeline()
    _group_offload(pipe)
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _generate(pipe)
    messages = [str(w.message) for w in caught if "group offloading" in str(w.message)]
    assert any("To keep RAS: pipe.enable_model_cpu_offload() keeps RAS" in m for m in messages), messages
    report = rascompile.status(pipe.transformer)
    assert "hooks on this transformer: group offloading (enable_group_offload)" in report, report
    assert "dense:" in report, report


def test_status_reports_ras_and_the_last_generation():
    import rascompile

    pipe = tiny_flux_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    _generate(pipe)
    report = rascompile.status(pipe.transformer)
    [control] = registry.controllers_of(pipe.transformer)
    ras_steps = [d.kind for d in control.history].count("ras")
    assert "graph 0: RAS over 64 image tokens, batch 1" in report, report
    assert f"1 generation(s) with a RAS schedule; the last ran {ras_steps} ras," in report, report


def test_status_says_when_offloading_hooks_bypass_a_compile_wrapper():
    """``pipe.transformer = torch.compile(...)`` after ``enable_model_cpu_offload``: the pipeline re-installs its
    hooks on the wrapper after the first call, and later calls run uncompiled. ``rascompile.status`` says so and
    says what to do; ``rascompile.apply`` compiles in place and keeps RAS for every generation."""
    import rascompile
    from rascompile import RASConfig

    pipe = tiny_flux_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    _generate(pipe)
    assert "Compile in place instead: pipe.transformer.compile(backend='ras'" in rascompile.status(pipe.transformer)

    pipe = tiny_flux_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")
    backend = rascompile.apply(pipe, RASConfig(sample_ratio=0.5), inner_backend="aot_eager")
    outs = [_generate(pipe) for _ in range(3)]
    [control] = backend.controllers_of(pipe.transformer)
    assert control.generations == 3 and any(d.kind == "ras" for d in control.history)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def _compiled_lora_pipeline(weight=None, disabled=False):
    import rascompile

    pipe = tiny_flux_pipeline()
    _lora(pipe)
    if weight is not None:
        pipe.transformer.set_adapters(["style"], weights=[weight])
    if disabled:
        pipe.transformer.disable_adapters()
    backend = rascompile.RASBackend.from_options(OPTIONS)
    pipe.transformer = torch.compile(pipe.transformer, backend=backend)
    return pipe, backend


def _ras_steps(backend, pipe):
    return sum(d.kind == "ras" for c in backend.controllers_of(pipe.transformer) for d in c.history)


def test_lora_weight_changes_keep_ras_and_equal_a_fresh_compile():
    """A new adapter weight after compiling makes peft's scale a graph input read with ``.item()``: the rewrite
    keeps it a tensor input, so the recompiled graph runs RAS, serves every later weight without compiling again,
    and equals a fresh compile of the same LoRA state. Disabling the adapters (a structural change) recompiles
    once and equals a fresh compile too."""
    pytest.importorskip("peft")
    pipe, backend = _compiled_lora_pipeline()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _generate(pipe)
        for weight in (0.5, 0.8):
            pipe.transformer.set_adapters(["style"], weights=[weight])
            out = _generate(pipe)
            fresh_pipe, fresh_backend = _compiled_lora_pipeline(weight=weight)
            torch.testing.assert_close(out, _generate(fresh_pipe), rtol=1e-5, atol=1e-5)
            assert _ras_steps(backend, pipe) > 0 and _ras_steps(fresh_backend, fresh_pipe) > 0
        assert len(backend.graphs) == 2, "one recompile for the weight that became an input, none after"
        pipe.transformer.disable_adapters()
        out = _generate(pipe)
        assert len(backend.graphs) == 3 and _ras_steps(backend, pipe) > 0
        fresh_pipe, _ = _compiled_lora_pipeline(disabled=True)
        torch.testing.assert_close(out, _generate(fresh_pipe), rtol=1e-5, atol=1e-5)
    assert not [str(w.message) for w in caught if "rascompile" in str(w.message)]


def test_fuse_and_unfuse_lora_keep_ras_and_equal_a_fresh_compile():
    pytest.importorskip("peft")
    pipe, backend = _compiled_lora_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unfused = _generate(pipe)
        pipe.fuse_lora()
        fused = _generate(pipe)
        fresh = tiny_flux_pipeline()
        _lora(fresh)
        fresh.fuse_lora()
        fresh.transformer = torch.compile(fresh.transformer, backend="ras", options=OPTIONS)
        torch.testing.assert_close(fused, _generate(fresh), rtol=1e-5, atol=1e-5)
        pipe.unfuse_lora()
        torch.testing.assert_close(_generate(pipe), unfused, rtol=1e-5, atol=1e-5)
    assert len(backend.graphs) <= 3 and _ras_steps(backend, pipe) > 0


def test_torchao_config_through_from_pretrained_keeps_ras(tmp_path):
    """torchao through diffusers' ``TorchAoConfig`` at load time (the quantized linears the table's torchao rows make
    with ``quantize_``): RAS runs, without a warning, and identical calls give identical images."""
    pytest.importorskip("torchao")
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    import rascompile
    from rascompile import RASConfig
    from tests.support.models import tiny_flux_transformer

    tiny_flux_transformer().save_pretrained(tmp_path)
    quantized = FluxTransformer2DModel.from_pretrained(
        tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), torch_dtype=torch.bfloat16
    )
    assert "torchao" in type(quantized.proj_out.weight).__module__
    pipe = tiny_flux_pipeline(quantized)
    backend = rascompile.apply(pipe, RASConfig(sample_ratio=0.5), inner_backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [_generate(pipe) for _ in range(2)]
    assert not [str(w.message) for w in caught if "rascompile" in str(w.message)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    assert _ras_steps(backend, pipe) > 0
