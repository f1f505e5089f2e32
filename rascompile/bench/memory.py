"""Memory of ``rascompile bench`` and the GPU suite: the peak bytes one step allocates (:func:`step_peak_bytes`) on
the CPU (the profiler's memory events) or on CUDA (the caching allocator's peak, :func:`allocator_peak`), and the
RAS caches against ``rascompile.plan`` (:func:`measure_memory`)."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Callable, Sequence

import torch

from ..runtime.backend import RASGraph
from ..runtime.memory import set_bytes
from .workload import StepVariant

__all__ = ["allocator_peak", "is_cuda", "measure_memory", "step_peak_bytes"]


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


def is_cuda(device: str | torch.device | None) -> bool:
    """Whether ``device`` (``None``: the CPU) is a CUDA device."""
    return device is not None and torch.device(device).type == "cuda"


def allocator_peak(fn: Callable, device: str | torch.device | None) -> dict | None:
    """The CUDA caching allocator's peak during one call of ``fn``: ``peak_bytes`` (absolute) and
    ``above_live_bytes`` (above what was allocated before the call). ``None`` off CUDA: the CPU allocator keeps no
    peak statistics (:func:`step_peak_bytes` reads the profiler there)."""
    if not is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "above_live_bytes": peak - before}


def step_peak_bytes(fn: Callable, device: str | torch.device | None = None) -> int | None:
    """Peak bytes allocated during ``fn()`` beyond those live before it. On CUDA the allocator's peak; on the CPU
    from the profiler's memory events (every allocation and free of the CPU allocator, in time order), ``None``
    if unavailable."""
    if is_cuda(device):
        return allocator_peak(fn, device)["above_live_bytes"]
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


def measure_memory(
    graph: RASGraph,
    args: list,
    variants: Sequence[StepVariant],
    ratio: float,
    calls: int,
    device: str | torch.device | None = None,
) -> dict:
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
        "dense_step_peak_bytes": step_peak_bytes(lambda: graph.run_dense(*args), device),
        "capture_step_peak_bytes": step_peak_bytes(lambda: graph.run_active(capture_idx, *args), device),
        "ras_step_ratio": ratio,
        "ras_step_peak_bytes": step_peak_bytes(lambda: graph.run_active(ras_idx, *args), device),
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
