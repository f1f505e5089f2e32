"""The README of a results directory, rendered from its ``results.json`` alone (:func:`render_readme`), so that the
docs cannot drift from the data; and the ``report`` stage that writes both."""

from __future__ import annotations

import math

from .config import COMMAND, INSTALL, KERNEL_TEST_FILES, STAGES


def stage_report(suite, st) -> None:
    with st.step("write results.json and README.md"):
        st.data["files"] = ["results.json", "README.md"]
        suite.save()
        suite.save_readme()


def _table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:{spec}}{suffix}"


def _stub() -> str:
    return f"""# GPU results

**No run has happened yet.** The GPU paths of rascompile (the Triton kernel, inductor on CUDA, TensorRT)
have not been measured: no CUDA device was available where they were written. This directory is written
by `benchmarks/gpu_suite.py` from its `results.json`; nothing here is typed in by hand.

On a CUDA machine (about 8 minutes):

```bash
{INSTALL}
{COMMAND}
```

Without a GPU, `python benchmarks/gpu_suite.py --dry-run` runs the same code paths at tiny sizes on the
CPU into a temporary directory (CI: `tests/kernels/test_gpu_suite.py`). `python benchmarks/gpu_suite.py --render
docs/gpu` re-renders this file from `docs/gpu/results.json`.
"""


def render_readme(results: dict | None) -> str:
    """The README of a results directory, from its ``results.json`` alone (so the docs cannot drift from
    the data). ``None``: the stub of a directory no run has written yet."""
    if not results:
        return _stub()
    stages = results.get("stages", {})
    env = stages.get("env", {}).get("data", {})
    runs = results.get("runs", [])
    dry = results.get("dry_run")
    out = ["# GPU results", ""]
    out.append(
        "<!-- Written by benchmarks/gpu_suite.py from results.json; do not edit: "
        "`python benchmarks/gpu_suite.py --render <dir>` re-renders it. -->"
    )
    out.append("")
    if dry:
        out += [
            "**DRY RUN on the CPU: tiny sizes, no CUDA. These numbers check the code paths; they are not GPU "
            "measurements.**",
            "",
        ]
    gpu = env.get("gpu", {})
    smi = env.get("nvidia_smi") or {}
    driver = (smi.get("gpus") or [{}])[0].get("driver_version") if isinstance(smi, dict) else None
    versions = env.get("versions", {})
    out += [
        f"- Device: {gpu.get('name', 'no CUDA device')}"
        + (f" (compute capability {gpu['capability']}, {gpu['memory_gib']} GiB)" if gpu else "")
        + f"; driver {driver or 'n/a'}; CUDA (torch) {env.get('torch_cuda') or 'n/a'}",
        f"- Host: {env.get('cpu', '?')}, {env.get('cores', '?')} cores; python {env.get('python', '?')}",
        "- Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None and k != "pytest")
        + "; not installed: "
        + (", ".join(k for k, v in versions.items() if v is None) or "none"),
        f"- Source: git {env.get('git_commit') or 'n/a'}",
        f"- Inductor cache warm at start: {env.get('inductor_cache_existed')}",
    ]
    for i, run in enumerate(runs):
        out.append(
            f"- Run {i}: {run.get('started')}, `python benchmarks/gpu_suite.py {' '.join(run.get('argv', []))}`, "
            f"{_f(run.get('elapsed_s'), '.0f')} s of a {_f(run.get('budget_s'), '.0f')} s budget; stages "
            + ", ".join(run.get("stages", []))
        )
    out += ["", f"Command: `{COMMAND}` (install: `{INSTALL}`).", "", "## Stages", ""]
    rows = []
    for name in STAGES:
        s = stages.get(name)
        if s is None:
            rows.append([name, "not run", "", "", ""])
            continue
        rows.append(
            [name, s["status"], s.get("run", ""), f"{_f(s.get('elapsed_s'), '.1f')} / {_f(s.get('budget_s'), '.0f')}",
             s.get("reason") or ""]
        )  # fmt: skip
    out.append(_table(["stage", "status", "run", "seconds / budget", "reason"], rows))
    checks = [(n, c) for n in STAGES for c in stages.get(n, {}).get("checks", [])]
    if checks:
        out += ["", "## Checks", ""]
        rows = [[n, c["name"], "passed" if c["passed"] else "**FAILED**", c["detail"]] for n, c in checks]
        out.append(_table(["stage", "check", "result", "detail"], rows))
    out += _render_kernel_tests(stages.get("kernel_tests"))
    out += _render_kernel_speed(stages.get("kernel_speed"))
    out += _render_sd3(stages.get("sd3"))
    out += _render_flux(stages.get("flux"))
    out += _render_tensorrt(stages.get("tensorrt"))
    skipped = [(n, s) for n in STAGES for s in stages.get(n, {}).get("skipped", [])]
    if skipped:
        out += ["", "## Skipped parts", ""]
        out.append(_table(["stage", "what", "why"], [[n, s["what"], s["reason"]] for n, s in skipped]))
    return "\n".join(out) + "\n"


