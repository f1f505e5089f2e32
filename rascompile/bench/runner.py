"""Speed benchmark of RAS against dense execution: ``rascompile bench`` / ``benchmarks/speed.py``.

A mid-size transformer of one diffusers family (``--model``: ``sd3``, the default, an SD3-shaped
``SD3Transformer2DModel`` with a classifier-free-guidance batch of 2; ``flux``, a ``FluxTransformer2DModel``
with packed latents, batch 1; ``wan``, a ``WanTransformer3DModel`` on video latents, batch 1 per guidance
branch; see :mod:`rascompile.bench.models`), random weights, runs on the current device in fp32 under
``torch.no_grad()`` with the inputs its pipeline passes. Everything is compiled with the same inner backend
(inductor by default). Reported:

1. **Per-step time**: one dense step of the compiled original graph, one "capture" step (the RAS graph
   over all N tokens, which the dense steps of a RAS generation run to fill the caches) and one RAS step
   at each sample ratio, each beside its *ideal speedup* FLOPs(dense) / FLOPs(k). For ``sd3`` the FLOPs
   come from the analytic model (:func:`step_flops`); for the other families they are measured with
   ``FlopCounterMode`` (:func:`rascompile.bench.flops.count_flops`): the eager model for a dense step, the
   rewritten RAS graph run eagerly at k for a RAS step. ``sd3`` reports the measured FLOPs beside the
   analytic ones.
2. **Whole denoising loop** (28 steps, scheduler start 4, error resets 12 and 20, ratio 0.25 -- the
   paper's SD3 setting, for every family): RAS compiled against dense compiled and dense eager, with the
   loop's ideal speedup from the per-step FLOPs and the schedule.
3. **Controller overhead**: ``RASController.decide`` (token metric, selection, bookkeeping) per RAS step,
   as a share of the RAS step time.
4. **Memory**: the bytes of the caches the controller holds between steps, and the peak of the torch CPU
   allocations live during one dense, capture and RAS step (profiler memory events; CPU has no allocator
   peak statistics like ``torch.cuda.max_memory_allocated``).

Every timing is the median of ``--repeats`` runs after warm-up (the first call of each graph compiles
and is reported as compile time, not timed). "Dense compiled" calls the Dynamo graph of the transformer
compiled by the inner backend directly (what ``torch.compile(backend="inductor")`` runs, without
Dynamo's guard check, which costs microseconds); RAS runs through ``torch.compile`` and its controller.

When the backend cannot rewrite the model's graph (it runs dense and warns with the reason), the report says
so, with the reason, and times the dense step only: no RAS numbers, no speedups.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from .._extras import require_extra
from ..cli.main import check_output_file, quiet_third_party
from ..passes.snapshot import render_record, rewrite_records
from ..runtime.backend import RASGraph
from ..runtime.schedule import build_schedule
from .flops import (
    ModelSpec,
    StepFlops,
    count_step_flops,
    dense_step_flops,
    ideal_speedup,
    loop_ideal_speedup,
    ras_step_flops,
    step_flops,
)
from .memory import measure_memory
from .models import MODELS, BenchModel, Inputs, bench_model, input_shapes
from .options import add_arguments, settings_from_args
from .report import format_report
from .settings import SMOKE, BenchSettings, settings_for
from .timing import (
    LoadMonitor,
    LoopTimes,
    StepTimes,
    controller_overhead,
    measure_dense_only,
    measure_loop,
    measure_steps,
    timed_call,
)
from .workload import (  # _random_active: imported from here by tests/cli/test_bench_models.py
    _random_active,  # noqa: F401
    build_model,
    denoise,
    loop_variants,
    machine_info,
    make_inputs,
    make_scheduler,
    prepare_workload,
    step_variants,
    whole_graph,
)

# The names benchmarks/onnx_speed.py and the tests import from here; the code lives in settings.py, options.py,
# models.py, workload.py, timing.py, memory.py and flops.py (the GPU suite, benchmarks/gpu/, imports from those).
__all__ = [
    "BenchSettings",
    "Inputs",
    "MODELS",
    "ModelSpec",
    "SMOKE",
    "add_arguments",
    "build_model",
    "denoise",
    "dense_step_flops",
    "ras_step_flops",
    "settings_for",
    "format_report",
    "ideal_speedup",
    "loop_ideal_speedup",
    "machine_info",
    "main_from_args",
    "make_inputs",
    "make_scheduler",
    "run_bench",
    "settings_from_args",
    "step_flops",
]


def run_bench(
    settings: BenchSettings,
    log: Callable[[str], None] | None = None,
    *,
    prepare_model: Callable[[torch.nn.Module], None] | None = None,
    inspect_graph: Callable[[RASGraph], None] | None = None,
) -> dict:
    """Run the benchmark and return its numbers (see :func:`format_report`).

    ``prepare_model(model)`` runs on the built model before it is compiled (``--context-parallel`` enables the
    parallelism there); ``inspect_graph(graph)`` on the RAS graph after the measurements, when RAS applies."""
    require_extra("demo", "tqdm", feature="rascompile bench")  # its progress bars
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    s = settings
    family = bench_model(s.model)
    spec = s.spec() if s.model == "sd3" else None  # the analytic FLOP model: SD3 only
    model_info = describe_model(s, family, spec)
    results: dict = {
        "machine": machine_info(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "model": model_info,
    }
    load = LoadMonitor()
    model = build_model(s)
    if prepare_model is not None:
        prepare_model(model)
    inputs = make_inputs(s)
    results["memory"] = {"parameters_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    w = prepare_workload(s, model, inputs)
    model_info["inputs"] = input_shapes(w.first_call)

    with torch.no_grad():
        # ------------------------------------------------------------------ first call: trace, rewrite, compile
        n = s.num_tokens
        log(f"tracing and compiling the graphs the loop's schedule runs (k=N={n} and RAS) with {s.inner_backend} ...")
        results["first_call_s"] = timed_call(lambda: w.compiled(**w.first_call))
        graph, reason = whole_graph(w.backend)
        results["ras"] = {"applies": reason is None, "reason": reason}
        log("counting the FLOPs of a dense step (FlopCounterMode, eager model) ...")
        dense_flops = dense_step_flops(model, w.first_call)
        if reason is not None:
            log(f"RAS does not apply to {family.class_name}: {reason}; timing the dense step only")
            results["per_step"] = measure_dense_only(s, model, w.compiled, w.first_call, dense_flops)
            results["flops"] = {"source": "measured", "dense_measured": dense_flops}
            results["background_load"] = load.stop()
            return results
        results |= kv_writes(graph)
        if graph.timestep_index is None:
            raise RuntimeError("the graph has no timestep input")

        # ------------------------------------------------------------------ per-step times
        variants = step_variants(s, graph)
        # FLOPs: the dense step on the eager model; a RAS step as the rewritten graph run eagerly at k
        log("counting the FLOPs of the RAS graph at each k (FlopCounterMode, graph run eagerly) ...")
        flops = count_step_flops(spec, graph, w.args, variants, dense_flops)
        steps = measure_steps(s, variants, w.args, flops)
        results["per_step"] = steps.rows
        results["flops"] = flops.summary()
        results["compile_count_after_per_step"] = graph.compile_count

        # ------------------------------------------------------------------ whole loops
        loops = measure_loop(s, family, graph, loop_variants(w, graph), inputs)
        results["loop"] = loop_results(s, family, loops, steps, flops)
        results["compile_count"] = graph.compile_count

        # ------------------------------------------------------------------ controller overhead
        ras_row = steps.at_ratio(s.loop_ratio)
        overhead = controller_overhead(s, graph, inputs, w.timesteps, max(s.repeats, 1))
        if overhead["decide_s"] is not None:
            overhead["ras_step_s"] = family.calls_per_step * ras_row["median_s"]
            overhead["ras_step_ratio"] = ras_row["ratio"]
            overhead["percent_of_ras_step"] = 100.0 * overhead["decide_s"] / overhead["ras_step_s"]
        results["controller"] = overhead

        # ------------------------------------------------------------------ memory
        results["memory"] |= measure_memory(graph, w.args, variants, s.loop_ratio, family.calls_per_step)
        if inspect_graph is not None:
            inspect_graph(graph)
    results["background_load"] = load.stop()
    return results


def describe_model(settings: BenchSettings, family: BenchModel, spec: ModelSpec | None) -> dict:
    """The report's ``model`` entry (its ``inputs`` are added once the first call is known)."""
    info = {"name": settings.model, "class": family.class_name, "description": family.describe(settings)}
    info |= (asdict(spec) if spec is not None else {}) | family.shapes(settings)
    info["calls_per_step"] = family.calls_per_step
    return info


