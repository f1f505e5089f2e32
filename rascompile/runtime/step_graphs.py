"""The callable for one Dynamo graph: ``build_step_graph`` runs the passes and returns a ``RASGraph`` or a
``DenseGraph`` (never raising out of the compile), ``PerShapeGraphs`` does so per input shape for a graph traced with
symbolic sizes. Under context parallelism the ranks decide together (``parallel.any_rank``)."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch._dynamo.convert_frame import compile_lock

from rascompile.passes.context import PassContext, RewriteError
from rascompile.passes.graph_utils import copy_graph_module
from rascompile.passes.pipeline import build_ras_graph
from rascompile.passes.settings import PassSettings
from rascompile.passes.snapshot import graph_summary
from rascompile.passes.specialize_shapes import specialize_shapes
from rascompile.passes.tensorify_scalar_reads import has_scalar_reads, tensorify_scalar_reads

from . import parallel
from .graph import DenseGraph, RASGraph, compile_or_eager
from .origin import PieceCause, blocks_compiled_alone, calling_model, graph_origin, layer_reason, piece_cause
from .scoped_piece import ScopedPiece
from .stacks import advice_for, hooks_on, running_hooks

if TYPE_CHECKING:
    from .backend import RASBackend


class PerShapeGraphs:
    """For a graph Dynamo traced with symbolic sizes: one static RASGraph per input shape.

    RAS needs the token count to plan and cache, so each resolution gets its own specialised
    graph, controller and caches, as it would with ``torch.compile(..., dynamic=False)``. When the graph cannot be
    specialised (it reads a tensor's value into a size, say), the symbolic graph itself runs dense for every shape,
    compiled by the inner backend now, inside Dynamo's call, where a graph with data-dependent values compiles.
    """

    def __init__(self, backend: RASBackend, gm: torch.fx.GraphModule, example_inputs: list):
        self.backend = backend
        self.dynamic_gm = gm
        self.by_shape: dict[tuple, Callable] = {}
        self.dense_fn: Callable | None = None
        try:
            with compile_lock:
                static = specialize_shapes(gm, list(example_inputs))
        except Exception as exc:  # noqa: BLE001 - RewriteError, or a failure inside the pass: run dense
            self.backend.warn_once(
                "this graph runs dense: Dynamo traced it with symbolic sizes (torch.compile(..., dynamic=True), or "
                f"automatic dynamic shapes after a resolution change), which RAS could not specialise ({exc}). "
                "Compile with dynamic=False: RAS compiles one graph per resolution either way (rascompile.apply "
                "does so)"
            )
            self._compile_dense(list(example_inputs))
            return
        first = backend.new_graph(static, list(example_inputs))
        if isinstance(first, DenseGraph):
            # the passes refuse it at one shape: every shape runs the symbolic graph, compiled
            self._compile_dense(list(example_inputs))
        else:
            self.by_shape[_shape_key(example_inputs)] = first

    def _compile_dense(self, example_inputs: list) -> None:
        """The symbolic graph compiled now, inside Dynamo's call (a graph that builds masks with vmap or reads
        tensor values compiles only there), for every shape."""
        self.dense_fn = compile_or_eager(self.backend, self.dynamic_gm, example_inputs, inside_dynamo=True)

    def __call__(self, *args):
        if self.dense_fn is not None:
            return self.dense_fn(*args)
        key = _shape_key(args)
        graph = self.by_shape.get(key)
        if graph is None:
            try:
                with compile_lock:
                    static = specialize_shapes(self.dynamic_gm, list(args))
            except Exception as exc:  # noqa: BLE001 - this shape only; the symbolic graph runs it uncompiled
                self.backend.warn_once(f"this graph runs dense at one resolution: cannot specialise it: {exc}")
                graph = self.dynamic_gm.forward
            else:
                graph = self.backend.new_graph(static, list(args))
            self.by_shape[key] = graph
        return graph(*args)


def _without_scalar_reads(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with ``x * s.item()`` made ``x * s`` (``tensorify_scalar_reads``) for the dense graph too: an inner
    compile at the first call, outside Dynamo's, cannot trace the read. ``gm`` itself when there is none."""
    if not has_scalar_reads(gm):
        return gm
    try:
        return tensorify_scalar_reads(copy_graph_module(gm), PassContext(settings=PassSettings()))
    except Exception:  # noqa: BLE001 - the graph as Dynamo gave it is always right
        return gm


def _as_piece(backend: RASBackend, gm: torch.fx.GraphModule, example_inputs: list, reason: str):
    """``gm`` as a piece of the transformer whose forward called it (``runtime/pieces.py``), or None when no
    diffusers model is on the call stack."""
    try:
        model = calling_model()
        if model is None:
            return None
        backend.scope_of(model)
        return ScopedPiece(backend, type(model), gm, example_inputs, reason)
    except Exception as exc:  # noqa: BLE001 - a bug in the piece runtime must not fail the user's compile
        backend.warn_once(
            f"the piece runtime (graph_pieces=True) failed on a graph ({type(exc).__name__}: {exc}); this transformer "
            "runs dense; please report it"
        )
        return None


