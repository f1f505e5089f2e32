"""The ``ras`` Dynamo backend: rewrite the graph once, compile variants lazily, dispatch per step.

``torch.compile(transformer, backend="ras", options={...})`` calls ``ras_backend`` with the
Dynamo graph of the whole transformer. The backend builds the RAS step graph with the passes
in ``rascompile.passes`` and returns a ``RASGraph``: a callable that asks its controller for
each step's decision and runs the matching compiled graph. Graphs are compiled with the inner
backend on first use: the original dense graph, and the RAS graph once per distinct active
token count (the dense steps that fill the caches run it with k = N).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._dynamo.convert_frame import compile_lock

from rascompile.passes import RewriteError, build_ras_graph, graph_summary
from rascompile.passes import copy_graph_module as _copy
from rascompile.passes.specialize_shapes import has_symbolic_shapes, specialize_shapes

from ..config import RASConfig
from .controller import GraphLayout, RASController
from .schedule import build_schedule
from .steps import SchedulerSteps, TimestepSteps

INNER_BACKENDS = ("inductor", "aot_eager", "eager")
BACKEND_OPTIONS = ("inner_backend", "dump_graphs", "fused_kv_projection")


def compile_inner(name: str, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
    """Compile ``gm`` with the inner backend. Holds Dynamo's compile lock: the inner compile traces with
    process-wide state (AOT autograd, fake modes) that another thread's Dynamo compile also uses."""
    with compile_lock:
        return _compile_inner(name, gm, example_inputs)


