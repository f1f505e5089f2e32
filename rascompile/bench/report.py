"""Plain-text tables for ``rascompile bench`` results."""

from __future__ import annotations

from collections.abc import Sequence

#: Ratio at which the per-step target (measured >= TARGET_FRACTION x ideal) is checked.
TARGET_RATIO = 0.25
TARGET_FRACTION = 0.9
#: Target for the controller's share of a RAS step, in percent.
CONTROLLER_TARGET_PERCENT = 3.0


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    right = right or [False] + [True] * (len(headers) - 1)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]

    def fmt(cells):
        out = [str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right)]
        return "  ".join(out).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def _sd3_description(model: dict) -> str:
    """The model line of results written before ``--model`` existed (SD3 only)."""
    return (
        f"SD3Transformer2DModel, random weights, {model['layers']} layers, hidden {model['hidden']} "
        f"({model['heads']} heads x {model['head_dim']}), {model['in_channels']}x{model['latent_size']}x"
        f"{model['latent_size']} latents = {model['num_tokens']} image tokens, {model['text_tokens']} text tokens, "
        f"CFG batch {model['batch']}, fp32, no_grad"
    )


def _shape_text(shape: list) -> str:
    dims = [str(v) for v in shape if isinstance(v, int)]
    dtype = [v.removeprefix("torch.") for v in shape if isinstance(v, str)]
    return "[" + ", ".join(dims) + "]" + (f" {dtype[0]}" if dtype else "")


def _dense_only_report(results: dict, out: list[str]) -> str:
    """The report of a model RAS does not apply to: the reason, the dense step; no RAS numbers."""
    model = results["model"]
    name = model.get("class", "this model")
    out.append(f"RAS DOES NOT APPLY to {name}: the ras backend runs it dense.")
    out.append(f"  reason: {results['ras']['reason']}")
    out.append("  No RAS numbers: with backend='ras' every step of this model runs the dense graph timed below.")
    out.append("")
    out.append("Per-step time of the dense model (one transformer call)")
    rows = [
        [r["name"], r["k"], _ms(r["median_s"]), f"{r['flops'] / 1e9:.2f}", f"{r['first_call_s']:.1f}"]
        for r in results["per_step"]
    ]
    out.append(_table(["variant", "N", "ms", "GFLOP", "first call s"], rows))
    out.append("  GFLOP: measured with FlopCounterMode on the eager model (matrix products, convolutions, attention)")
    out.append(f"  memory: model parameters {_mb(results['memory']['parameters_bytes'])}")
    return "\n".join(out)


