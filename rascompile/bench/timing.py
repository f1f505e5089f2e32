"""Measurements of ``rascompile bench`` and the GPU suite: per-step times (:func:`measure_steps`), whole denoising
loops (:func:`measure_loop`), the controller's overhead (:func:`controller_overhead`) and the background load of the
machine (:class:`LoadMonitor`); memory is in ``memory.py``. Every timing is the median of its repeats after warm-up;
variants are interleaved (:func:`time_interleaved`), so that drift affects every variant alike. On CUDA every timed
call is bracketed by ``torch.cuda.synchronize`` (the ``device`` arguments; ``None`` is the CPU)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..runtime.backend import RASGraph
from ..runtime.controller import RASController
from ..runtime.steps import TimestepSteps
from .flops import StepFlops
from .memory import allocator_peak, is_cuda
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
    "measure_steps",
    "sync",
    "time_interleaved",
    "timed_call",
]


def sync(device: str | torch.device | None) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def timed_call(fn: Callable, device: str | torch.device | None = None) -> float:
    """Seconds of one call of ``fn`` (the first call of a compiled graph: its compile and one run)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def time_interleaved(
    fns: Mapping[Hashable, Callable],
    repeats: int,
    device: str | torch.device | None = None,
    *,
    warmup: bool = True,
    on_call: Callable[[], object] | None = None,
) -> dict[Hashable, dict]:
    """Median seconds per call of each function: ``repeats`` rounds that call every function once (interleaved, so
    that drift affects every function alike), after one warm-up call each (``warmup``). ``on_call`` runs after
    every timed call (a progress bar)."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[Hashable, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed_call(fn, device))
            if on_call is not None:
                on_call()
    return {name: {"median_s": _median(v), "times_s": v} for name, v in times.items()}


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _progress(settings: BenchSettings, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not settings.progress, leave=False, file=sys.stderr)


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


def measure_steps(
    settings: BenchSettings,
    variants: Sequence[StepVariant],
    args: list,
    flops: StepFlops,
    device: str | torch.device | None = None,
) -> StepTimes:
    """Per-step times of ``variants`` on the graph inputs ``args``: the first call of each (it compiles the
    graph) and a warm-up, then ``settings.repeats`` interleaved timed calls; each row beside its FLOPs."""
    rows, fns = [], {}
    bar = _progress(settings, len(variants) * (settings.repeats + 2), "per-step")
    for i, v in enumerate(variants):
        bar.set_description(f"per-step: compiling {v.name}")
        fns[i] = lambda fn=v.fn: fn(*args)
        compile_s = timed_call(fns[i], device)  # the first call of a graph compiles it
        timed_call(fns[i], device)  # warm-up
        bar.update(2)
        row = {"name": v.name, "ratio": v.ratio, "k": v.k, "first_call_s": compile_s, "times_s": []}
        rows.append(row | flops.row(i))
    bar.set_description("per-step: timing")
    timed = time_interleaved(fns, settings.repeats, device, warmup=False, on_call=bar.update)
    bar.close()
    for i, row in enumerate(rows):
        row["times_s"], row["median_s"] = timed[i]["times_s"], timed[i]["median_s"]
    dense_s = rows[0]["median_s"]
    for row in rows:
        row["speedup"] = dense_s / row["median_s"]
        row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
    return StepTimes(rows)


def measure_dense_only(
    settings: BenchSettings, model, compiled, call: dict, dense_flops: int, device: str | torch.device | None = None
) -> list[dict]:
    """Per-step times of the dense model when RAS does not apply: compiled (``torch.compile`` with the ras
    backend, which runs the dense graph) and eager."""
    fns = {"dense compiled": lambda: compiled(**call), "dense eager": lambda: model(**call)}
    rows = []
    for name, fn in fns.items():
        compile_s = timed_call(fn, device)
        timed_call(fn, device)
        rows.append({"name": name, "ratio": None, "k": settings.num_tokens, "first_call_s": compile_s, "times_s": []})
    timed = time_interleaved(fns, settings.repeats, device, warmup=False)
    for row in rows:
        row["times_s"], row["median_s"] = timed[row["name"]]["times_s"], timed[row["name"]]["median_s"]
        row["flops"] = dense_flops
    return rows


# ============================================================================================ whole loops


@dataclass
class LoopTimes:
    """Times of whole denoising loops, per transformer (``loop_variants``)."""

    times_s: dict[str, list[float]]
    kinds: list[str]  # the RAS controller's decision per call in the last timed RAS loop ("ras", "capture", ...)
    #: on CUDA: the allocator's peak during each transformer's warm-up generation (``memory.allocator_peak``)
    memory: dict[str, dict] | None = None

    @property
    def median_s(self) -> dict[str, float]:
        return {name: _median(v) for name, v in self.times_s.items()}


def measure_loop(
    settings: BenchSettings,
    family: BenchModel,
    graph: RASGraph,
    loops: dict[str, Callable],
    inputs,
    device: str | torch.device | None = None,
) -> LoopTimes:
    """Times of whole generations of ``settings.steps`` steps with each transformer of ``loops`` (the first is the
    RAS one): a warm-up generation of RAS (compiling any missing variant) and one warm-up step of the others,
    then ``loop_repeats`` interleaved timed generations. On CUDA every warm-up is a whole generation, and its
    allocator peak is kept (:attr:`LoopTimes.memory`)."""
    s = settings
    loop_repeats = s.loop_repeats or s.repeats
    whole = is_cuda(device)
    loop_times: dict[str, list[float]] = {name: [] for name in loops}
    warmup_steps = s.steps if whole else 1
    total = (loop_repeats + 1) * s.steps + (len(loops) - 1) * (loop_repeats * s.steps + warmup_steps)
    bar = _progress(s, total, "loops")

    def run_loop(name: str) -> float:
        bar.set_description(f"loop: {name}")
        return timed_call(lambda: family.denoise(loops[name], s, inputs, s.steps, bar.update), device)

    # The first call above began a generation; forget it, so the warm-up loop (whose first call repeats that
    # call's latents and timestep) begins its own instead of looking like a second call for the same step.
    graph.controller.reset()
    memory = {}
    for name, fn in loops.items():  # warm-up, RAS first
        if whole:
            memory[name] = allocator_peak(lambda name=name: run_loop(name), device)
        elif name == "RAS compiled":
            run_loop(name)  # a whole generation (compiles any missing variant)
        else:
            family.denoise(fn, s, inputs, 1, bar.update)  # one step
    kinds: list[str] = []
    for _ in range(loop_repeats):
        for name in loops:  # interleaved, so that drift affects every variant alike
            loop_times[name].append(run_loop(name))
            if name == "RAS compiled":
                kinds = [d.kind for d in graph.controller.history]
    bar.close()
    return LoopTimes(loop_times, kinds, memory if whole else None)