def _render_kernel_tests(s: dict | None) -> list[str]:
    if not s or not s.get("data"):
        return []
    d = s["data"]
    out = ["", "## 1. Kernel correctness: " + ", ".join(f"tests/kernels/{n}" for n in KERNEL_TEST_FILES), ""]
    out.append(
        f"Mode: {d.get('mode')}; {d.get('kernel_calls_on_device', 0)} kernel calls on {d.get('device')} "
        f"(kernel object {d.get('kernel_object')}); references: the file's CPU torch computations."
    )
    out.append("")
    out.append(_table(["collected", "passed", "failed", "errors", "skipped", "exit status"],
                      [[d.get("collected"), d.get("passed"), d.get("failed"), d.get("errors"), d.get("skipped"),
                        d.get("returncode")]]))  # fmt: skip
    for f in d.get("failures", [])[:10]:
        out.append(f"- FAILED `{f['test']}` ({f['when']}): {f['message'].splitlines()[-1][:200]}")
    return out


def _render_kernel_speed(s: dict | None) -> list[str]:
    if not s or not s.get("data", {}).get("rows"):
        return []
    d = s["data"]
    peaks = d.get("peaks", {})
    out = ["", "## 2. Kernel speed: linear_scatter_ (fused K/V projection)", ""]
    out.append(
        f"B = {d.get('batch')}, N = {d.get('image_tokens')} image tokens; ms are medians "
        f"(CUDA: triton.testing.do_bench). Peaks ({peaks.get('source')}): {peaks.get('device')}, "
        f"{_f(peaks.get('tflops_bf16_fp16'), '.0f')} TFLOP/s bf16/fp16, {_f(peaks.get('gbps'), '.0f')} GB/s. "
        "fused = one linear_scatter_; unfused = F.linear, the model's norm and RoPE, index_put_; "
        "mm+copy = F.linear + index_put_. GB/s counts each variant's lower-bound bytes."
    )
    out.append("")
    rows = [
        [r["model"], _f(r["ratio"], "g"), r["dtype"], r["k"], _f(r["fused_ms"], ".4f"), _f(r["unfused_ms"], ".4f"),
         _f(r["matmul_copy_ms"], ".4f"), _f(r["speedup_vs_unfused"], ".2f", "x"),
         _f(r["speedup_vs_matmul_copy"], ".2f", "x"), _f(r["fused_tflops"], ".1f"),
         _f(r.get("fused_pct_peak_tflops"), ".0f", " %"), _f(r["fused_gbps"], ".0f"),
         _f(r.get("fused_pct_peak_gbps"), ".0f", " %"), "yes" if r["matches_unfused"] else "**NO**"]
        for r in d["rows"]
    ]  # fmt: skip
    out.append(_table(["model", "ratio", "dtype", "k", "fused ms", "unfused ms", "mm+copy ms", "vs unfused",
                       "vs mm+copy", "TFLOP/s", "% peak", "GB/s", "% peak BW", "matches"], rows))  # fmt: skip
    fp8 = [
        [r["model"], _f(r["ratio"], "g"), r["dtype"], r["k"], _f(r.get("fused_fp8_ms"), ".4f"),
         _f(r.get("unfused_fp8_ms"), ".4f"), _f(r.get("speedup_fp8_vs_unfused"), ".2f", "x")]
        for r in d["rows"]
    ]  # fmt: skip
    out += ["", "Into a float8 cache with per-row scales (`kv_cache_dtype=\"fp8_e4m3\"`): one "
            "linear_scatter_quantized_ (quantization in the epilogue) against the unfused ops, the quantization "
            "and two index_put_.", ""]  # fmt: skip
    out.append(_table(["model", "ratio", "dtype", "k", "fused fp8 ms", "unfused fp8 ms", "vs unfused"], fp8))
    return out


