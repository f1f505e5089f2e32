"""The callables the ``ras`` backend hands Dynamo for one graph: ``RASGraph`` or ``DenseGraph``.

``rascompile.runtime.backend.build_step_graph`` runs the passes first and then builds one of them, fully formed:
a ``RASGraph`` (the rewritten graph, its ``StepSignature`` and its controller) when the rewrite applies, a
``DenseGraph`` (the original graph and the reason) when it does not. Both compile their graphs with the inner
backend on first use: the original dense graph, and the RAS graph once per distinct active token count (the
dense steps that fill the caches run it with k = N).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch._dynamo.convert_frame import compile_lock

from rascompile.passes.graph_utils import copy_graph_module as _copy
from rascompile.passes.signature import StepSignature

from .controller import GraphLayout, RASController
from .schedule import build_schedule
from .stacks import stacked_hooks
from .steps import SchedulerSteps, TimestepSteps

if TYPE_CHECKING:
    from .backend import RASBackend


def compile_inner(name: str, gm: torch.fx.GraphModule, example_inputs: list, mode: str | None = None) -> Callable:
    """Compile ``gm`` with the inner backend (inductor with ``mode``'s settings, as ``torch.compile(mode=...)``
    gives them). Holds Dynamo's compile lock: the inner compile traces with process-wide state (AOT autograd, fake
    modes) that another thread's Dynamo compile also uses."""
    with compile_lock:
        return _compile_inner(name, gm, example_inputs, mode)


def _compile_inner(name: str, gm: torch.fx.GraphModule, example_inputs: list, mode: str | None) -> Callable:
    if name == "eager":
        return gm.forward
    if name == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else None)


def compile_or_eager(
    backend: RASBackend, gm: torch.fx.GraphModule, example_inputs: list, *, inside_dynamo: bool = False
) -> Callable:
    """``gm`` compiled with the backend's inner backend or, when that compile fails (outside Dynamo's tracing context
    a graph that reads a tensor's value, ``.item()`` on a LoRA scale say, cannot be traced again), ``gm`` itself, run
    eagerly, with a warning: the user's call still gets the model's output. ``inside_dynamo``: called from Dynamo's
    call of the backend, where Dynamo's own ``RestartAnalysis`` must reach Dynamo (it traces the frame again)."""
    try:
        return backend.compile_graph(gm, example_inputs)
    except Exception as exc:  # noqa: BLE001 - a failed inner compile must not fail the user's call
        if inside_dynamo and isinstance(exc, torch._dynamo.exc.RestartAnalysis):
            raise
        backend.warn_once(
            f"the inner backend {backend.inner_backend!r} failed to compile a graph "
            f"({type(exc).__name__}: {_first_line(exc)}); it runs uncompiled"
        )
        return gm.forward


