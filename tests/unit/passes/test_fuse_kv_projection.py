"""The fuse_kv_projection pass: every K/V chain feeding a cache becomes one linear_scatter_ op, same results."""

import dataclasses

import pytest
import torch

import rascompile
from rascompile import RASBackend, RASConfig
from rascompile.passes import ops
from rascompile.passes.fuse_kv_projection import WRITES, NoMatch, _verify, fused_op_kwargs, parse_chain
from rascompile.passes.pipeline import build_ras_graph
from tests.support.capture import capture_pipeline_graph
from tests.support.models import (
    lumina_call_kwargs,
    sd3_call_kwargs,
    tiny_lumina_pipeline,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
)


def tiny_sd35_pipeline():
    return tiny_sd3_pipeline(tiny_sd3_transformer(qk_norm="rms_norm"))


MODELS = {
    "sd3": (tiny_sd3_pipeline, sd3_call_kwargs, {"key": "linear", "value": "linear"}),
    "sd3.5_rms_norm": (tiny_sd35_pipeline, sd3_call_kwargs, {"key": "linear + rms_norm", "value": "linear"}),
    "lumina": (tiny_lumina_pipeline, lumina_call_kwargs, {"key": "linear + layer_norm + rope", "value": "linear"}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def captured(request):
    build, kwargs, chains = MODELS[request.param]
    gm, inputs = capture_pipeline_graph(build(), kwargs())
    return gm, inputs, chains


def _fused_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.fused_kv_update]


def test_op_stands_where_every_chain_was(captured):
    gm, _, chains = captured
    plain, _, _ = build_ras_graph(gm)
    fused, _, ctx = build_ras_graph(gm, fuse_kv_projection=True)
    assert not _fused_nodes(plain)
    nodes = _fused_nodes(fused)
    assert len(nodes) == len(ctx.kv_slots) > 0
    assert all(not n.args and set(n.kwargs) >= {"cache", "x", "weight", "idx", "axis", "norm"} for n in nodes)
    caches = {n.kwargs["cache"].name for n in nodes}
    epilogues = {ops.KVEpilogue.of(n.kwargs) for n in nodes}  # the settings, read back by name
    assert all(ops.KVEpilogue.of(n.kwargs).kwargs().items() <= n.kwargs.items() for n in nodes)
    assert {e.norm for e in epilogues} == {"none" if c == "linear" else c.split(" + ")[1] for c in chains.values()}
    assert caches == {slot.placeholder for slot in ctx.kv_slots}
    for slot in ctx.kv_slots:
        record = next(r for r in ctx.records if r.kind == "fused" and r.cache == slot.placeholder)
        assert record.detail == chains[slot.kind]
    # the projections, norms and RoPE products of the image K/V are gone from the graph
    linears = lambda g: sum(n.op == "call_function" and "linear" in str(n.target) for n in g.graph.nodes)  # noqa: E731
    assert linears(plain) - linears(fused) == len(ctx.kv_slots)


def test_fused_graph_equals_unfused_graph(captured):
    gm, inputs, _ = captured
    plain, signature, ctx = build_ras_graph(gm)
    fused, _, _ = build_ras_graph(gm, fuse_kv_projection=True)
    n = ctx.num_tokens
    gen = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(n, generator=gen)[: n // 3] for _ in range(ctx.batch_size)])

    def run(graph):
        output_cache = torch.zeros(ctx.output_cache_shape)
        kv = [torch.randn(s.shape, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(ctx.kv_slots)]
        with torch.no_grad():
            out = graph(*signature.bind(inputs, idx, output_cache, kv))[0]
        return out, output_cache, kv

    out_plain, oc_plain, kv_plain = run(plain)
    out_fused, oc_fused, kv_fused = run(fused)
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(oc_fused, oc_plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(kv_fused, kv_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_whole_generation_matches_unfused(model):
    build, kwargs_fn, _ = MODELS[model]
    config = RASConfig(num_inference_steps=6, sample_ratio=0.375, scheduler_start_step=2, error_reset_steps=(4,))
    results = {}
    for fuse in (False, True):
        pipe = build()
        backend = rascompile.apply(pipe, config, inner_backend="aot_eager", fused_kv_projection=fuse)
        out = pipe(**kwargs_fn(num_prompts=2, num_images_per_prompt=1, steps=6))[0]
        graph = backend.graphs[0]
        assert bool(_fused_nodes(graph.ras_gm)) is fuse
        results[fuse] = out, graph.controller.history
    (plain, plain_history), (fused, fused_history) = results[False], results[True]
    assert [d.kind for d in fused_history].count("ras") == 3
    for a, b in zip(fused_history, plain_history):
        assert a.kind == b.kind
        if a.kind == "ras":
            assert torch.equal(a.active_idx, b.active_idx)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["lumina", "sd3.5_rms_norm"])
def test_bfloat16_graph_fuses_and_matches_within_rounding(model):
    """In bf16 the unfused chain rounds the projection to bf16 before its norm and RoPE; the op keeps
    fp32 until the cache store. The two RAS steps agree to bf16 rounding, not exactly."""
    build, kwargs_fn, chains = MODELS[model]
    pipe = build()
    pipe.transformer.to(torch.bfloat16)
    call = {
        k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs_fn().items()
    }
    gm, inputs = capture_pipeline_graph(pipe, call)
    plain, signature, ctx = build_ras_graph(gm)
    fused, _, _ = build_ras_graph(gm, fuse_kv_projection=True)
    assert len(_fused_nodes(fused)) == len(ctx.kv_slots)
    idx = torch.stack(
        [torch.randperm(ctx.num_tokens, generator=torch.Generator().manual_seed(b))[:20] for b in range(ctx.batch_size)]
    )

    def run(graph):
        caches = [torch.zeros(ctx.output_cache_shape, dtype=torch.bfloat16)]
        caches += [torch.zeros(s.shape, dtype=s.dtype) for s in ctx.kv_slots]
        with torch.no_grad():
            return graph(*signature.bind(inputs, idx, caches[0], caches[1:]))[0], caches[1:]

    (out_plain, kv_plain), (out_fused, kv_fused) = run(plain), run(fused)
    assert out_fused.dtype == torch.bfloat16 and all(c.dtype == torch.bfloat16 for c in kv_fused)
    torch.testing.assert_close(out_fused, out_plain, rtol=3e-2, atol=3e-2)
    for a, b in zip(kv_fused, kv_plain):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


def test_a_misread_chain_is_caught_by_the_numeric_check():
    """Parsing mistakes (a missed RoPE, a per-head norm for Lumina-Next's norm across heads) do not get through."""
    gm, _ = capture_pipeline_graph(tiny_lumina_pipeline(), lumina_call_kwargs())
    ras, _, ctx = build_ras_graph(gm)
    node = next(n for n in ras.graph.nodes if n.target is ops.update_kv_cache and n.args[0].name == "ras_kv_cache_0")
    write, idx = WRITES[node.target](node), node.args[2]
    chain = parse_chain(write.fresh)
    assert (chain.norm, chain.norm_group, chain.rope_table is not None) == ("layer_norm", 16, True)

    def check(**changes):
        misread = dataclasses.replace(chain, **changes)
        _verify(ras, ctx, misread, write, fused_op_kwargs(misread, write, idx))

    check()  # as parsed: passes
    with pytest.raises(NoMatch, match="disagree"):
        check(rope_table=None)
    with pytest.raises(NoMatch, match="disagree"):
        check(norm="rms_norm")
    with pytest.raises(NoMatch, match="refuses .* norm_weight is shape \\[16\\]"):
        check(norm_group=8)


def test_unknown_op_in_chain_is_not_fused():
    """A chain with an op the kernel does not compute (here a scale on the keys) stays as it was."""

    class ScaledKeys(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Conv2d(4, 8, 2, stride=2)
            self.to_k = torch.nn.Linear(8, 8)
            self.to_v = torch.nn.Linear(8, 8)
            self.to_q = torch.nn.Linear(8, 8)
            self.proj = torch.nn.Linear(8, 16)

        def forward(self, x):
            h = self.embed(x).flatten(2).transpose(1, 2)
            q = self.to_q(h).unflatten(-1, (2, 4)).transpose(1, 2)
            k = (self.to_k(h) * 0.5).unflatten(-1, (2, 4)).transpose(1, 2)
            v = self.to_v(h).unflatten(-1, (2, 4)).transpose(1, 2)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            out = self.proj(a)
            return out.transpose(1, 2).reshape(x.shape[0], 16, x.shape[2] // 2, x.shape[3] // 2)

    captured = []

    def grab(gm, example_inputs, **_):
        captured.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(ScaledKeys(), backend=grab, fullgraph=True)(torch.randn(2, 4, 8, 8))
    ras, _, ctx = build_ras_graph(captured[0], fuse_kv_projection=True)
    assert len(_fused_nodes(ras)) == 1  # the values
    unfused = [r for r in ctx.records if r.kind == "unfused"]
    assert [r.cache for r in unfused] == ["ras_kv_cache_0"] and unfused[0].detail.startswith("mul"), ctx.records


def test_default_is_off_on_cpu_and_option_is_validated():
    config = RASConfig(num_inference_steps=4, error_reset_steps=(), scheduler_start_step=2)
    backend = RASBackend(config)
    assert backend.fuses_kv_projection([torch.zeros(1)]) is False
    assert backend.fuses_kv_projection([torch.zeros(1, device="meta")]) is False
    with pytest.raises(ValueError, match="fused_kv_projection='yes' is invalid"):
        RASBackend(config, fused_kv_projection="yes")
    options = {"num_inference_steps": 4, "error_reset_steps": (), "scheduler_start_step": 2, "fused_kv_projection": 1}
    with pytest.raises(Exception, match="fused_kv_projection=1 is invalid"):
        torch.compile(torch.nn.Linear(2, 2), backend="ras", options=options)(torch.zeros(1, 2))


# ------------------------------------------------------------------------------------ float8 caches

FP8 = dict(kv_cache_dtype="fp8_e4m3")


def _random_caches(ctx):
    """A float8 cache with positive scales per K/V cache (as after earlier steps), the output cache zero."""
    caches = []
    for i, slot in enumerate(ctx.kv_slots):
        gen = torch.Generator().manual_seed(i)
        if slot.kind.endswith("_scale"):
            caches.append(torch.rand(slot.shape, generator=gen) / 100 + 1e-3)
        else:
            caches.append(torch.randn(slot.shape, generator=gen).mul(100).to(slot.dtype))
    return torch.zeros(ctx.output_cache_shape), caches


def test_float8_writes_fuse_into_the_quantized_op_and_equal_the_unfused_graph(captured):
    """Every float8 cache write becomes fused_quantized_kv_update; on the same caches a RAS step gives the same
    output (attention reads the step's rows unquantized either way), the same float8 bytes and scales."""
    gm, inputs, chains = captured
    plain, signature, ctx = build_ras_graph(gm, **FP8)
    fused, _, fused_ctx = build_ras_graph(gm, fuse_kv_projection=True, **FP8)
    nodes = [n for n in fused.graph.nodes if n.op == "call_function" and n.target is ops.fused_quantized_kv_update]
    caches = [s for s in ctx.kv_slots if s.dtype == torch.float8_e4m3fn]
    assert len(nodes) == len(caches) == len(ctx.kv_slots) // 2 > 0 and not _fused_nodes(fused)
    assert {n.kwargs["scale"].name for n in nodes} == {s.placeholder for s in ctx.kv_slots if s.kind.endswith("scale")}
    for slot in caches:
        record = next(r for r in fused_ctx.records if r.kind == "fused" and r.cache == slot.placeholder)
        assert record.detail == chains[slot.kind] + " quantized"
    gen = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(ctx.num_tokens, generator=gen)[:7] for _ in range(ctx.batch_size)])
    results = []
    for graph in (plain, fused):
        output_cache, kv = _random_caches(ctx)
        with torch.no_grad():
            results.append((graph(*signature.bind(inputs, idx, output_cache, kv))[0], kv))
    (out_plain, kv_plain), (out_fused, kv_fused) = results
    torch.testing.assert_close(out_fused, out_plain, rtol=1e-5, atol=1e-5)
    for slot, a, b in zip(ctx.kv_slots, kv_fused, kv_plain):
        if slot.dtype == torch.float8_e4m3fn:  # fp32 rows one rounding apart would land on the same float8 value
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), slot.placeholder
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_float8_generation_fused_matches_unfused():
    build, kwargs_fn, _ = MODELS["lumina"]
    config = RASConfig(num_inference_steps=6, sample_ratio=0.375, scheduler_start_step=2, error_reset_steps=(4,), **FP8)
    results = {}
    for fuse in (False, True):
        pipe = build()
        backend = rascompile.apply(pipe, config, inner_backend="aot_eager", fused_kv_projection=fuse)
        out = pipe(**kwargs_fn(num_prompts=2, num_images_per_prompt=1, steps=6))[0]
        graph = backend.graphs[0]
        fused = [n for n in graph.ras_gm.graph.nodes if n.target is ops.fused_quantized_kv_update]
        assert bool(fused) is fuse
        results[fuse] = out, [(d.kind, d.active_idx) for d in graph.controller.history]
    (plain, plain_steps), (fused, fused_steps) = results[False], results[True]
    assert [kind for kind, _ in fused_steps].count("ras") == 3
    for (kind, a), (plain_kind, b) in zip(fused_steps, plain_steps):
        assert kind == plain_kind and (a is None or torch.equal(a, b))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
