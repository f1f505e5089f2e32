"""The ``flux`` stage: what rascompile does with a Flux-dev-shaped transformer (fewer blocks, ``--flux-layers``), its
dense step time, and RAS at ratios 0.5 and 0.25 where rascompile rewrites it."""

from __future__ import annotations

from dataclasses import replace

import torch

from rascompile.bench.flux import flux_rope_axes
from rascompile.bench.settings import BenchSettings, settings_for
from rascompile.bench.workload import build_model, capture_step, make_inputs, step_variants

from .sd3 import SD3_LOOP, SD3_RATIOS
from .step_bench import StepBench, fuse_summary
from .suite import Stage, Suite

#: Flux-dev's transformer (19 double-stream + 38 single-stream blocks) at 1024x1024: 128x128 latents packed
#: 2x2 into 4096 tokens of 64 channels, 512 T5 tokens, batch 1 (guidance-distilled: no CFG batch).
FLUX_DEV = settings_for(
    "flux",
    heads=24,
    head_dim=128,
    layers=19,
    single_layers=38,
    latent_size=128,
    latent_channels=16,
    text_tokens=512,
    joint_dim=4096,
    pooled_dim=768,
)
FLUX_TINY = settings_for(
    "flux",
    heads=2,
    head_dim=16,
    layers=1,
    single_layers=2,
    latent_size=16,
    latent_channels=4,
    text_tokens=8,
    joint_dim=32,
    pooled_dim=32,
)


def flux_config(s: BenchSettings) -> dict:
    """The sizes as ``results.json`` records them."""
    return dict(
        num_layers=s.layers,
        num_single_layers=s.single_layers,
        heads=s.heads,
        head_dim=s.head_dim,
        in_channels=4 * s.latent_channels,
        joint_dim=s.joint_dim,
        pooled_dim=s.pooled_dim,
        axes=list(flux_rope_axes(s.head_dim)),
        side=s.latent_size // 2,
        text_tokens=s.text_tokens,
    )


def stage_flux(suite: Suite, st: Stage) -> None:
    """What rascompile does with a Flux-dev-shaped transformer, and its step times: dense always; RAS at
    ratios 0.5 and 0.25 too where rascompile rewrites the graph (packed latents: not in the release this suite
    was written against, which runs Flux dense)."""
    dry, device = suite.dry, suite.device
    full = FLUX_TINY if dry else FLUX_DEV
    double, single = (full.layers, full.single_layers) if dry else tuple(suite.args.flux_layers)
    dtype = torch.float32 if dry else torch.bfloat16
    inner = "aot_eager" if dry else "inductor"
    s = replace(
        full,
        **SD3_LOOP,
        layers=double,
        single_layers=single,
        ratios=SD3_RATIOS,
        inner_backend=inner,
        repeats=3 if dry else suite.args.repeats,
        progress=False,
    )
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    st.data.update(
        {
            "model": "FluxTransformer2DModel (Flux-dev shapes)" if not dry else "FluxTransformer2DModel (tiny)",
            "config": flux_config(full), "double_blocks": double, "single_blocks": single,
            "full_depth": [full.layers, full.single_layers], "tokens": s.num_tokens, "text_tokens": s.text_tokens,
            "batch": s.batch, "dtype": str(dtype).removeprefix("torch."), "inner_backend": inner, "repeats": s.repeats,
        }
    )  # fmt: skip
    if (double, single) != (full.layers, full.single_layers):
        st.data["depth_note"] = (
            f"{double} double-stream + {single} single-stream blocks of Flux-dev's {full.layers} + "
            f"{full.single_layers}, so that the compiles fit the stage's budget (--flux-layers); every other "
            "size is Flux-dev's"
        )
    with st.step(f"build model ({double} + {single} blocks, random weights)"):
        model = build_model(s, device, dtype)
        inputs = make_inputs(s, device, dtype)
        st.data["parameters"] = sum(p.numel() for p in model.parameters())
    with st.step("trace with Dynamo (one eager call)"):
        torch._dynamo.reset()
        captured = capture_step(s, model, inputs)
        args = captured.args
    with st.step("what rascompile does with it (RASBackend)"):
        graph, caught = captured.graph()
        st.data["ras_applies"] = graph.controller is not None
        st.data["fallback_reason"] = graph.fallback_reason
        st.data["warnings"] = caught
        if graph.controller is not None:
            st.data["fused"] = fuse_summary(graph)
    verdict = "RAS applies" if graph.controller is not None else f"runs dense: {graph.fallback_reason}"
    suite.log(st.name, f"  rascompile: {verdict}")
    n = s.num_tokens
    bench = StepBench(st, device, inner, s.repeats)
    dense = {"dense": (None, n, None, lambda: graph.run_dense(*args))}
    bench.compile("dense", lambda: graph.run_dense(*args))
    bench.check_output("dense")
    bench.time_round("A", dense)
    if graph.controller is None:
        return
    variants = step_variants(s, graph, device)
    idx = {v.ratio: v.idx for v in variants[2:]}
    timed = dict(dense)
    for r in (0.25, 0.5):
        i = idx[r]
        bench.compile(f"RAS ratio {r:g}", lambda i=i: graph.run_active(i, *args))
        timed[f"RAS ratio {r:g}"] = (r, int(i.shape[1]), None, lambda i=i: graph.run_active(i, *args))
    bench.time_round("B", timed)
    all_idx = variants[1].idx
    bench.compile("RAS k=N", lambda: graph.run_active(all_idx, *args))
    bench.check_equal("Flux: RAS step at k=N equals dense", "RAS k=N", "dense", tolerance)