def _memory_cell(m: dict | None) -> str:
    return "n/a" if not m else f"{m['peak_mib']:.0f} ({m['above_live_mib']:+.0f})"


def _per_step_table(rows: list[dict] | None) -> list[str]:
    if not rows:
        return []
    ideal = any("ideal_speedup" in r for r in rows)
    headers = ["variant", "round", "k", "ms", "speedup"]
    headers += ["ideal", "meas/ideal", "TFLOP/s"] if ideal else []
    headers += ["compile s", "peak MiB"]
    cells = []
    for r in rows:
        row = [r["variant"], r["round"], r["k"], _f(r["median_ms"], ".2f"), _f(r["speedup"], ".2f", "x")]
        if ideal:
            row += [_f(r.get("ideal_speedup"), ".2f", "x"), _f(r.get("fraction_of_ideal"), ".2f"),
                    _f(r.get("tflops"), ".1f")]  # fmt: skip
        row += [_f(r.get("compile_s"), ".1f"), _memory_cell(r.get("memory"))]
        cells.append(row)
    return ["", _table(headers, cells)]


def _render_sd3(s: dict | None) -> list[str]:
    if not s or not s.get("data", {}).get("config"):
        return []
    d = s["data"]
    c = d["config"]
    out = ["", "## 3. Full-size transformer: SD3", ""]
    out.append(
        f"{d['model']}: {c['layers']} layers, {c['heads']} heads x {c['head_dim']}, patch {c['patch']}, "
        f"{c['in_channels']} latent channels, joint_attention_dim {c['joint_dim']}, pooled {c['pooled_dim']}, "
        f"{c['latent']}x{c['latent']} latents = {d['num_tokens']} image tokens, {c['text_tokens']} text tokens, "
        f"CFG batch {d['batch']}, random weights, {d['dtype']}, {d['inner_backend']} on {d['device']}; "
        f"medians of {d['repeats']}. Speedups are against the dense step of the same timing round; ideal = "
        "FLOPs(dense) / FLOPs(k) (rascompile.bench.flops). Memory: peak MiB of the CUDA allocator during one call "
        "(in brackets: above what was allocated before it)."
    )
    for key, label in (("fused_on", "fused on"), ("fused_off", "fused off")):
        f = d.get(key)
        if f:
            out.append(f"- {label}: {f['fused_kv_writes']} of {f['kv_writes']} K/V cache writes fused"
                       + (f"; unfused: {'; '.join(f['unfused_reasons'])}" if f["unfused_reasons"] else ""))  # fmt: skip
    out += _per_step_table(d.get("per_step"))
    if d.get("compile_s"):
        out += ["", "Compile (first call) seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in d["compile_s"].items())]
    loop = d.get("loop")
    if loop:
        out += ["", f"### {loop['steps']}-step loop", ""]
        out.append(
            f"Ratio {loop['ratio']:g}, scheduler_start_step {loop['start_step']}, error_reset_steps "
            f"{tuple(loop['reset_steps'])}: {loop['planned_ras_steps']} RAS steps planned; run: "
            f"{loop['run_ras_steps']} RAS, {loop['run_capture_steps']} capture, {loop['run_dense_steps']} dense."
        )
        out.append("")
        mem = loop.get("memory") or {}
        out.append(_table(
            ["variant", "total s", "ms/step", "speedup", "ideal", "meas/ideal", "peak MiB"],
            [["dense", _f(loop["dense_s"], ".3f"), _f(1e3 * loop["dense_s"] / loop["steps"], ".1f"), "1.00x",
              "", "", _memory_cell(mem.get("dense"))],
             ["RAS", _f(loop["ras_s"], ".3f"), _f(1e3 * loop["ras_s"] / loop["steps"], ".1f"),
              _f(loop["speedup"], ".2f", "x"), _f(loop["ideal_speedup"], ".2f", "x"),
              _f(loop["fraction_of_ideal"], ".2f"), _memory_cell(mem.get("RAS"))]],
        ))  # fmt: skip
    return out


def _render_flux(s: dict | None) -> list[str]:
    if not s or not s.get("data", {}).get("config"):
        return []
    d = s["data"]
    c = d["config"]
    out = ["", "## 3b. Flux", ""]
    out.append(
        f"{d['model']}: {d['double_blocks']} double-stream + {d['single_blocks']} single-stream blocks, "
        f"{c['heads']} heads x {c['head_dim']}, {d['tokens']} packed image tokens of {c['in_channels']} channels, "
        f"{d['text_tokens']} text tokens, batch {d['batch']}, random weights, {d['dtype']}, {d['inner_backend']}."
    )
    if d.get("depth_note"):
        out.append(f"Depth: {d['depth_note']}.")
    if "ras_applies" in d:
        out.append("rascompile: " + ("RAS applies." if d["ras_applies"] else f"runs dense: {d['fallback_reason']}."))
    if d.get("fused"):
        f = d["fused"]
        out.append(f"K/V cache writes fused: {f['fused_kv_writes']} of {f['kv_writes']}.")
    out += _per_step_table(d.get("per_step"))
    return out


def _render_tensorrt(s: dict | None) -> list[str]:
    if not s or not s.get("data", {}).get("model"):
        return []
    d = s["data"]
    out = ["", "## 4. TensorRT", ""]
    out.append(
        f"{d['model']}, random weights, exported in fp32 (`rascompile.export`"
        + (f", {d['export_s']:.1f} s, opset {d.get('opset')}" if d.get("export_s") else "")
        + f"). Generations: {d['config']['num_inference_steps']} steps, ratio {d['config']['sample_ratio']}, "
        f"start {d['config']['scheduler_start_step']}, resets {tuple(d['config']['error_reset_steps'])}, "
        "against the PyTorch RAS generation (fp32, CPU)."
        + (f" Engine build: {d['engine_build_s']:.1f} s." if d.get("engine_build_s") else "")
        + (f" torch-tensorrt compile: {d['torch_tensorrt_compile_s']:.1f} s." if d.get("torch_tensorrt_compile_s")
           else "")
    )  # fmt: skip
    gens = {k: v for k, v in d.get("generations", {}).items() if "kinds_equal" in v}
    if gens:
        out.append("")
        out.append(_table(
            ["runtime", "precision", "step kinds equal", "RAS steps with the same tokens", "max abs diff",
             "relative", "tolerance", "within"],
            [[k, v["precision"], "yes" if v["kinds_equal"] else "**no**",
              f"{v['ras_steps_same_tokens']} of {v['ras_steps']}", _f(v["max_abs_diff"], ".2e"),
              _f(v["relative_error"], ".2e"), _f(v["tolerance"], "g"), "yes" if v["within_tolerance"] else "**no**"]
             for k, v in gens.items()],
        ))  # fmt: skip
    if d.get("per_step"):
        base = {
            (r["precision"], r["graph"]): r["median_ms"] for r in d["per_step"] if r["runtime"] == "PyTorch inductor"
        }
        rows = []
        for r in d["per_step"]:
            ref = base.get((r["precision"], r["graph"]))
            speedup = _f(ref / r["median_ms"], ".2f", "x") if ref else "n/a"
            rows.append(
                [r["runtime"], r["precision"], r["graph"], r["k"], _f(r["median_ms"], ".2f"), speedup, r["note"]]
            )
        out.append("")
        out.append(
            _table(["runtime", "precision", "graph", "k", "ms", "vs PyTorch inductor (same precision)", "note"], rows)
        )
    return out
