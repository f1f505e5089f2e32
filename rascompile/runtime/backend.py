"""The ``ras`` Dynamo backend: rewrite the graph once, compile variants lazily, dispatch per step.

``torch.compile(transformer, backend="ras", options={...})`` calls ``ras_backend`` with the
Dynamo graph of the whole transformer. The backend builds the RAS step graph with the passes
in ``rascompile.passes`` and returns, from ``build_step_graph``, a ``RASGraph``: a callable that
asks its controller for each step's decision and runs the matching compiled graph (or a
``DenseGraph`` when the rewrite does not apply; both in ``rascompile.runtime.graph``). Graphs are
compiled with the inner backend on first use: the original dense graph, and the RAS graph once
per distinct active token count (the dense steps that fill the caches run it with k = N).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
from torch._dynamo.convert_frame import compile_lock

from rascompile.passes.specialize_shapes import has_symbolic_shapes

from ..config import RASConfig
from .controller import GraphLayout, RASController
from .graph import DenseGraph, RASGraph, StepGraph, compile_inner
from .options import BACKEND_OPTIONS, INNER_BACKENDS, checked_dump_dir, checked_mode
from .origin import (
    GenerationWatch,
    calling_model,
    calling_pipeline,
    graph_origin,
    is_submodule_frame,
    piece_cause,
)
from .pieces import OpenCalls, TransformerScope
from .registry import _SHARED_BACKENDS
from .scoped_piece import ScopedPiece
from .stacks import RUNS_WITH, advice_for, hooks_on
from .step_graphs import PerShapeGraphs, build_step_graph
from .steps import TimestepSteps


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
        mode: str | None = None,
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
        self.mode = checked_mode(mode, inner_backend)
        self.fused_kv_projection = fused_kv_projection
        self.config = config if config is not None else RASConfig()
        self.inner_backend = inner_backend
        self.dump_graphs = checked_dump_dir(dump_graphs)
        if steps_factory is None:
            if self.config.num_inference_steps is None:
                raise ValueError(
                    "RASConfig.num_inference_steps=None is invalid for backend='ras': give the pipeline's step "
                    "count in options (e.g. options={'num_inference_steps': 28}), or use rascompile.apply(pipe)"
                )
            steps_factory = lambda: TimestepSteps(self.config.num_inference_steps)  # noqa: E731
        self.steps_factory = steps_factory
        self.graphs: list[RASGraph | DenseGraph] = []
        self._warned: set[str] = set()
        # per transformer (or this backend, when the transformer is unknown): the piece warnings said so far
        self._pieces_said: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._piece_generations: weakref.WeakKeyDictionary[Any, GenerationWatch] = weakref.WeakKeyDictionary()
        # One step source per latents placeholder and shape, shared by every graph of this transformer at that
        # resolution (the grad-mode graph Dynamo compiles beside the inference one counts steps there too).
        self._per_transformer = _ByTensor()  # controllers and step sources of each transformer instance
        self._unanchored: dict[tuple, Any] = {}
        self._lock = threading.RLock()  # re-entered: a scope made under it counts a call in a step source
        self.open_calls = OpenCalls()  # the call of a transformer split into pieces under way, per thread
        self._scopes: weakref.WeakKeyDictionary[torch.nn.Module, TransformerScope] = weakref.WeakKeyDictionary()
        self.piece_heads: dict[tuple[type, tuple[int, ...]], Any] = {}  # (transformer class, latents shape): head

    def controller(self, anchor: torch.Tensor | None, latents_key: tuple, layout: GraphLayout, device) -> RASController:
        """The controller of one transformer instance (found by its first parameter, ``anchor``) at one
        resolution. Every graph of this backend with that layout drives it, so an instance keeps its caches and
        its step count whichever of Dynamo's graphs serves a call; its graphs at that resolution share one step
        source (the grad-mode graph counts steps there too)."""
        steps = self.step_source(anchor, latents_key)
        with self._lock:
            table = self._unanchored if anchor is None else self._per_transformer.setdefault(anchor, dict)
            # one controller per resolution: graphs that differ only in their caches' shapes (the branches of
            # per-branch guidance with prompts of different lengths) share its steps and selections
            key = ("controller", latents_key, dataclasses.replace(layout, output_cache=None, kv_caches=None))
            if key not in table:
                table[key] = RASController(self.config, layout, steps, device)
            return table[key]

    def step_source(self, anchor: torch.Tensor | None, latents_key: tuple):
        """The step source the controllers of one transformer instance at one resolution share (a call can be
        counted there before its controller exists: ``TransformerScope``)."""
        with self._lock:
            table = self._unanchored if anchor is None else self._per_transformer.setdefault(anchor, dict)
            steps = table.get(("steps", latents_key))
            if steps is None:
                steps = table[("steps", latents_key)] = self.steps_factory()
            return steps

    def controllers_of(self, module: torch.nn.Module) -> list[RASController]:
        """The controllers that ran ``module`` (a transformer, or its ``torch.compile`` wrapper): one per
        resolution and graph layout, for inspection (``history``, ``step_counts``, ``branch_caches``)."""
        module = getattr(module, "_orig_mod", module)
        params = {id(p) for p in module.parameters()}
        return _controllers_in(table for key, table in self._per_transformer.items() if key in params)

    def release(self, module: torch.nn.Module | None = None) -> int:
        """Free the caches of every controller of this backend (those that ran ``module`` only, when given) now;
        returns the bytes freed. Their next generation allocates them again."""
        controllers = self.controllers_of(module) if module is not None else self._all_controllers()
        freed = 0
        for control in controllers:
            freed += control.cache_bytes
            control.release()
        return freed

    def status(self, module: torch.nn.Module | None = None) -> str:
        """Where RAS stands, one line per graph this backend compiled (those of ``module`` only, when given) and
        one per controller: whether the graph runs RAS or dense and why, in the user's words, and how the last
        generation ran. The warnings say the same as it happens; this says it whenever asked."""
        params = None
        if module is not None:
            params = {id(p) for p in getattr(module, "_orig_mod", module).parameters()}
        with self._lock:
            graphs = [g for g in self.graphs if params is None or g.parameter_ids & params]
        lines = []
        if module is not None and isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
            if getattr(module, "_hf_hook", None) is not None:
                lines.append(
                    "accelerate's offloading hooks wrap this torch.compile wrapper (the pipeline re-installs them "
                    "after each call with enable_model_cpu_offload): later calls run uncompiled, without RAS. "
                    "Compile in place instead: pipe.transformer.compile(backend='ras', options=...), or use "
                    "rascompile.apply(pipe)"
                )
        installed = hooks_on(module) if module is not None else ()
        blocking = tuple(h for h in installed if h not in RUNS_WITH)
        if blocking:
            lines.append(f"hooks on this transformer: {', '.join(blocking)} (to keep RAS: {advice_for(blocking)})")
        lines += [f"{hook} on this transformer: {RUNS_WITH[hook]}" for hook in installed if hook in RUNS_WITH]
        scope = self._scopes.get(getattr(module, "_orig_mod", module)) if module is not None else None
        if scope is not None:
            lines.append(f"call scope: {scope.describe()}")
        for i, graph in enumerate(graphs):
            lines.append(f"graph {i}: {_graph_status(self, graph)}")
        controllers = self.controllers_of(module) if module is not None else self._all_controllers()
        for control in controllers:
            kinds = [d.kind for d in control.history]
            counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("ras", "capture", "dense"))
            held = control.held_tokens.numel() if control.held_tokens is not None else 0
            lines.append(
                f"controller ({control.layout.batch_size} x {control.layout.num_tokens} tokens): "
                f"{control.generations} generation(s) with a RAS schedule; the last ran {counts} steps"
                + (
                    f"; {held} tokens whose latents never changed (reference images, packed text rows) were never "
                    "selected, their outputs and K/V taken from the dense steps"
                    if held
                    else ""
                )
            )
        return "\n".join(lines) if lines else "no graph compiled yet"

    def _all_controllers(self) -> list[RASController]:
        return _controllers_in([*(table for _, table in self._per_transformer.items()), self._unanchored])

    def compile_graph(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        """``gm`` compiled with this backend's inner backend and mode."""
        return compile_inner(self.inner_backend, gm, example_inputs, self.mode)

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

    def pass_options(self, example_inputs: list) -> dict:
        """What ``build_ras_graph`` takes from the backend for a graph with ``example_inputs``."""
        return dict(
            kv_cache=self.config.kv_cache,
            kv_cache_dtype=self.config.kv_cache_dtype,
            fuse_kv_projection=self.fuses_kv_projection(example_inputs),
            dump_dir=self.dump_graphs,
        )

    def scope_of(self, model: torch.nn.Module) -> TransformerScope:
        """The call scope of a transformer that Dynamo split into pieces (``runtime/pieces.py``), installed on its
        first piece."""
        with self._lock:
            scope = self._scopes.get(model)
            if scope is None:
                scope = self._scopes[model] = TransformerScope(self, model)
            return scope

    def adopt_caller(self) -> None:
        """Give the diffusers model on the call stack a call scope if it has none: a piece compiled for another
        instance of its class serves it too (parameters are graph inputs), so no compile installs one for it."""
        model = calling_model()
        if model is not None and model not in self._scopes:
            self.scope_of(model)

    def split_reason(self, graph: RASGraph) -> str | None:
        """Why ``graph`` must run dense because calls of its transformer also run through graphs the passes could not
        rewrite (a hook, offloading or a break splits the model): the controller sees only its own graph's calls,
        so it could neither count those steps nor keep its caches current. None when no such graph exists."""
        with self._lock:
            siblings = [
                g
                for g in self.graphs
                if isinstance(g, (DenseGraph, ScopedPiece))
                and g.counts_as_split
                and g.parameter_ids & graph.parameter_ids
            ]
        if not siblings:
            return None
        hooks = list(dict.fromkeys(h for g in (graph, *siblings) for h in g.hooks))
        cause = (
            f"{' and '.join(hooks)} splits its calls over several graphs"
            if hooks
            else "some of its calls run through another graph (a graph break, a hook, a recompile)"
        )
        return (
            f"RAS is off for this transformer: {cause}, one of which RAS cannot rewrite "
            f"({siblings[0].fallback_reason}), and RAS must see every call of a generation to count its steps and "
            f"keep its caches; it runs dense. To keep RAS: {advice_for(hooks)}"
        )

    def warn_per_generation(self, controller: RASController, message: str) -> None:
        """Warn once per generation of ``controller``'s step source: a user sees, for every image, why it ran
        dense, not only for the first one in the process."""
        self._warn_at_generation(controller, controller.steps.generation, message)

    def _warn_at_generation(self, owner: object, generation: int, message: str) -> None:
        key = f"{id(owner)}:{generation}:{message}"
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"rascompile: {message} (generation {generation})", stacklevel=5)

    def warn_piece(self, model: torch.nn.Module | None, message: str, named: bool) -> None:
        """Warn once per transformer that it is split into pieces. A piece whose cause has no name ("a graph break")
        adds nothing once a piece said what split that transformer: the pieces of one split are many graphs."""
        said = self._pieces_said.setdefault(model if model is not None else self, set())
        if message not in said and (named or not said):
            said.add(message)
            warnings.warn(f"rascompile: {message}", stacklevel=3)

    def warn_piece_per_generation(self, model: torch.nn.Module, message: str) -> None:
        """Say a named piece warning again when ``model`` begins a new generation (read from the calling pipeline's
        scheduler): no graph of a transformer split by a hook counts its steps, and a user must see for every image,
        not once per process, why it ran dense."""
        generation = self._piece_generations.setdefault(model, GenerationWatch()).see(calling_pipeline())
        if generation is not None and generation > 1:
            self._warn_at_generation(model, generation, message)

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(f"rascompile: {message}", stacklevel=3)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, **_: Any) -> Callable:
        self._warn_at_recompile_limit()
        if has_symbolic_shapes(gm):
            return PerShapeGraphs(self, gm, example_inputs)
        return self.new_graph(gm, example_inputs)

    def new_graph(self, gm: torch.fx.GraphModule, example_inputs: list) -> RASGraph | DenseGraph:
        with compile_lock:
            graph = build_step_graph(self, gm, example_inputs)
        with self._lock:
            self.graphs.append(graph)
        return graph

    def _warn_at_recompile_limit(self) -> None:
        """Dynamo compiles a function at most ``recompile_limit`` times (one graph per resolution with
        ``dynamic=False``) and runs it uncompiled after that: without RAS, and without a word from rascompile."""
        compile_id = torch._guards.CompileContext.current_compile_id()
        limit = torch._dynamo.config.recompile_limit
        count = None if compile_id is None or compile_id.frame_compile_id is None else compile_id.frame_compile_id + 1
        if count is None or count < limit:
            return
        origin = graph_origin(None)
        if origin is not None and is_submodule_frame(origin, calling_model() is not None):
            self.warn_once(
                f"Dynamo has compiled {origin.qualname}, a layer of this transformer, {count} times, "
                f"torch._dynamo.config.recompile_limit={limit}: its inputs change shape from call to call (the "
                "tokens a mixture-of-experts router sends to each expert, say), and from now on it runs uncompiled. "
                "Raise the limit before compiling to compile more of its shapes, e.g. "
                "torch._dynamo.config.recompile_limit = 64"
            )
        elif not (len(self._pieces_said) and piece_cause(origin)):
            self.warn_once(
                f"Dynamo has compiled this transformer {count} times, torch._dynamo.config.recompile_limit={limit}: "
                "further input shapes (resolutions, batch sizes) or grad-mode changes run uncompiled, without RAS. "
                "Raise it before compiling, e.g. torch._dynamo.config.recompile_limit = 64"
            )