def format_report(results: dict) -> str:
    """The plain-text tables of a :func:`run_bench` result."""
    m, s, model = results["machine"], results["settings"], results["model"]
    out = []
    title = "rascompile bench: Region-Adaptive Sampling vs dense"
    cp = results.get("context_parallel")
    parallel = f" --context-parallel {cp['degree']}" if cp else ""
    out.append(f"{title} --model {model.get('name', 'sd3')}{parallel}" + (" [SMOKE: tiny model]" if s["smoke"] else ""))
    out.append(f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}")
    out.append(f"software: torch {m['torch']}, diffusers {m['diffusers']}, python {m['python']}")
    out.append(f"model: {model.get('description') or _sd3_description(model)}")
    if model.get("inputs"):
        calls = model.get("calls_per_step", 1)
        per = f"each of the {calls} calls of a step" if calls > 1 else "one call per step"
        shapes = ", ".join(f"{name} {_shape_text(shape)}" for name, shape in model["inputs"].items())
        out.append(f"transformer inputs ({per}): {shapes}")
    out.append(
        f"inner backend: {s['inner_backend']} (dense and RAS); times: median of {s['repeats']} after warm-up; "
        f"first call (compile of the graphs the loop's schedule runs) {results['first_call_s']:.1f} s"
    )
    ras = results.get("ras", {"applies": True})
    if "kv_writes" in results:
        out.append(
            f"fused K/V projection (rascompile::linear_scatter_): {results['fused_kv_writes']} of "
            f"{results['kv_writes']} cache writes"
        )
        out.extend(f"  {line}" for line in results.get("unfused_kv_reasons", []))
    load = results.get("background_load")
    if load is not None:
        busy = load["other_processes_cores"]
        warn = " -- the machine was shared, timings are disturbed" if busy > 0.2 else ""
        out.append(
            f"run: {load['wall_s']:.0f} s; other processes kept {busy:.2f} of {m['cores']} cores busy on average{warn}"
        )
    out.append("")
    if cp:
        from .parallel_report import format_ranks

        out += [format_ranks(results), ""]
    if not ras["applies"]:
        return _dense_only_report(results, out)

    out.append("Per-step time (one transformer call)")
    rows = []
    for r in results["per_step"]:
        target = ""
        if r["ratio"] == TARGET_RATIO:
            met = r["fraction_of_ideal"] >= TARGET_FRACTION
            target = f">= {TARGET_FRACTION:.2f} x ideal: {'met' if met else 'MISSED'}"
        rows.append(
            [
                r["name"],
                r["k"],
                _ms(r["median_s"]),
                f"{r['speedup']:.2f}x",
                f"{r['ideal_speedup']:.2f}x",
                f"{r['fraction_of_ideal']:.2f}",
                f"{r['flops'] / 1e9:.2f}",
                f"{r['first_call_s']:.1f}",
                target,
            ]
        )
    out.append(
        _table(
            ["variant", "k", "ms", "speedup", "ideal", "meas/ideal", "GFLOP", "compile s", "target"],
            rows,
            right=[False, True, True, True, True, True, True, True, False],
        )
    )
    out.append("  speedup = dense compiled / variant; ideal = FLOPs(dense) / FLOPs(k) (matrix products only)")
    flops = results.get("flops", {})
    if flops.get("source") == "measured":
        out.append(
            "  FLOPs measured with FlopCounterMode (matrix products, convolutions, attention): the dense step on the "
            "eager model, a RAS step as the rewritten graph run eagerly at k"
        )
    elif "measured_vs_analytic_max_relative_difference" in flops:
        diff = 100 * flops["measured_vs_analytic_max_relative_difference"]
        out.append(
            f"  FLOPs from the analytic SD3 model; measured with FlopCounterMode (eager model, RAS graph run eagerly "
            f"at k) they agree within {diff:.2f} %"
        )
    out.append("")

    loop = results["loop"]
    med = loop["median_s"]
    resets = ",".join(map(str, loop["reset_steps"])) or "none"
    out.append(
        f"Denoising loop: {loop['steps']} steps, ratio {loop['ratio']:g}, scheduler_start_step {loop['start_step']}, "
        f"error_reset_steps ({resets}): {loop['planned_ras_steps']} RAS steps planned; run: "
        f"{loop['run_ras_steps']} RAS, {loop['run_capture_steps']} capture, {loop['run_dense_steps']} dense "
        f"(median of {s['loop_repeats'] or s['repeats']})"
        + (f"; {loop['calls_per_step']} transformer calls per step" if loop.get("calls_per_step", 1) > 1 else "")
    )
    rows = []
    ras = med["RAS compiled"]
    for name in ("dense eager", "dense compiled", "RAS compiled"):
        if name not in med:
            continue
        t = med[name]
        rows.append(
            [
                name,
                f"{t:.2f}",
                _ms(t / loop["steps"]),
                f"{med['dense compiled'] / t:.2f}x",
                f"{med['dense eager'] / t:.2f}x" if "dense eager" in med else "n/a",
            ]
        )
    out.append(_table(["variant", "total s", "ms/step", "vs dense compiled", "vs dense eager"], rows))
    out.append(
        f"  RAS vs dense compiled: {med['dense compiled'] / ras:.2f}x measured, {loop['ideal_speedup']:.2f}x ideal "
        f"(per-step FLOPs over the schedule)"
    )
    if "predicted_ras_s" in loop:
        out.append(
            f"  from the per-step times: RAS loop {loop['predicted_ras_s']:.2f} s, dense loop "
            f"{loop['predicted_dense_s']:.2f} s (the difference to the loop times is overhead outside the graphs)"
        )
    out.append("")

    c = results["controller"]
    out.append("Controller overhead (RASController.decide per RAS step: metric, selection, bookkeeping)")
    if c.get("decide_s") is None:
        out.append("  n/a (no RAS step in the schedule)")
    else:
        rows = [["decide() per RAS step", _ms(c["decide_s"]), ""]]
        if "percent_of_ras_step" in c:
            met = c["percent_of_ras_step"] < CONTROLLER_TARGET_PERCENT
            rows.append(
                [
                    f"share of a RAS step (ratio {c['ras_step_ratio']:g}, {_ms(c['ras_step_s'])} ms)",
                    f"{c['percent_of_ras_step']:.2f} %",
                    f"< {CONTROLLER_TARGET_PERCENT:g} %: {'met' if met else 'MISSED'}",
                ]
            )
        shape = "x".join(map(str, c["latents_shape"]))
        out.append(_table(["", "ms", "target"], rows, right=[False, True, False]))
        calls = c.get("calls_per_step", 1)
        per = f", {calls} calls per step" if calls > 1 else ""
        out.append(f"  median over {c['samples']} RAS steps on [{shape}] latents{per}")
    out.append("")

    mem = results["memory"]
    out.append("Memory (fp32)")
    rows = [
        ["model parameters", _mb(mem["parameters_bytes"])],
        ["RAS caches held by the controller (output + K/V, its generation's peak)", _mb(mem["ras_caches_bytes"])],
    ]
    if "ras_caches_planned_bytes" in mem:
        rows.append(
            ["RAS caches planned (rascompile.plan: branches x cache set)", _mb(mem["ras_caches_planned_bytes"])]
        )
    dense, capture, ras = (mem.get(f"{k}_step_peak_bytes") for k in ("dense", "capture", "ras"))
    rows.append(["dense compiled step: peak of step allocations", _mb(dense)])
    rows.append(["RAS capture step (k=N): peak of step allocations", _mb(capture)])
    rows.append([f"RAS step (ratio {mem['ras_step_ratio']:g}): peak of step allocations", _mb(ras)])
    if None not in (dense, capture, ras):
        extra = mem["ras_caches_bytes"] + max(capture, ras) - dense
        rows.append(["RAS generation peak - dense peak (caches + step peaks)", _mb(extra)])
    rows.append(["process peak RSS (ru_maxrss, includes compilation)", _mb(mem["process_peak_rss_bytes"])])
    out.append(_table(["", "size"], rows))
    out.append("  step allocations: torch CPU allocator bytes live during one call beyond those live before it")
    out.append("  (profiler memory events), i.e. activations and workspaces; parameters and caches are extra")
    return "\n".join(out)
