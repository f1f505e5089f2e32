"""Measurements of ``rascompile bench``: per-step times (:func:`measure_steps`), whole denoising loops
(:func:`measure_loop`), the controller's overhead (:func:`controller_overhead`), memory (:func:`measure_memory`)
and the background load of the machine (:class:`LoadMonitor`). Every timing is the median of its repeats after
warm-up; variants are interleaved, so that drift affects every variant alike."""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..runtime.backend import RASGraph
from ..runtime.controller import RASController
from ..runtime.memory import set_bytes
from ..runtime.steps import TimestepSteps
from .flops import StepFlops
from .models import BenchModel, bench_model
from .settings import BenchSettings
from .workload import StepVariant

__all__ = [
    "LoadMonitor",
    "LoopTimes",
    "StepTimes",
    "controller_overhead",
    "measure_dense_only",
    "measure_loop",
    "measure_memory",
    "measure_steps",
]


def _timed(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _progress(settings: BenchSettings, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not settings.progress, leave=False, file=sys.stderr)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send the process's file descriptor 2 to /dev/null for a while: the profiler's native library (kineto) prints
    ``profiler_start`` / ``profiler_stop`` lines there that say nothing about the run."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _step_peak_bytes(fn: Callable) -> int | None:
    """Peak bytes of torch CPU allocations live during ``fn()`` beyond those live before it, from the profiler's
    memory events (every allocation and free of the CPU allocator, in time order). ``None`` if unavailable."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = prof.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except Exception:  # profiler internals differ between torch versions: report n/a, don't fail the run
        return None
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


class LoadMonitor:
    """Average number of cores that *other* processes kept busy during the run (from /proc/stat), so that a
    report taken on a shared machine says so. ``None`` where /proc/stat is unavailable."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()

    def stop(self) -> dict | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self.start, end))
        return {"other_processes_cores": max(0.0, (busy - own) / wall), "wall_s": wall}


def controller_overhead(
    settings: BenchSettings, graph: RASGraph, inputs, timesteps: torch.Tensor, repeats: int
) -> dict:
    """Median time of ``RASController.decide`` per RAS step (all of the step's calls: one per guidance branch
    for a pipeline that calls the transformer per branch) over whole generations, on a fresh controller with
    the graph's layout (a first generation warms up and is not timed). The latents move by random noise."""
    family = bench_model(settings.model)
    config = settings.loop_config()
    layout = graph.controller.layout
    controller = RASController(config, layout, TimestepSteps(settings.steps), graph.controller.device)
    gen = torch.Generator().manual_seed(settings.seed + 2)
    shape = tuple(inputs.latents.shape)  # the pipeline's latents of one image
    x = torch.randn(shape, generator=gen)
    calls = []  # per step: (latents, timestep) of each of its transformer calls
    for t in timesteps:
        step = []
        for branch in range(family.calls_per_step):
            kwargs = family.call_kwargs(settings, inputs, x, t, branch)
            step.append((kwargs["hidden_states"], kwargs["timestep"]))
        calls.append(step)
        x = x + 0.05 * torch.randn(shape, generator=gen)
    times: list[float] = []
    for generation in range(repeats + 1):
        for step in calls:
            start = time.perf_counter()
            decisions = [controller.decide(latents, t) for latents, t in step]
            elapsed = time.perf_counter() - start
            if generation > 0 and decisions[0].kind == "ras":
                times.append(elapsed)
    return {
        "decide_s": _median(times) if times else None,
        "samples": len(times),
        "calls_per_step": family.calls_per_step,
        "latents_shape": list(calls[0][0][0].shape),
    }


# ============================================================================================ per step


@dataclass
class StepTimes:
    """The per-step table: one row per variant (the report's and the JSON's ``per_step``), dense first, then the
    capture step, then the RAS steps."""

    rows: list[dict]

    @property
    def dense_s(self) -> float:
        return self.rows[0]["median_s"]

    @property
    def capture_s(self) -> float:
        return self.rows[1]["median_s"]

    def at_ratio(self, ratio: float) -> dict:
        """The (first) row of a RAS step at ``ratio``."""
        return next(r for r in self.rows if r["ratio"] == ratio)


def measure_steps(settings: BenchSettings, variants: Sequence[StepVariant], args: list, flops: StepFlops) -> StepTimes:
    """Per-step times of ``variants`` on the graph inputs ``args``: the first call of each (it compiles the
    graph) and a warm-up, then ``settings.repeats`` interleaved timed calls; each row beside its FLOPs."""
    rows = []
    bar = _progress(settings, len(variants) * (settings.repeats + 2), "per-step")
    for i, v in enumerate(variants):
        bar.set_description(f"per-step: compiling {v.name}")
        compile_s = _timed(lambda fn=v.fn: fn(*args))  # the first call of a graph compiles it
        _timed(lambda fn=v.fn: fn(*args))  # warm-up
        bar.update(2)
        row = {"name": v.name, "ratio": v.ratio, "k": v.k, "first_call_s": compile_s, "times_s": []}
        rows.append(row | flops.row(i))
    bar.set_description("per-step: timing")
    for _ in range(settings.repeats):  # interleaved, so that drift affects every variant alike
        for row, v in zip(rows, variants):
            row["times_s"].append(_timed(lambda fn=v.fn: fn(*args)))
            bar.update()
    bar.close()
    for row in rows:
        row["median_s"] = _median(row["times_s"])
    dense_s = rows[0]["median_s"]
    for row in rows:
        row["speedup"] = dense_s / row["median_s"]
        row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
    return StepTimes(rows)