class StepGraph:
    """What a dense and a RAS graph share: the original graph, compiled on first use, and the call under Dynamo's
    compile lock (an inner compile traces with FX, which patches ``torch.nn.Module.__call__`` for the whole
    process, so it must never overlap another thread's step)."""

    ras_gm: torch.fx.GraphModule | None = None
    signature: StepSignature | None = None
    controller: RASController | None = None
    summary: str = ""
    fallback_reason: str | None = None

    def __init__(self, backend: RASBackend, gm: torch.fx.GraphModule, example_inputs: list):
        self.backend = backend
        self.dense_gm = gm
        self.example_inputs = list(example_inputs)  # the first call's inputs (parameters included), for export
        self.dense_fn: Callable | None = None
        self.variants: dict[int, Callable] = {}
        # the parameters it reads, to tell which graphs belong to one transformer; the hooks its code ran through
        self.parameter_ids = frozenset(id(a) for a in example_inputs if isinstance(a, torch.nn.Parameter))
        self.hooks = stacked_hooks(gm)
        # its first parameter input: which transformer instance a call is for (parameters are graph inputs)
        self.anchor_index = next((i for i, a in enumerate(example_inputs) if isinstance(a, torch.nn.Parameter)), None)
        # in the call scope of a transformer split into pieces: per (controller, branch), the (generation, step) it ran
        self.ran: dict[tuple[int, int], tuple[int, int]] = {}

    @property
    def compile_count(self) -> int:
        return len(self.variants) + (self.dense_fn is not None)

    def __call__(self, *args):
        with compile_lock:
            return self._call(args)

    def _call(self, args):
        return self._dense(args)

    def run_dense(self, *args):
        """One dense step with the original graph, bypassing the controller (benchmarks, debugging)."""
        return self._dense(args)

    def _dense(self, args):
        return self._dense_compiled(args)(*args)

    def _dense_compiled(self, args) -> Callable:
        if self.dense_fn is None:
            self.dense_fn = self._compile_or_eager(self.dense_gm, list(args))
        return self.dense_fn

    def _compile_or_eager(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        return compile_or_eager(self.backend, gm, example_inputs)

    def compile_now(self) -> None:
        """Compile the dense graph now, inside Dynamo's call: graphs with data-dependent sizes (``.tolist()``
        under ``capture_scalar_outputs``) need its tracing context, which a first-call compile would not have."""
        try:
            self.dense_fn = self.backend.compile_graph(self.dense_gm, self.example_inputs)
        except torch._dynamo.exc.RestartAnalysis:
            raise  # Dynamo's own control flow (e.g. scalars made tensors): it traces the frame again
        except Exception:  # noqa: BLE001 - tried again at the first call, which falls back to eager with a warning
            self.dense_fn = None


class DenseGraph(StepGraph):
    """A graph that runs dense: the passes cannot rewrite it (``fallback_reason`` says why), or RAS is off.

    ``counts_as_split``: the passes refused it, so when it shares parameters with a ``RASGraph`` the transformer's
    calls are split over graphs and that ``RASGraph`` runs dense too (``RASBackend.split_reason``)."""

    def __init__(
        self, backend: RASBackend, gm: torch.fx.GraphModule, example_inputs: list, reason: str, split: bool = True
    ):
        super().__init__(backend, gm, example_inputs)
        self.fallback_reason = reason
        self.counts_as_split = split
        self.repeat_warning: tuple | None = None  # (weakref to the model, message): said again per generation

    def _call(self, args):
        if self.repeat_warning is not None:
            model = self.repeat_warning[0]()
            if model is not None:
                self.backend.warn_piece_per_generation(model, self.repeat_warning[1])
        return self._dense(args)

    def run_active(self, active_idx: torch.Tensor, *args):
        raise RuntimeError(f"this graph has no RAS variant: {self.fallback_reason}")


class RASGraph(StepGraph):
    """A graph the passes rewrote: each call asks its controller for the step's decision and runs the dense graph
    or the RAS graph (its inputs bound by ``signature``).

    Dynamo hands one graph the calls of every instance of a transformer class compiled with the same options
    (their parameters are graph inputs), so each instance gets its own controller and caches, found by its first
    parameter. A controller serves one generation at a time: calls from two threads at once, or a call from
    another thread in the middle of a generation, raise a ``RuntimeError`` instead of mixing caches.
    """

    def __init__(
        self,
        backend: RASBackend,
        gm: torch.fx.GraphModule,
        example_inputs: list,
        ras_gm: torch.fx.GraphModule,
        signature: StepSignature,
        summary: str,
    ):
        super().__init__(backend, gm, example_inputs)
        self.ras_gm, self.signature, self.summary = ras_gm, signature, summary
        self.layout = GraphLayout.from_signature(signature)
        self.latents_index, self.timestep_index = signature.latents, signature.timestep
        self.latents_name = signature.latents_name
        self._planned = False
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
        if not counts or control.caches_do_not_fit(sets=0 if control.cache_sets else 1) is not None:
            return  # nothing to compile, or its caches would not fit: the first call says so
        output_cache, kv_caches = control.caches(0, self.layout)
        for k in sorted(counts):
            index = torch.arange(k, device=control.device).expand(self.layout.batch_size, k).contiguous()
            index = self.signature.pad_active(index)
            self._variant(int(index.shape[1]), self.signature.bind(example_inputs, index, output_cache, kv_caches))

    def _anchor(self, args) -> torch.Tensor | None:
        return args[self.anchor_index] if self.anchor_index is not None else None

    def controller_for(self, args) -> RASController:
        """The controller of the transformer instance whose parameters ``args`` carry."""
        latents = self.signature.latents_of(args)
        key = (self.latents_name, tuple(latents.shape))
        return self.backend.controller(self._anchor(args), key, self.layout, latents.device)

    def _call(self, args):
        call = self.backend.open_calls.call
        if call is not None and call.scope.takes(self, args):
            return self._in_piece_call(call, args)
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

    def _in_piece_call(self, call, args):
        """A whole transformer graph called inside the call scope of a transformer Dynamo also split into pieces
        (a hook routes some steps through the whole graph, others through pieces): it runs the scope's decision,
        as a piece holding both the patch embedding and the final projection, so one step source counts them."""
        from .scoped_piece import cached_attentions, run_in_call

        call.cached_attentions += cached_attentions(self.signature)
        call.pieces_ran += 1
        if call.decision.kind == "dense" or call.scope.broken is not None:
            return self._dense(args)
        return run_in_call(self, self, call, args)

    def _step(self, control: RASController, args):
        latents, timestep = self.signature.latents_of(args), self._timestep(args)
        split = self.backend.split_reason(self)
        if split is not None:
            # some calls of this transformer run elsewhere, where the controller cannot count or cache them
            control.skip(latents, timestep)
            self.backend.warn_per_generation(control, split)
            return self._dense(args)
        if torch.is_grad_enabled():
            self.backend.warn_once("grad mode is on: running dense (RAS is for inference; use torch.no_grad())")
            control.skip(latents, timestep)
            return self._dense(args)
        control.check_thread(latents, timestep)
        decision = control.decide(latents, timestep)
        if decision.reason is not None:
            self.backend.warn_once(decision.reason)
        try:
            if decision.kind == "dense":
                return self._dense(args)
            return self._run_active(control, decision.active_idx, args, decision.branch)
        finally:
            control.finish_call(decision)

    def run_active(self, active_idx: torch.Tensor, *args):
        """One step over the tokens ``active_idx`` [B, k] with the controller's caches, bypassing its plan."""
        return self._run_active(self.controller_for(args), active_idx, args)

    def _run_active(self, control: RASController, active_idx: torch.Tensor, args, branch: int = 0):
        caches = control.cache_set(branch, self.layout)
        n = self.layout.num_tokens
        if not caches.filled and active_idx.shape[1] < n:
            # caches allocated since the last step over all tokens hold no rows yet: fill them instead of reading
            active_idx = torch.arange(n, device=active_idx.device).expand(active_idx.shape[0], n).contiguous()
        filled = active_idx.shape[1] == n
        active_idx = self.signature.pad_active(active_idx)
        bound = self.signature.bind(args, active_idx, caches.output, caches.kv)
        out = self._variant(int(active_idx.shape[1]), bound)(*bound)
        caches.filled = caches.filled or filled
        return out

    def _timestep(self, args):
        return args[self.timestep_index] if self.timestep_index is not None else None

    def _variant(self, k: int, bound: tuple) -> Callable:
        """The RAS graph compiled for ``k`` active tokens, with ``bound`` (``signature.bind``) as example inputs."""
        fn = self.variants.get(k)
        if fn is None:
            fn = self._compile_or_eager(_copy(self.ras_gm), list(bound))
            self.variants[k] = fn
        return fn


def _planned_num_steps(steps: Any) -> int | None:
    """T of the coming generation when the step source knows it before the first call."""
    if isinstance(steps, TimestepSteps):
        return steps.num_steps
    if isinstance(steps, SchedulerSteps):
        timesteps = getattr(steps.scheduler, "timesteps", None)
        return len(timesteps) if timesteps is not None and len(timesteps) else None
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