def _controllers_in(tables) -> list[RASController]:
    """The controllers kept in per-transformer tables (their other entries are step sources)."""
    return [c for table in tables for key, c in table.items() if key[0] == "controller"]


def _graph_status(backend: RASBackend, graph: StepGraph) -> str:
    hooks = f" [through {', '.join(graph.hooks)}]" if graph.hooks else ""
    if isinstance(graph, RASGraph):
        split = backend.split_reason(graph)
        layout = graph.layout
        head = f"RAS over {layout.num_tokens} image tokens, batch {layout.batch_size}"
        return f"{head}, off: {split}{hooks}" if split else f"{head}{hooks}"
    if isinstance(graph, ScopedPiece):
        return f"{graph.describe()}{hooks}"
    return f"dense: {graph.fallback_reason}{hooks}"


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


def ras_backend(
    gm: torch.fx.GraphModule, example_inputs: list, options: Mapping[str, Any] | None = None, mode: str | None = None
):
    """Entry point for ``torch.compile(model, backend="ras", options={...})``.

    Dynamo calls it once per graph (each resolution, the grad-mode graph, ...) and treats compiles with equal
    options as one backend (it hands one graph the calls of every instance compiled with them). Those graphs
    share one ``RASBackend``, so the graphs of one transformer count its denoising steps together.
    """
    if mode is not None:
        # torch.compile refuses mode= together with options=, and backend="ras" needs options (the step count)
        raise ValueError(
            f"torch.compile(..., backend='ras', mode={mode!r}): give the inner backend's mode in options instead, "
            f"options={{'mode': {mode!r}, 'num_inference_steps': ...}} (torch.compile refuses mode= together with "
            "options=), or rascompile.apply(pipe, mode=...)"
        )
    key = repr(sorted((str(k), repr(v)) for k, v in (options or {}).items()))
    backend = _SHARED_BACKENDS.get(key)
    if backend is None:
        backend = RASBackend.from_options(options)
        _SHARED_BACKENDS[key] = backend
    return backend(gm, example_inputs)


__all__ = [
    "BACKEND_OPTIONS",
    "INNER_BACKENDS",
    "DenseGraph",
    "PerShapeGraphs",
    "RASBackend",
    "RASGraph",
    "StepGraph",
    "build_step_graph",
    "compile_inner",
    "ras_backend",
]
