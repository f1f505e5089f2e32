"""The ``sd3`` stage: SD3-medium's transformer (random weights, bf16, 1024x1024, CFG batch 2) with inductor: per-step
dense vs RAS at ratios 0.5 and 0.25 with the fused K/V projection on and off, the 28-step loop at the paper's
schedule against dense and the FLOP ideal, peak memory and compile times. The dry run: a tiny one, fp32, aot_eager."""

from __future__ import annotations

from dataclasses import replace

import torch

from rascompile.bench.flops import loop_ideal_speedup
from rascompile.bench.settings import BenchSettings
from rascompile.bench.timing import measure_loop
from rascompile.bench.workload import _random_active, build_model, capture_step, make_inputs, step_variants
from rascompile.runtime.schedule import build_schedule

from .step_bench import StepBench, fuse_summary, mib, mib_peak
from .suite import Stage, Suite

#: SD3-medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers) at 1024x1024; 333 text tokens
#: (77 CLIP + 256 T5, the pipeline's default). Its position table (``pos_embed_max_size``) is larger than the
#: latents need; ``rascompile bench`` sizes it for them, so it is given to the builder apart.
SD3_MEDIUM = BenchSettings(
    heads=24,
    head_dim=64,
    layers=24,
    latent_size=128,
    text_tokens=333,
    joint_dim=4096,
    pooled_dim=2048,
)
SD3_TINY = BenchSettings(heads=2, head_dim=32, layers=2, latent_size=16, text_tokens=8, joint_dim=32, pooled_dim=32)
POS_EMBED_MAX_SIZE = {"medium": 192, "tiny": 16}

#: The loop: the paper's SD3 setting (``BenchSettings``' defaults); per-step RAS at these ratios.
SD3_LOOP = dict(loop_ratio=0.25, start_step=4, reset_steps=(12, 20), steps=28)
SD3_RATIOS = (0.5, 0.25)


def sd3_config(s: BenchSettings, pos_embed_max_size: int) -> dict:
    """The sizes as ``results.json`` records them."""
    return dict(
        layers=s.layers,
        heads=s.heads,
        head_dim=s.head_dim,
        latent=s.latent_size,
        text_tokens=s.text_tokens,
        joint_dim=s.joint_dim,
        pooled_dim=s.pooled_dim,
        pos_embed_max_size=pos_embed_max_size,
        in_channels=s.latent_channels,
        patch=s.patch,
    )