def measure_dense_only(settings: BenchSettings, model, compiled, call: dict, dense_flops: int) -> list[dict]:
    """Per-step times of the dense model when RAS does not apply: compiled (``torch.compile`` with the ras
    backend, which runs the dense graph) and eager."""
    variants = [("dense compiled", lambda: compiled(**call)), ("dense eager", lambda: model(**call))]
    rows = []
    for name, fn in variants:
        compile_s = _timed(fn)
        _timed(fn)
        rows.append({"name": name, "ratio": None, "k": settings.num_tokens, "first_call_s": compile_s, "times_s": []})
    for _ in range(settings.repeats):
        for row, (_, fn) in zip(rows, variants):
            row["times_s"].append(_timed(fn))
    for row in rows:
        row["median_s"] = _median(row["times_s"])
        row["flops"] = dense_flops
    return rows


# ============================================================================================ whole loops


@dataclass
class LoopTimes:
    """Times of whole denoising loops, per transformer (``loop_variants``)."""

    times_s: dict[str, list[float]]
    kinds: list[str]  # the RAS controller's decision per call in the last timed RAS loop ("ras", "capture", ...)

    @property
    def median_s(self) -> dict[str, float]:
        return {name: _median(v) for name, v in self.times_s.items()}


def measure_loop(
    settings: BenchSettings, family: BenchModel, graph: RASGraph, loops: dict[str, Callable], inputs
) -> LoopTimes:
    """Times of whole generations of ``settings.steps`` steps with each transformer of ``loops`` (the first is the
    RAS one): a warm-up generation of RAS (compiling any missing variant) and one warm-up step of the others,
    then ``loop_repeats`` interleaved timed generations."""
    s = settings
    loop_repeats = s.loop_repeats or s.repeats
    loop_times: dict[str, list[float]] = {name: [] for name in loops}
    total = (loop_repeats + 1) * s.steps + (len(loops) - 1) * (loop_repeats * s.steps + 1)
    bar = _progress(s, total, "loops")

    def run_loop(name: str) -> float:
        bar.set_description(f"loop: {name}")
        return _timed(lambda: family.denoise(loops[name], s, inputs, s.steps, bar.update))

    # The first call above began a generation; forget it, so the warm-up loop (whose first call repeats that
    # call's latents and timestep) begins its own instead of looking like a second call for the same step.
    graph.controller.reset()
    run_loop("RAS compiled")  # warm-up: a whole generation (compiles any missing variant)
    for name, fn in loops.items():
        if name != "RAS compiled":  # warm-up: one step
            family.denoise(fn, s, inputs, 1, bar.update)
    kinds: list[str] = []
    for _ in range(loop_repeats):
        for name in loops:  # interleaved, so that drift affects every variant alike
            loop_times[name].append(run_loop(name))
            if name == "RAS compiled":
                kinds = [d.kind for d in graph.controller.history]
    bar.close()
    return LoopTimes(loop_times, kinds)


# ============================================================================================ memory


def measure_memory(graph: RASGraph, args: list, variants: Sequence[StepVariant], ratio: float, calls: int) -> dict:
    """The most bytes of caches the controller held in the last generation (all its guidance branches; it
    frees them after the last RAS step) and the bytes ``rascompile.plan`` gives for ``calls`` branches, the peak
    step allocations of a dense, a capture and a RAS step at ``ratio`` (the last variant at that ratio), and the
    process's peak RSS."""
    capture_idx = variants[1].idx
    ras_idx = [v.idx for v in variants if v.ratio == ratio][-1]
    return {
        "ras_caches_bytes": graph.controller.cache_peak_bytes,
        # what rascompile.plan counts: one set of the graph's caches per guidance branch (transformer call per step)
        "ras_caches_planned_bytes": calls * set_bytes(graph.layout.output_cache, graph.layout.kv_caches),
        "ras_cache_branches": graph.controller.cache_peak_branches,
        "dense_step_peak_bytes": _step_peak_bytes(lambda: graph.run_dense(*args)),
        "capture_step_peak_bytes": _step_peak_bytes(lambda: graph.run_active(capture_idx, *args)),
        "ras_step_ratio": ratio,
        "ras_step_peak_bytes": _step_peak_bytes(lambda: graph.run_active(ras_idx, *args)),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