def _piece_of_transformer(
    graph: DenseGraph, dynamo_gm: torch.fx.GraphModule
) -> tuple[PieceCause | None, torch.nn.Module | None]:
    """Why ``graph`` (Dynamo's ``dynamo_gm``) is a piece of a transformer, from Dynamo's record of the frame and the
    hooks on the stack, on the graph's code and on the calling model, and that model; None when it is not a piece or
    that cannot be told."""
    try:
        model = calling_model()
        hooks = (*graph.hooks, *running_hooks(), *(hooks_on(model) if model is not None else ()))
        blocks_compiled = None if model is None else blocks_compiled_alone(model)
        origin = graph_origin(dynamo_gm)
        hooks = tuple(dict.fromkeys(hooks))
        return piece_cause(origin, hooks, inside_model=model is not None, blocks_compiled=blocks_compiled), model
    except Exception:  # noqa: BLE001 - explaining a fallback must never fail the user's compile
        return None, None


def _layer_reason(dynamo_gm: torch.fx.GraphModule) -> str | None:
    try:
        return layer_reason(dynamo_gm)
    except Exception:  # noqa: BLE001 - reading Dynamo's record must never fail the user's compile
        return None


def _shape_key(args) -> tuple:
    """The concrete shapes and scalars of a call (Dynamo's example inputs carry SymInts: their hints)."""

    def concrete(x):
        return x.node.hint if isinstance(x, torch.SymInt) else x

    return tuple(tuple(concrete(s) for s in a.shape) if isinstance(a, torch.Tensor) else concrete(a) for a in args)


def build_step_graph(backend: RASBackend, gm: torch.fx.GraphModule, example_inputs: list) -> RASGraph | DenseGraph:
    """The callable for one Dynamo graph, fully formed: the passes run first, then either a ``RASGraph`` (the
    rewritten graph, its signature and controller) or, when RAS is off or the rewrite does not apply, a
    ``DenseGraph``. Never raises out of the compile: a graph the passes cannot rewrite, or any failure inside
    them, runs dense with one warning."""
    dynamo_gm, gm = gm, _without_scalar_reads(gm)
    if backend.config.sample_ratio >= 1.0:
        return DenseGraph(backend, gm, example_inputs, "sample_ratio is 1.0", split=False)
    group, reason = parallel.graph_group(gm), None
    try:
        layer = _layer_reason(dynamo_gm)
        if layer is not None:
            raise RewriteError(layer)
        unsupported = parallel.unsupported_reason(calling_model()) if group is not None else None
        if unsupported is not None:
            raise RewriteError(unsupported)
        ras_gm, signature, ctx = build_ras_graph(gm, **backend.pass_options(example_inputs))
    except RewriteError as exc:
        reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - a bug in the passes must not fail the user's compile
        reason = f"internal error in the RAS passes ({type(exc).__name__}: {exc}); please report it"
    if group is not None and parallel.any_rank(reason is not None, group) and reason is None:
        reason = "context parallelism: another rank cannot rewrite its graph, so every rank runs dense"
    if reason is None:
        return RASGraph(backend, gm, example_inputs, ras_gm, signature, graph_summary(ctx))
    piece = _as_piece(backend, gm, example_inputs, reason) if backend.config.graph_pieces else None
    if piece is not None:
        piece.compile_now()
        return piece
    graph = DenseGraph(backend, gm, example_inputs, reason)
    piece, model = _piece_of_transformer(graph, dynamo_gm)
    if piece is not None:
        # every piece of a split transformer is refused; one warning per cause says why, in the user's words
        graph.fallback_reason = f"{piece.cause} (this piece: {reason})"
        message = (
            f"RAS is off for this transformer: {piece.cause}; it runs dense. To keep RAS: {piece.advice}"
            if piece.named
            # a bare graph break: other pieces (one holding the whole body, say) may still run RAS
            else f"this graph runs dense: {piece.cause}, and the passes cannot rewrite this piece on its own "
            f"({reason}). To keep RAS: {piece.advice}"
        )
        backend.warn_piece(model, message, named=piece.named)
        if piece.named and model is not None:
            graph.repeat_warning = (weakref.ref(model), message)
        graph.compile_now()
        return graph
    if graph.hooks:
        reason = (
            f"{' and '.join(graph.hooks)} shaped this graph, which RAS cannot rewrite ({reason}). "
            f"To keep RAS: {advice_for(graph.hooks)}"
        )
    # every new graph says why (a second pipeline with the same options gets its own warning); Python's warning
    # filter still shows one text once per place by default
    warnings.warn(f"rascompile: this graph runs dense: {reason}", stacklevel=2)
    graph.compile_now()
    return graph