def kv_writes(graph: RASGraph) -> dict:
    """How many of the graph's K/V cache writes the fused projection took, and why the others stay unfused."""
    records = rewrite_records(graph.ras_gm)
    return {
        "fused_kv_writes": sum(record.kind == "fused" for record in records),
        "unfused_kv_reasons": [render_record(record) for record in records if record.kind == "unfused"],
        "kv_writes": len(graph.controller.layout.kv_caches),
    }


def loop_results(
    settings: BenchSettings, family: BenchModel, loops: LoopTimes, steps: StepTimes, flops: StepFlops
) -> dict:
    """The report's ``loop`` entry: the schedule, the decisions the controller took, the times, the ideal speedup
    and the times the per-step medians predict."""
    s = settings
    schedule = build_schedule(s.loop_config(), s.steps, s.num_tokens)
    active_per_step = [p.num_active for p in schedule]
    kinds = loops.kinds
    loop = {
        "steps": s.steps,
        "calls_per_step": family.calls_per_step,
        "ratio": s.loop_ratio,
        "start_step": s.start_step,
        "reset_steps": list(s.reset_steps),
        "planned_ras_steps": sum(not p.dense for p in schedule),
        "run_ras_steps": kinds.count("ras"),
        "run_capture_steps": kinds.count("capture"),
        "run_dense_steps": kinds.count("dense"),
        "ideal_speedup": flops.loop_ideal_speedup(s.num_tokens, active_per_step),
        "times_s": loops.times_s,
        "median_s": loops.median_s,
    }
    calls = family.calls_per_step
    loop["predicted_ras_s"] = calls * (
        kinds.count("capture") * steps.capture_s
        + kinds.count("dense") * steps.dense_s
        + kinds.count("ras") * steps.at_ratio(s.loop_ratio)["median_s"]
    )
    loop["predicted_dense_s"] = calls * s.steps * steps.dense_s
    return loop


def main_from_args(args: argparse.Namespace) -> int:
    """``rascompile bench``: run, print the report, write ``--json``. Returns the exit status."""
    if getattr(args, "context_parallel", None) is not None:  # one process per rank, under torchrun
        from .parallel import main_from_args as parallel_main

        return parallel_main(args)
    try:
        settings = settings_from_args(args)
        if settings.json_path:
            check_output_file(settings.json_path, "--json")  # before the run, not after it
    except ValueError as exc:
        print(f"rascompile bench: error: {exc}", file=sys.stderr)
        return 2
    quiet_third_party()
    results = run_bench(settings)
    print(format_report(results), flush=True)
    return write_json(settings.json_path, results)


def write_json(json_path: str | None, results: dict) -> int:
    """Write ``results`` to ``--json`` (if given) and say so. Returns the exit status."""
    if not json_path:
        return 0
    path = Path(json_path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))
    except OSError as exc:  # the path was writable when the run began
        print(f"rascompile bench: error: --json {path}: cannot write it ({exc.strerror or exc})", file=sys.stderr)
        return 2
    print(f"\nwrote {json_path}")
    return 0
