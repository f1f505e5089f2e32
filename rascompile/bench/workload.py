"""What ``rascompile bench`` runs: the machine it runs on, the model and its inputs (:func:`build_model`,
:func:`make_inputs`), the transformer compiled with the RAS backend and its first call (:class:`Workload`), and
the variants it times (:func:`step_variants`, :func:`loop_variants`). The GPU suite (``benchmarks/gpu/``) builds its
RAS graphs on the first call's captured graph instead (:func:`capture_step`)."""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..capture import GraphCapture, capture_graphs
from ..config import RASConfig
from ..runtime import parallel
from ..runtime.backend import RASBackend, RASGraph
from .models import BenchModel, Inputs, bench_model
from .settings import BenchSettings

__all__ = [
    "CapturedStep",
    "GraphCaller",
    "StepVariant",
    "Workload",
    "build_model",
    "capture_step",
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


def build_model(
    settings: BenchSettings, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **overrides
) -> torch.nn.Module:
    """The transformer of ``settings.model`` at the benchmark's size with seeded random weights, in eval mode, on
    ``device`` in ``dtype`` (default: the CPU, float32; ``overrides``: see ``BenchModel.build``).

    Every parameter is redrawn (diffusers zero-initialises some layers): matrices ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.02^2), biases ~ N(0, 0.02^2).
    """
    return bench_model(settings.model).build(settings, device, dtype, **overrides)


def make_inputs(settings: BenchSettings, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """The pipeline inputs of one image (for ``sd3`` an :class:`Inputs`: latents [1, C, H, W], prompt embeddings
    and pooled embeddings [negative; positive]), drawn on the CPU, on ``device`` in ``dtype``."""
    return bench_model(settings.model).make_inputs(settings, device, dtype)


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


class GraphCaller:
    """Calls a graph like the transformer: the tensors of each call (latents, timestep, the branch's text)
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


def _random_active(
    batch: int, num_tokens: int, k: int, seed: int, device: str | torch.device | None = None
) -> torch.Tensor:
    """Seeded random active tokens [batch, k], each row sorted (drawn on the CPU, then moved to ``device``)."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_tokens, generator=gen)[:k].sort().values for _ in range(batch)]
    active = torch.stack(rows).contiguous()
    return active if device is None else active.to(device)


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


def _first_call(s: BenchSettings, family: BenchModel, inputs: Any) -> tuple[torch.Tensor, dict]:
    """The scheduler's timesteps for ``s.steps`` and the keyword arguments of the generation's first call."""
    scheduler = family.make_scheduler(s)
    family.set_timesteps(s, scheduler, s.steps)
    timesteps = scheduler.timesteps.clone()
    return timesteps, family.call_kwargs(s, inputs, inputs.latents, timesteps[0], 0)


def prepare_workload(
    settings: BenchSettings, model: torch.nn.Module, inputs: Any, config: RASConfig | None = None
) -> Workload:
    """Compile ``model`` with the RAS backend of the loop's settings, or of ``config`` (nothing is traced before the
    first call)."""
    s = settings
    family = bench_model(s.model)
    config = config if config is not None else s.loop_config()
    backend = RASBackend(config, inner_backend=s.inner_backend, fused_kv_projection=s.fused_kv_projection)
    capture = GraphCapture(backend)
    parallel.prepare_for_compile(model)  # under --context-parallel: diffusers' hooks traced into the one graph
    compiled = torch.compile(model, backend=capture)
    timesteps, first = _first_call(s, family, inputs)
    return Workload(s, family, model, inputs, backend, capture, compiled, timesteps, first)


@dataclass
class CapturedStep:
    """The Dynamo graph of a generation's first transformer call and its inputs, for RAS graphs built on it and
    called directly, each step variant compiled at its own first call (the GPU suite times every compile apart;
    a :class:`Workload`'s first call compiles every graph its schedule plans at once)."""

    settings: BenchSettings
    family: BenchModel
    first_call: dict
    gm: torch.fx.GraphModule
    args: list  # the graph inputs: the first call's tensors and the parameters

    def graph(self, config: RASConfig | None = None, **backend_options) -> tuple[RASGraph, list[str]]:
        """A RAS graph of the captured graph (nothing compiled yet) from a ``RASBackend`` of the settings' loop
        config (or ``config``), inner backend and ``fused_kv_projection`` (``backend_options`` override them), and
        the warnings rascompile gave (why it runs dense, for one)."""
        s = self.settings
        options = dict(inner_backend=s.inner_backend, fused_kv_projection=s.fused_kv_projection) | backend_options
        backend = RASBackend(config if config is not None else s.loop_config(), **options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = backend.new_graph(self.gm, self.args)
        return graph, [str(w.message) for w in caught if "rascompile" in str(w.message)]

    def caller(self, fn: Callable) -> GraphCaller:
        """``fn`` (a graph or its ``run_dense``) called like the transformer, in a denoising loop."""
        return GraphCaller(fn, self.args, self.first_call)


def capture_step(settings: BenchSettings, model: torch.nn.Module, inputs: Any) -> CapturedStep:
    """Trace the generation's first call of ``model`` with Dynamo (one eager call) into one graph."""
    family = bench_model(settings.model)
    _, first = _first_call(settings, family, inputs)
    graphs = capture_graphs(model, lambda compiled: compiled(**first), fullgraph=True, dynamic=False)
    if len(graphs) != 1:
        raise RuntimeError(f"expected one Dynamo graph of the transformer, got {len(graphs)}")
    return CapturedStep(settings, family, first, *graphs[0])


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


def step_variants(
    settings: BenchSettings, graph: RASGraph, device: str | torch.device | None = None
) -> list[StepVariant]:
    """The dense graph, the capture step (all N tokens) and a RAS step at each ratio of the per-step table (and at
    the loop's ratio, if the table lacks it), each over seeded random active tokens (on ``device``)."""
    s = settings
    n = s.num_tokens
    variants = [StepVariant("dense compiled", None, n, None, graph.run_dense)]
    all_idx = torch.arange(n, device=device).expand(s.batch, n).contiguous()
    variants.append(StepVariant("RAS capture step (k=N)", None, n, all_idx, lambda *a: graph.run_active(all_idx, *a)))
    ratios = s.ratios if s.loop_ratio in s.ratios else (*s.ratios, s.loop_ratio)
    for i, ratio in enumerate(ratios):
        k = n - RASConfig(sample_ratio=ratio).static_num_dropped(n)
        idx = _random_active(s.batch, n, k, s.seed + 100 + i, device)
        fn = lambda *a, idx=idx: graph.run_active(idx, *a)  # noqa: E731
        variants.append(StepVariant(f"RAS ratio {ratio:g}", ratio, k, idx, fn))
    return variants


def loop_variants(workload: Workload, graph: RASGraph) -> dict[str, Callable]:
    """The transformers of the timed loops: RAS compiled, dense compiled (the compiled dense graph called like
    the transformer) and, unless ``--no-eager-loop``, dense eager."""
    dense_caller = GraphCaller(graph.run_dense, workload.args, workload.first_call)
    loops: dict[str, Callable] = {"RAS compiled": workload.compiled, "dense compiled": dense_caller}
    if workload.settings.eager_loop:
        loops["dense eager"] = workload.model
    return loops
