"""What ``rascompile bench`` runs: the machine it runs on, the model and its inputs (:func:`build_model`,
:func:`make_inputs`), the transformer compiled with the RAS backend and its first call (:class:`Workload`), and
the variants it times (:func:`step_variants`, :func:`loop_variants`)."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..capture import GraphCapture
from ..config import RASConfig
from ..runtime import parallel
from ..runtime.backend import RASBackend, RASGraph
from .models import BenchModel, Inputs, bench_model
from .settings import BenchSettings

__all__ = [
    "StepVariant",
    "Workload",
    "build_model",
    "denoise",
    "loop_variants",
    "machine_info",
    "make_inputs",
    "make_scheduler",
    "prepare_workload",
    "step_variants",
    "whole_graph",
]


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except Exception:  # pragma: no cover - diffusers is a dependency
        diffusers_version = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def build_model(settings: BenchSettings) -> torch.nn.Module:
    """The transformer of ``settings.model`` at the benchmark's size with seeded random weights, in eval mode.

    Every parameter is redrawn (diffusers zero-initialises some layers): matrices ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.02^2), biases ~ N(0, 0.02^2).
    """
    return bench_model(settings.model).build(settings)


def make_inputs(settings: BenchSettings):
    """The pipeline inputs of one image (for ``sd3`` an :class:`Inputs`: latents [1, C, H, W], prompt embeddings
    and pooled embeddings [negative; positive])."""
    return bench_model(settings.model).make_inputs(settings)


def make_scheduler():
    """SD3's scheduler (flow matching, shift 3)."""
    return bench_model("sd3").make_scheduler(None)


def denoise(transformer: Callable, scheduler, inputs: Inputs, steps: int, guidance_scale: float, on_step=None):
    """A Stable Diffusion 3 denoising loop with classifier-free guidance; returns the final latents.
    (Other families: ``bench_models.bench_model(name).denoise``.)"""
    sd3 = bench_model("sd3")
    settings = replace(BenchSettings(), guidance_scale=guidance_scale)
    scheduler.set_timesteps(steps)
    x = inputs.latents
    for t in scheduler.timesteps:
        out = transformer(**sd3.call_kwargs(settings, inputs, x, t))[0]
        x = scheduler.step(sd3.combine(settings, [out]), t, x, return_dict=False)[0]
        if on_step is not None:
            on_step()
    return x


class _GraphCaller:
    """Calls a compiled graph like the transformer: the tensors of each call (latents, timestep, the branch's text)
    take the places in the captured graph inputs where the first call's tensors of those names were (the graph's
    other inputs, parameters included, stay those of the first call)."""

    def __init__(self, fn: Callable, args: list, first_call: dict):
        self.fn, self.args = fn, args
        self.places = {}
        for name, value in first_call.items():
            if isinstance(value, torch.Tensor):
                found = [i for i, a in enumerate(args) if a is value]
                if found:
                    self.places[name] = found[0]

    def __call__(self, **kwargs):
        args = list(self.args)
        for name, index in self.places.items():
            if name in kwargs:
                args[index] = kwargs[name]
        return self.fn(*args)


def _random_active(batch: int, num_tokens: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_tokens, generator=gen)[:k].sort().values for _ in range(batch)]
    return torch.stack(rows).contiguous()


# ============================================================================================ the compiled model


@dataclass
class Workload:
    """The model of one benchmark run, its inputs and the transformer compiled with the RAS backend."""

    settings: BenchSettings
    family: BenchModel
    model: torch.nn.Module  # eager, seeded random weights
    inputs: Any  # the pipeline inputs of one image (make_inputs)
    backend: RASBackend
    capture: GraphCapture  # wraps the backend, keeping each graph's real example inputs
    compiled: Callable  # torch.compile(model, backend=capture)
    timesteps: torch.Tensor  # the scheduler's, for settings.steps
    first_call: dict  # the keyword arguments of the generation's first transformer call

    @property
    def args(self) -> list:
        """The graph inputs of the first call (once it was made)."""
        return self.capture.example_inputs[0]


def prepare_workload(settings: BenchSettings, model: torch.nn.Module, inputs: Any) -> Workload:
    """Compile ``model`` with the RAS backend of the loop's settings (nothing is traced before the first call)."""
    s = settings
    family = bench_model(s.model)
    backend = RASBackend(s.loop_config(), inner_backend=s.inner_backend, fused_kv_projection=s.fused_kv_projection)
    capture = GraphCapture(backend)
    parallel.prepare_for_compile(model)  # under --context-parallel: diffusers' hooks traced into the one graph
    compiled = torch.compile(model, backend=capture)
    scheduler = family.make_scheduler(s)
    family.set_timesteps(s, scheduler, s.steps)
    timesteps = scheduler.timesteps.clone()
    first = family.call_kwargs(s, inputs, inputs.latents, timesteps[0], 0)  # the generation's first call
    return Workload(s, family, model, inputs, backend, capture, compiled, timesteps, first)


def whole_graph(backend: RASBackend) -> tuple[RASGraph | None, str | None]:
    """The one RAS graph of the transformer, or ``None`` and why RAS does not apply."""
    if len(backend.graphs) != 1:
        return None, (
            f"Dynamo split the transformer into {len(backend.graphs)} graphs (graph breaks); the benchmark needs "
            "the whole transformer as one graph"
        )
    graph = backend.graphs[0]
    if graph.controller is None:
        return graph, graph.fallback_reason or "the backend runs this graph dense"
    return graph, None


@dataclass(frozen=True)
class StepVariant:
    """One row of the per-step table: a graph call over ``k`` tokens."""

    name: str
    ratio: float | None  # the sample ratio; None for the dense and the capture step
    k: int  # active tokens per batch row
    idx: torch.Tensor | None  # the active tokens [B, k]; None for the dense graph
    fn: Callable  # fn(*graph_args) runs one step


def step_variants(settings: BenchSettings, graph: RASGraph) -> list[StepVariant]:
    """The dense graph, the capture step (all N tokens) and a RAS step at each ratio of the per-step table (and at
    the loop's ratio, if the table lacks it), each over seeded random active tokens."""
    s = settings
    n = s.num_tokens
    variants = [StepVariant("dense compiled", None, n, None, graph.run_dense)]
    all_idx = torch.arange(n).expand(s.batch, n).contiguous()
    variants.append(StepVariant("RAS capture step (k=N)", None, n, all_idx, lambda *a: graph.run_active(all_idx, *a)))
    ratios = s.ratios if s.loop_ratio in s.ratios else (*s.ratios, s.loop_ratio)
    for i, ratio in enumerate(ratios):
        k = n - RASConfig(sample_ratio=ratio).static_num_dropped(n)
        idx = _random_active(s.batch, n, k, s.seed + 100 + i)
        fn = lambda *a, idx=idx: graph.run_active(idx, *a)  # noqa: E731
        variants.append(StepVariant(f"RAS ratio {ratio:g}", ratio, k, idx, fn))
    return variants


def loop_variants(workload: Workload, graph: RASGraph) -> dict[str, Callable]:
    """The transformers of the timed loops: RAS compiled, dense compiled (the compiled dense graph called like
    the transformer) and, unless ``--no-eager-loop``, dense eager."""
    dense_caller = _GraphCaller(graph.run_dense, workload.args, workload.first_call)
    loops: dict[str, Callable] = {"RAS compiled": workload.compiled, "dense compiled": dense_caller}
    if workload.settings.eager_loop:
        loops["dense eager"] = workload.model
    return loops