def stage_sd3(suite: Suite, st: Stage) -> None:
    dry, device = suite.dry, suite.device
    size = "tiny" if dry else "medium"
    dtype = torch.float32 if dry else torch.bfloat16
    inner = "aot_eager" if dry else "inductor"
    s = replace(
        SD3_TINY if dry else SD3_MEDIUM,
        **SD3_LOOP,
        ratios=SD3_RATIOS,
        inner_backend=inner,
        fused_kv_projection=True,
        repeats=3 if dry else suite.args.repeats,
        loop_repeats=1 if dry else 2,
        progress=False,
    )
    n, spec = s.num_tokens, s.spec()
    config = s.loop_config()  # the paper's setting: k = N - D, as the per-step ratios
    schedule = build_schedule(config, s.steps, n)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    st.data.update(
        {
            "model": "SD3Transformer2DModel (SD3-medium architecture)" if not dry else "SD3Transformer2DModel (tiny)",
            "config": sd3_config(s, POS_EMBED_MAX_SIZE[size]), "hidden": s.hidden, "num_tokens": n, "batch": s.batch,
            "dtype": str(dtype).removeprefix("torch."), "inner_backend": inner, "device": device,
            "repeats": s.repeats, "loop_repeats": s.loop_repeats, "tolerance": tolerance,
        }
    )  # fmt: skip
    if dry:
        st.skip_part("bf16 inductor on CUDA, peak memory", "dry run, no CUDA: tiny fp32 model with aot_eager on CPU")

    with st.step("build model (random weights) and inputs"):
        model = build_model(s, device, dtype, pos_embed_max_size=POS_EMBED_MAX_SIZE[size])
        inputs = make_inputs(s, device, dtype)
        st.data["parameters"] = sum(p.numel() for p in model.parameters())
        st.data["parameter_mib"] = mib(sum(p.numel() * p.element_size() for p in model.parameters()))
    with st.step("trace with Dynamo (one eager call)"):
        torch._dynamo.reset()
        captured = capture_step(s, model, inputs)
        args = captured.args
    with st.step("RAS rewrite, fused K/V projection on"):
        g, caught = captured.graph()
        if g.controller is None:
            st.check("the RAS rewrite applies", False, f"runs dense: {g.fallback_reason}")
            return
        st.data["fused_on"] = fuse_summary(g) | {"warnings": caught}
    variants = step_variants(s, g, device)
    all_idx = variants[1].idx  # the capture step: all N tokens
    idx = {v.ratio: v.idx for v in variants[2:]}
    k = {r: int(t.shape[1]) for r, t in idx.items()}
    planned_k = sorted({p.num_active for p in schedule if not p.dense})
    bench = StepBench(st, device, inner, s.repeats, spec)
    run = lambda graph, i: lambda: graph.run_active(i, *args)  # noqa: E731

    # Order: the headline numbers first (dense vs RAS 0.25 per step, then the loop), so that a stage cut short
    # by its budget has measured the most important things.
    bench.compile("dense", lambda: g.run_dense(*args))
    bench.check_output("dense")
    bench.compile("RAS ratio 0.25, fused", run(g, idx[0.25]))
    bench.time_round(
        "A",
        {
            "dense": (None, n, None, lambda: g.run_dense(*args)),
            "RAS ratio 0.25, fused": (0.25, k[0.25], "fused", run(g, idx[0.25])),
        },
    )
    bench.compile("RAS k=N, fused", run(g, all_idx))
    bench.check_equal("RAS step at k=N equals dense (fused)", "RAS k=N, fused", "dense", tolerance)
    for planned in planned_k:  # the loop's RAS steps: compiled before the loop, whatever k its schedule plans
        if planned not in k.values():
            extra = _random_active(s.batch, n, planned, 7, device)
            bench.compile(f"RAS k={planned}, fused", run(g, extra))

    with st.step(f"28-step loops: RAS vs dense ({s.loop_repeats} each, interleaved, after a warm-up generation)"):
        loops = {"RAS compiled": captured.caller(g), "dense compiled": captured.caller(g.run_dense)}
        timed = measure_loop(s, captured.family, g, loops, inputs, device)
        times = {"RAS": timed.times_s["RAS compiled"], "dense": timed.times_s["dense compiled"]}
        memory = {"RAS": timed.memory["RAS compiled"], "dense": timed.memory["dense compiled"]} if timed.memory else {}
        kinds = timed.kinds
        ras_s, dense_s = timed.median_s["RAS compiled"], timed.median_s["dense compiled"]
        ideal = loop_ideal_speedup(spec, [p.num_active for p in schedule])
        st.data["loop"] = {
            "steps": s.steps, "ratio": config.sample_ratio, "start_step": config.scheduler_start_step,
            "reset_steps": list(config.error_reset_steps), "planned_ras_steps": sum(not p.dense for p in schedule),
            "run_ras_steps": kinds.count("ras"), "run_capture_steps": kinds.count("capture"),
            "run_dense_steps": kinds.count("dense"), "times_s": times, "ras_s": ras_s, "dense_s": dense_s,
            "speedup": dense_s / ras_s, "ideal_speedup": ideal, "fraction_of_ideal": dense_s / ras_s / ideal,
            "memory": {name: mib_peak(m) for name, m in memory.items()} or None,
        }  # fmt: skip
        st.check(
            "the loop ran the planned RAS steps",
            kinds.count("ras") == st.data["loop"]["planned_ras_steps"],
            f"{kinds.count('ras')} RAS, {kinds.count('capture')} capture, {kinds.count('dense')} dense steps run",
        )
    suite.log(st.name, f"  loop: RAS {ras_s:.3f} s, dense {dense_s:.3f} s, {dense_s / ras_s:.2f}x (ideal {ideal:.2f}x)")

    bench.compile("RAS ratio 0.5, fused", run(g, idx[0.5]))
    with st.step("RAS rewrite, fused K/V projection off"):
        u, caught = captured.graph(fused_kv_projection=False)
        st.data["fused_off"] = fuse_summary(u) | {"warnings": caught}
    bench.compile("RAS ratio 0.25, unfused", run(u, idx[0.25]))
    with st.step("check: fused and unfused RAS steps agree (same caches, same tokens)"):
        g.run_active(all_idx, *args)  # fills the fused graph's caches; the unfused graph gets copies
        fused_caches, unfused_caches = g.controller.caches(), u.controller.caches()
        source = [fused_caches[0], *fused_caches[1]]
        target = [unfused_caches[0], *unfused_caches[1]]
        if [t.shape for t in source] != [t.shape for t in target]:
            raise RuntimeError("the fused and unfused RAS graphs have caches of different shapes")
        for a, b in zip(source, target):
            b.copy_(a)
        bench.outputs["fused, ratio 0.25"] = g.run_active(idx[0.25], *args)[0]
        bench.outputs["unfused"] = u.run_active(idx[0.25], *args)[0]
        bench.check_equal("fused RAS step equals unfused (ratio 0.25)", "fused, ratio 0.25", "unfused", tolerance)
    bench.compile("RAS ratio 0.5, unfused", run(u, idx[0.5]))
    bench.time_round(
        "B",
        {
            "dense": (None, n, None, lambda: g.run_dense(*args)),
            "RAS k=N (capture), fused": (None, n, "fused", run(g, all_idx)),
            "RAS ratio 0.5, fused": (0.5, k[0.5], "fused", run(g, idx[0.5])),
            "RAS ratio 0.5, unfused": (0.5, k[0.5], "unfused", run(u, idx[0.5])),
            "RAS ratio 0.25, unfused": (0.25, k[0.25], "unfused", run(u, idx[0.25])),
        },
    )