def _compile_inner(name: str, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
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
        if config is not None and not isinstance(config, RASConfig):
            hint = " (for a dict of options use RASBackend.from_options(...))" if isinstance(config, Mapping) else ""
            raise TypeError(f"RASBackend(config=...) must be a RASConfig or None, got {type(config).__name__}{hint}")
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
        self.dump_graphs = _checked_dump_dir(dump_graphs)
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
        # One step source per latents placeholder and shape, shared by every graph of this transformer at that
        # resolution (the grad-mode graph Dynamo compiles beside the inference one counts steps there too).
        self._per_transformer = _ByTensor()  # controllers and step sources of each transformer instance
        self._unanchored: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def controller(self, anchor: torch.Tensor | None, latents_key: tuple, layout: GraphLayout, device) -> RASController:
        """The controller of one transformer instance (found by its first parameter, ``anchor``) at one
        resolution. Every graph of this backend with that layout drives it, so an instance keeps its caches and
        its step count whichever of Dynamo's graphs serves a call; its graphs at that resolution share one step
        source (the grad-mode graph counts steps there too)."""
        with self._lock:
            table = self._unanchored if anchor is None else self._per_transformer.setdefault(anchor, dict)
            steps = table.get(("steps", latents_key))
            if steps is None:
                steps = table[("steps", latents_key)] = self.steps_factory()
            # one controller per resolution: graphs that differ only in their caches' shapes (the branches of
            # per-branch guidance with prompts of different lengths) share its steps and selections
            key = ("controller", latents_key, dataclasses.replace(layout, output_cache=None, kv_caches=None))
            if key not in table:
                table[key] = RASController(self.config, layout, steps, device)
            return table[key]

    def controllers_of(self, module: torch.nn.Module) -> list[RASController]:
        """The controllers that ran ``module`` (a transformer, or its ``torch.compile`` wrapper): one per
        resolution and graph layout, for inspection (``history``, ``step_counts``, ``branch_caches``)."""
        module = getattr(module, "_orig_mod", module)
        params = {id(p) for p in module.parameters()}
        tables = [table for key, table in self._per_transformer.items() if key in params]
        return [c for table in tables for key, c in table.items() if key[0] == "controller"]

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
        self._warn_at_recompile_limit()
        if has_symbolic_shapes(gm):
            return PerShapeGraphs(self, gm)
        return self.new_graph(gm, example_inputs)

    def new_graph(self, gm: torch.fx.GraphModule, example_inputs: list) -> RASGraph:
        with compile_lock:
            graph = RASGraph(self, gm, example_inputs)
        with self._lock:
            self.graphs.append(graph)
        return graph

    def _warn_at_recompile_limit(self) -> None:
        """Dynamo compiles a function at most ``recompile_limit`` times (one graph per resolution with
        ``dynamic=False``) and runs it uncompiled after that: without RAS, and without a word from rascompile."""
        compile_id = torch._guards.CompileContext.current_compile_id()
        limit = torch._dynamo.config.recompile_limit
        count = None if compile_id is None or compile_id.frame_compile_id is None else compile_id.frame_compile_id + 1
        if count is not None and count >= limit:
            self.warn_once(
                f"Dynamo has compiled this transformer {count} times, torch._dynamo.config.recompile_limit={limit}: "
                "further input shapes (resolutions, batch sizes) or grad-mode changes run uncompiled, without RAS. "
                "Raise it before compiling, e.g. torch._dynamo.config.recompile_limit = 64"
            )


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
                with compile_lock:
                    static = specialize_shapes(self.dynamic_gm, list(args))
            except Exception as exc:  # noqa: BLE001 - RewriteError, or a failure inside the pass: run dense
                self.backend.warn_once(f"this graph runs dense: cannot specialise its dynamic shapes: {exc}")
                graph = self.dynamic_gm.forward
            else:
                graph = self.backend.new_graph(static, list(args))
            self.by_shape[key] = graph
        return graph(*args)


class RASGraph:
    """The callable handed back to Dynamo for one graph.

    Never raises out of the compile: a graph the passes cannot rewrite, or any failure inside them, runs dense
    with one warning. Dynamo hands one graph the calls of every instance of a transformer class compiled with
    the same options (their parameters are graph inputs), so each instance gets its own controller and caches,
    found by its first parameter. A controller serves one generation at a time: calls from two threads at once,
    or a call from another thread in the middle of a generation, raise a ``RuntimeError`` instead of mixing
    caches.
    """

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
        self.anchor_index: int | None = None
        self._planned = False
        if backend.config.sample_ratio >= 1.0:
            self.fallback_reason = "sample_ratio is 1.0"
            return
        try:
            self._build(gm, example_inputs)
        except RewriteError as exc:
            self._fall_back(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in the passes must not fail the user's compile
            self._fall_back(f"internal error in the RAS passes ({type(exc).__name__}: {exc}); please report it")

    def _fall_back(self, reason: str) -> None:
        self.ras_gm, self.controller, self.summary = None, None, ""
        self.fallback_reason = reason
        self.backend.warn_once(f"this graph runs dense: {reason}")
        # compiled now, inside Dynamo's call: graphs with data-dependent sizes (``.tolist()`` under
        # ``capture_scalar_outputs``) need its tracing context, which a first-call compile would not have
        try:
            self.dense_fn = compile_inner(self.backend.inner_backend, self.dense_gm, self.example_inputs)
        except Exception:  # noqa: BLE001 - compiled again at the first call, where the error surfaces as usual
            self.dense_fn = None

    def _build(self, gm: torch.fx.GraphModule, example_inputs: list) -> None:
        backend = self.backend
        ras_gm, ctx = build_ras_graph(
            gm,
            kv_cache=backend.config.kv_cache,
            fuse_kv_projection=backend.fuses_kv_projection(example_inputs),
            dump_dir=backend.dump_graphs,
        )
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        latents_index = names.index(ctx.latents)
        timestep_index = names.index(ctx.timestep) if ctx.timestep else None
        layout = GraphLayout(
            batch_size=ctx.batch_size,
            num_tokens=ctx.num_tokens,
            patch_size=ctx.patch_size,
            output_cache=(ctx.output_cache_shape, ctx.output_cache_dtype),
            kv_caches=tuple((s.shape, s.dtype) for s in ctx.kv_slots),
            latent_layout=ctx.latent_layout,
            latent=ctx.latent,
        )
        self.ras_gm, self.summary = ras_gm, graph_summary(ctx)
        self.latents_index, self.timestep_index = latents_index, timestep_index
        self.layout, self.latents_name = layout, ctx.latents
        self.anchor_index = next((i for i, a in enumerate(example_inputs) if isinstance(a, torch.nn.Parameter)), None)
        self.controller = self.controller_for(example_inputs)

    def _compile_planned(self, example_inputs: list) -> None:
        """Compile, at the first call rather than mid-generation, the graphs the first generation's schedule
        will run: a compile traces with FX, and a trace while another thread enters a module breaks that call."""
        self._planned = True
        control = self.controller
        num_steps = _planned_num_steps(control.steps)
        if num_steps is None:
            return
        try:
            schedule = build_schedule(self.backend.config, num_steps, self.layout.num_tokens)
        except ValueError:
            return  # the first call reports it
        counts = {p.num_active for p in schedule if not p.dense}
        if counts:
            counts.add(self.layout.num_tokens)  # the dense steps that fill the caches
        last_ras = max((p.step for p in schedule if not p.dense), default=-1)
        if any(p.dense and p.step > last_ras for p in schedule):
            self._dense_compiled(example_inputs)
        output_cache, kv_caches = control.caches(0, self.layout)
        for k in sorted(counts):
            index = torch.arange(k, device=control.device).expand(self.layout.batch_size, k).contiguous()
            self._variant(k, example_inputs, (index, output_cache, *kv_caches))

    def _anchor(self, args) -> torch.Tensor | None:
        return args[self.anchor_index] if self.anchor_index is not None else None

    def controller_for(self, args) -> RASController:
        """The controller of the transformer instance whose parameters ``args`` carry."""
        latents = args[self.latents_index]
        key = (self.latents_name, tuple(latents.shape))
        return self.backend.controller(self._anchor(args), key, self.layout, latents.device)

    @property
    def compile_count(self) -> int:
        return len(self.variants) + (self.dense_fn is not None)

    def __call__(self, *args):
        # Dynamo's compile lock is held while a step runs: an inner compile (AOT autograd traces with FX, which
        # patches torch.nn.Module.__call__ for the whole process) must never overlap another thread's step.
        with compile_lock:
            return self._call(args)

    def _call(self, args):
        if self.controller is None:
            return self._dense(args)
        if not self._planned:
            self._compile_planned(list(args))
        control = self.controller_for(args)
        if not control.busy.acquire(blocking=False):
            raise RuntimeError(
                "rascompile: this compiled transformer is already running in another thread; one RAS-compiled "
                "transformer serves one generation at a time. Compile one transformer per thread."
            )
        try:
            return self._step(control, args)
        finally:
            control.busy.release()

    def _step(self, control: RASController, args):
        latents, timestep = args[self.latents_index], self._timestep(args)
        if torch.is_grad_enabled():
            self.backend.warn_once("grad mode is on: running dense (RAS is for inference; use torch.no_grad())")
            control.skip(latents, timestep)
            return self._dense(args)
        control.check_thread(latents, timestep)
        decision = control.decide(latents, timestep)
        if decision.reason is not None:
            self.backend.warn_once(decision.reason)
        if decision.kind == "dense":
            return self._dense(args)
        return self._run_active(control, decision.active_idx, args, decision.branch)

    def run_dense(self, *args):
        """One dense step with the original graph, bypassing the controller (benchmarks, debugging)."""
        return self._dense(args)

    def run_active(self, active_idx: torch.Tensor, *args):
        """One step over the tokens ``active_idx`` [B, k] with the controller's caches, bypassing its plan."""
        if self.controller is None:
            raise RuntimeError(f"this graph has no RAS variant: {self.fallback_reason}")
        return self._run_active(self.controller_for(args), active_idx, args)

    def _run_active(self, control: RASController, active_idx: torch.Tensor, args, branch: int = 0):
        output_cache, kv_caches = control.caches(branch, self.layout)
        extra = (active_idx, output_cache, *kv_caches)
        return self._variant(int(active_idx.shape[1]), args, extra)(*args, *extra)

    def _timestep(self, args):
        return args[self.timestep_index] if self.timestep_index is not None else None

    def _dense(self, args):
        return self._dense_compiled(args)(*args)

    def _dense_compiled(self, args) -> Callable:
        if self.dense_fn is None:
            self.dense_fn = compile_inner(self.backend.inner_backend, self.dense_gm, list(args))
        return self.dense_fn

    def _variant(self, k: int, args, extra) -> Callable:
        fn = self.variants.get(k)
        if fn is None:
            fn = compile_inner(self.backend.inner_backend, _copy(self.ras_gm), [*args, *extra])
            self.variants[k] = fn
        return fn


def _planned_num_steps(steps) -> int | None:
    """T of the coming generation when the step source knows it before the first call."""
    if isinstance(steps, TimestepSteps):
        return steps.num_steps
    if isinstance(steps, SchedulerSteps):
        timesteps = getattr(steps.scheduler, "timesteps", None)
        return len(timesteps) if timesteps is not None and len(timesteps) else None
    return None


class _ByTensor:
    """A map from tensors, by identity, that forgets a tensor's entry when the tensor is freed (a
    ``WeakKeyDictionary`` would compare tensors with ``==``)."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}
        self._lock = threading.Lock()

    def get(self, tensor: torch.Tensor) -> Any:
        entry = self._entries.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def setdefault(self, tensor: torch.Tensor, make: Callable[[], Any]) -> Any:
        with self._lock:
            found = self.get(tensor)
            if found is None:
                key = id(tensor)
                found = make()
                self._entries[key] = (weakref.ref(tensor, lambda _, key=key: self._entries.pop(key, None)), found)
            return found

    def items(self) -> list[tuple[int, Any]]:
        """``(id of the tensor, value)`` for the tensors still alive."""
        return [(key, value) for key, (ref, value) in list(self._entries.items()) if ref() is not None]


def _checked_dump_dir(dump_graphs: Any) -> str | None:
    """``dump_graphs`` as a directory path that exists and is writable, checked when the backend is made."""
    if dump_graphs is None:
        return None
    if isinstance(dump_graphs, bool) or not isinstance(dump_graphs, (str, os.PathLike)):
        raise TypeError(
            f"dump_graphs={dump_graphs!r} is invalid: must be None or a directory path (str or os.PathLike), "
            f"got {type(dump_graphs).__name__}"
        )
    path = Path(dump_graphs)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"dump_graphs={str(path)!r} is invalid: cannot create the directory ({exc})") from exc
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"dump_graphs={str(path)!r} is invalid: not a writable directory")
    return str(path)


def ras_backend(
    gm: torch.fx.GraphModule, example_inputs: list, options: Mapping[str, Any] | None = None, mode: str | None = None
):
    """Entry point for ``torch.compile(model, backend="ras", options={...})``.

    Dynamo calls it once per graph (each resolution, the grad-mode graph, ...) and treats compiles with equal
    options as one backend (it hands one graph the calls of every instance compiled with them). Those graphs
    share one ``RASBackend``, so the graphs of one transformer count its denoising steps together.
    """
    if mode not in (None, "default"):
        raise ValueError(f"mode={mode!r} is not supported by backend='ras'; pass settings through options instead")
    key = repr(sorted((str(k), repr(v)) for k, v in (options or {}).items()))
    backend = _SHARED_BACKENDS.get(key)
    if backend is None:
        backend = RASBackend.from_options(options)
        _SHARED_BACKENDS[key] = backend
    return backend(gm, example_inputs)


def controllers_of(module: torch.nn.Module) -> list[RASController]:
    """The controllers that ran ``module`` through ``torch.compile(..., backend="ras")`` (see
    ``RASBackend.controllers_of``; for ``rascompile.apply`` ask the backend it returns)."""
    return [c for backend in list(_SHARED_BACKENDS.values()) for c in backend.controllers_of(module)]


# The backends of ``backend="ras"`` compiles, by their options. Weak: an entry lives as long as Dynamo keeps a
# graph of that backend; the per-generation state lives in the graphs' controllers.
_SHARED_BACKENDS: weakref.WeakValueDictionary[str, RASBackend] = weakref.WeakValueDictionary()


def scheduler_steps(scheduler, num_inference_steps: int | None = None) -> Callable[[], SchedulerSteps]:
    return lambda: SchedulerSteps(scheduler, num_inference_steps)
