"""The ``ras`` Dynamo backend: rewrite the graph once, compile variants lazily, dispatch per step.

``torch.compile(transformer, backend="ras", options={...})`` calls ``ras_backend`` with the
Dynamo graph of the whole transformer. The backend builds the RAS step graph with the passes
in ``rascompile.passes`` and returns a ``RASGraph``: a callable that asks its controller for
each step's decision and runs the matching compiled graph. Graphs are compiled with the inner
backend on first use: the original dense graph, and the RAS graph once per distinct active
token count (the dense steps that fill the caches run it with k = N).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx

from rascompile.passes import RewriteError, build_ras_graph, graph_summary
from rascompile.passes import copy_graph_module as _copy
from rascompile.passes.specialize_shapes import has_symbolic_shapes, specialize_shapes

from .config import RASConfig
from .controller import GraphLayout, RASController
from .steps import SchedulerSteps, TimestepSteps

INNER_BACKENDS = ("inductor", "aot_eager", "eager")
BACKEND_OPTIONS = ("inner_backend", "dump_graphs", "fused_kv_projection")


def compile_inner(name: str, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    if name == "eager":
        return gm.forward
    if name == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


class RASBackend:
    """A configured RAS backend; pass an instance as ``torch.compile(..., backend=...)``.

    ``fused_kv_projection`` runs each K/V projection that feeds a cache (with its q/k norm and
    RoPE) as one ``rascompile::linear_scatter_`` op: ``None`` (default) fuses graphs that run on
    CUDA when Triton is installed, ``True`` fuses on every device (the op's plain torch version
    runs off CUDA), ``False`` never fuses.

    One instance may see several Dynamo graphs (one per input resolution, or the pieces of a
    graph with breaks); each gets its own ``RASGraph`` with its own controller and caches.
    """

    def __init__(
        self,
        config: RASConfig | None = None,
        *,
        inner_backend: str = "inductor",
        steps_factory: Callable[[], Any] | None = None,
        dump_graphs: str | None = None,
        fused_kv_projection: bool | None = None,
    ):
        if inner_backend not in INNER_BACKENDS:
            raise ValueError(f"inner_backend={inner_backend!r} is invalid: must be one of {', '.join(INNER_BACKENDS)}")
        if not (fused_kv_projection is None or isinstance(fused_kv_projection, bool)):
            raise ValueError(
                f"fused_kv_projection={fused_kv_projection!r} is invalid: "
                "must be None (on for CUDA graphs), True or False"
            )
        self.fused_kv_projection = fused_kv_projection
        self.config = config if config is not None else RASConfig()
        self.inner_backend = inner_backend
        self.dump_graphs = dump_graphs
        if steps_factory is None:
            if self.config.num_inference_steps is None:
                raise ValueError(
                    "RASConfig.num_inference_steps=None is invalid for backend='ras': give the pipeline's step "
                    "count in options (e.g. options={'num_inference_steps': 28}), or use rascompile.apply(pipe)"
                )
            steps_factory = lambda: TimestepSteps(self.config.num_inference_steps)  # noqa: E731
        self.steps_factory = steps_factory
        self.graphs: list[RASGraph] = []
        self._warned: set[str] = set()

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> RASBackend:
        options = dict(options or {})
        backend_only = {k: options.pop(k) for k in BACKEND_OPTIONS if k in options}
        return cls(RASConfig.from_options(options), **backend_only)

    @property
    def compile_count(self) -> int:
        """Graphs compiled with the inner backend so far, over every Dynamo graph this backend saw."""
        return sum(g.compile_count for g in self.graphs)

    def fuses_kv_projection(self, example_inputs: list) -> bool:
        if self.fused_kv_projection is not None:
            return self.fused_kv_projection
        on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in example_inputs)
        return on_cuda and importlib.util.find_spec("triton") is not None

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"rascompile: {message}", stacklevel=3)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, **_: Any) -> Callable:
        if has_symbolic_shapes(gm):
            return PerShapeGraphs(self, gm)
        return self.new_graph(gm, example_inputs)

    def new_graph(self, gm: torch.fx.GraphModule, example_inputs: list) -> RASGraph:
        graph = RASGraph(self, gm, example_inputs)
        self.graphs.append(graph)
        return graph


class PerShapeGraphs:
    """For a graph Dynamo traced with symbolic sizes: one static RASGraph per input shape.

    RAS needs the token count to plan and cache, so each resolution gets its own specialised
    graph, controller and caches, as it would with ``torch.compile(..., dynamic=False)``.
    """

    def __init__(self, backend: RASBackend, gm: torch.fx.GraphModule):
        self.backend = backend
        self.dynamic_gm = gm
        self.by_shape: dict[tuple, Callable] = {}

    def __call__(self, *args):
        key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        graph = self.by_shape.get(key)
        if graph is None:
            try:
                static = specialize_shapes(self.dynamic_gm, list(args))
            except RewriteError as exc:
                self.backend.warn_once(f"this graph runs dense: cannot specialise its dynamic shapes: {exc}")
                graph = self.dynamic_gm.forward
            else:
                graph = self.backend.new_graph(static, list(args))
            self.by_shape[key] = graph
        return graph(*args)


class RASGraph:
    """The callable handed back to Dynamo for one graph."""

    def __init__(self, backend: RASBackend, gm: torch.fx.GraphModule, example_inputs: list):
        self.backend = backend
        self.dense_gm = gm
        self.example_inputs = list(example_inputs)  # the first call's inputs (parameters included), for export
        self.dense_fn: Callable | None = None
        self.variants: dict[int, Callable] = {}
        self.ras_gm: torch.fx.GraphModule | None = None
        self.summary = ""
        self.controller: RASController | None = None
        self.fallback_reason: str | None = None
        if backend.config.sample_ratio >= 1.0:
            self.fallback_reason = "sample_ratio is 1.0"
            return
        try:
            self.ras_gm, ctx = build_ras_graph(
                gm,
                kv_cache=backend.config.kv_cache,
                fuse_kv_projection=backend.fuses_kv_projection(example_inputs),
                dump_dir=backend.dump_graphs,
            )
        except RewriteError as exc:
            self.fallback_reason = str(exc)
            backend.warn_once(f"this graph runs dense: {exc}")
            return
        self.summary = graph_summary(ctx)
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.latents_index = names.index(ctx.latents)
        self.timestep_index = names.index(ctx.timestep) if ctx.timestep else None
        layout = GraphLayout(
            batch_size=ctx.batch_size,
            num_tokens=ctx.num_tokens,
            patch_size=ctx.patch_size,
            output_cache=(ctx.output_cache_shape, ctx.output_cache_dtype),
            kv_caches=tuple((s.shape, s.dtype) for s in ctx.kv_slots),
        )
        device = example_inputs[self.latents_index].device
        self.controller = RASController(backend.config, layout, backend.steps_factory(), device)

    @property
    def compile_count(self) -> int:
        return len(self.variants) + (self.dense_fn is not None)

    def __call__(self, *args):
        if self.controller is None:
            return self._dense(args)
        if torch.is_grad_enabled():
            self.backend.warn_once("grad mode is on: running dense (RAS is for inference; use torch.no_grad())")
            return self._dense(args)
        decision = self.controller.decide(args[self.latents_index], self._timestep(args))
        if decision.kind == "dense":
            return self._dense(args)
        return self.run_active(decision.active_idx, *args)

    def run_dense(self, *args):
        """One dense step with the original graph, bypassing the controller (benchmarks, debugging)."""
        return self._dense(args)

    def run_active(self, active_idx: torch.Tensor, *args):
        """One step over the tokens ``active_idx`` [B, k] with the controller's caches, bypassing its plan."""
        control = self.controller
        if control is None:
            raise RuntimeError(f"this graph has no RAS variant: {self.fallback_reason}")
        control.allocate_caches()
        extra = (active_idx, control.output_cache, *control.kv_caches)
        return self._variant(int(active_idx.shape[1]), args, extra)(*args, *extra)

    def _timestep(self, args):
        return args[self.timestep_index] if self.timestep_index is not None else None

    def _dense(self, args):
        if self.dense_fn is None:
            self.dense_fn = compile_inner(self.backend.inner_backend, self.dense_gm, list(args))
        return self.dense_fn(*args)

    def _variant(self, k: int, args, extra) -> Callable:
        fn = self.variants.get(k)
        if fn is None:
            fn = compile_inner(self.backend.inner_backend, _copy(self.ras_gm), [*args, *extra])
            self.variants[k] = fn
        return fn


def ras_backend(
    gm: torch.fx.GraphModule, example_inputs: list, options: Mapping[str, Any] | None = None, mode: str | None = None
):
    """Entry point for ``torch.compile(model, backend="ras", options={...})``."""
    if mode not in (None, "default"):
        raise ValueError(f"mode={mode!r} is not supported by backend='ras'; pass settings through options instead")
    return RASBackend.from_options(options)(gm, example_inputs)


def scheduler_steps(scheduler, num_inference_steps: int | None = None) -> Callable[[], SchedulerSteps]:
    return lambda: SchedulerSteps(scheduler, num_inference_steps)
