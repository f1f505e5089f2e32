"""RAS across the pieces of one transformer call that graph breaks split (docs/ARCHITECTURE.md, "RAS across the
pieces of one transformer call").

When Dynamo splits a transformer's forward, no graph sees a whole call, so no graph can decide a step. The
transformer's *call scope* (``TransformerScope``) decides instead: an eager wrapper around the transformer's
``forward`` reads the call's latents and timestep, asks the controller for the step's decision and opens a
``PieceCall``; every graph of the call (a ``ScopedPiece``) runs that decision on its own caches; when the forward
returns, the scope merges the output, so the tokens left out of a RAS step take their last noise prediction, as the
paper does, whatever eager code (``proj_out``, unpatchify) ran after the last graph.

A piece takes one of five forms, chosen at its first call inside an open call:

- ``head``: it holds the patch embedding of the latents; it gathers the active tokens after it and hands on
  the image tokens at full width (``passes/scatter_piece_outputs.py``);
- ``through``: its image tokens come in at ``[B, N, C]`` (gathered at entry) and go out at full width, merged into its
  boundary caches, so the Python between pieces sees the dense shapes;
- ``tail``: it holds a projection of its image tokens (the final one, or a token-wise input projection) and merges
  its output with its output cache in the graph; a forward that returns the output of the last piece unchanged
  needs no merge by the scope;
- ``token-free``: no image tokens in: it runs dense (exact);
- ``patchify``: it only cuts the latents into tokens, its patch-embedding linear in the next piece
  (``passes/rules/patchify.py``): it tells the scope how the latents split and runs dense, handing the tokens on
  whole.

A piece may take several ``[B, N, C]`` inputs (a block's residual beside its attention output): each is gathered at
the same rows. Attention that runs eagerly between pieces (Mochi's processor loops over the batch rows in Python)
runs over all tokens of the full-width tensors the pieces hand on: the skipped tokens' inputs to it are those of
their last RAS step.

Never half RAS: a piece that takes image tokens and cannot be rewritten, or an output not shaped like the latents
turns the transformer dense from then on, with a warning that says why. A piece that missed the previous step
(Dynamo compiled it anew) runs its step over all tokens, refreshing its caches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
import threading
import types
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch._C._dynamo.eval_frame import get_eval_frame_callback

from rascompile.passes.find_token_source import carries_piece_tokens
from rascompile.passes.rules.latent_layout import LatentLayout, packed_layout

from .controller import Decision, GraphLayout, RASController
from .graph import StepGraph
from .origin import blocks_compiled_alone

if TYPE_CHECKING:
    from .backend import RASBackend

TIMESTEP_NAMES = ("timestep", "timesteps", "t")


@dataclass
class PieceCall:
    """One call of a split transformer, from the scope's decision until its forward returns."""

    scope: TransformerScope
    controller: RASController
    decision: Decision
    tokens: tuple[int, int]  # (B, N): what a piece's image-token input looks like
    # the tensors the last piece run in its RAS form returned: merged with its caches in the graph already, so a
    # forward that returns one of them needs no merge by the scope
    merged_outputs: tuple = ()
    cached_attentions: int = 0  # K/V caches of the pieces that ran
    pieces_ran: int = 0  # graphs of this transformer that ran in the call (none: the forward ran uncompiled)
    outer: PieceCall | None = None  # the call this one runs inside (another transformer's), restored at its end
    # the full-width image-token tensors pieces handed on so far: where a later piece's joint input keeps them
    handed: list = dataclasses.field(default_factory=list)

    frames: tuple[int, int, int] | None = None  # (B, F, tokens per frame): the patch embedding runs per frame

    def hand_on(self, out: Any) -> None:
        """Remember the ``[B, N, C]`` image-token tensors among a piece's outputs (and the ``[B * F, N / F, C]``
        ones of a per-frame patch embedding)."""
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if carries_piece_tokens(value, self.tokens):
                self.handed.append(value)
            elif self.frames is not None and carries_piece_tokens(
                value, (self.frames[0] * self.frames[1], self.frames[2])
            ):
                self.handed.append(value.unflatten(0, self.frames[:2]).flatten(1, 2))  # frame by frame


class OpenCalls(threading.local):
    """The call under way in this thread, if any (pieces of one call run one after the other in one thread)."""

    call: PieceCall | None = None


@dataclass
class _Head:
    """What a head piece tells its scope: the latents it embeds and how they split into tokens."""

    latent: LatentLayout
    num_tokens: int


class TransformerScope:
    """The calls of one transformer that Dynamo split into pieces: the eager wrapper around its ``forward`` that
    decides each step, opens the call for the pieces, and merges the output."""

    def __init__(self, backend: RASBackend, model: torch.nn.Module):
        self.backend = backend
        self.model = weakref.ref(model)
        self.anchor = next(model.parameters(), None)
        self.broken: str | None = None
        self.param_ids = {id(p) for p in model.parameters()}
        # calls no controller counted yet, per latents shape, with what the step source said of them: the call
        # during which Dynamo compiled the first piece (this scope did not exist yet), and calls at a resolution
        # whose head piece was not compiled yet
        self.missed: dict[tuple[int, ...] | None, list] = {}
        self.started: set[tuple[int, ...]] = set()
        # latents shapes whose patch embedding runs per frame: (B, F, tokens per frame), and whether the first piece
        # that takes the tokens found them frame by frame
        self.frames: dict[tuple[int, ...], tuple[int, int, int]] = {}
        self.frames_checked: set[tuple[int, ...]] = set()
        self.signature = inspect.signature(type(model).forward)
        self._record_installing_call(model)
        self.forced: Decision | None = None  # ``forcing``: the decision of the next calls, instead of the schedule's
        self.eager_attention = False  # a RAS call whose attention ran outside every graph
        self._install(model)

    def _install(self, model: torch.nn.Module) -> None:
        scope = self
        compiled = model.__dict__.get("_compiled_call_impl")
        if compiled is not None:
            # compiled in place (``model.compile``, ``rascompile.apply``): ``Module.__call__`` calls the compiled
            # ``_call_impl``, whose trace may have inlined ``forward`` already, so the scope wraps that call
            def call(*args, **kwargs):
                return scope.run(compiled, args, kwargs)

            model._compiled_call_impl = torch.compiler.disable(call, recursive=False)
            return
        original = model.forward
        # compiled block by block (compile_repeated_blocks): the forward itself always runs uncompiled
        regional = blocks_compiled_alone(model)

        @functools.wraps(original)
        def forward(module, *args, **kwargs):
            if module is not scope.model():
                # a copy of the model (copy.deepcopy rebinds this method to it): its own forward, without RAS
                return type(module).forward(module, *args, **kwargs)
            if not regional and get_eval_frame_callback() in (None, False):
                # the model called directly, not through its torch.compile wrapper: uncompiled, not a RAS step
                return original(*args, **kwargs)
            return scope.run(original, args, kwargs)

        # Dynamo skips this frame and compiles what it calls: the forward runs as it did, the wrapper eagerly
        model.forward = types.MethodType(torch.compiler.disable(forward, recursive=False), model)

    def describe(self) -> str:
        """This transformer's call scope, for ``status``."""
        if self.broken is not None:
            return self.broken
        line = "RAS across the pieces of each call"
        if self.eager_attention:
            line += (
                "; its attention runs eagerly, outside every graph, over all tokens (no K/V cache): RAS saves the "
                "work inside the graphs only"
            )
        return line

    def break_pieces(self, why: str, advice: str | None = None) -> None:
        """Run every later call of this transformer dense, saying why (and what keeps RAS, when known)."""
        if self.broken is None:
            self.broken = f"RAS is off for this transformer: Dynamo split it into pieces and {why}; it runs dense"
            if advice:
                self.broken += f". To keep RAS: {advice}"

    def head_for(self, shape: tuple[int, ...]) -> _Head | None:
        """What a head piece of this transformer's class found for latents of ``shape`` (one graph serves every
        instance of a class, so heads are the backend's, by class)."""
        model = self.model()
        return None if model is None else self.backend.piece_heads.get((type(model), tuple(shape)))

    @contextlib.contextmanager
    def forcing(self, decision: Decision):
        """Run the calls inside with ``decision`` instead of the controller's (tests: a capture step, a permutation
        of all tokens, a subset step on unchanged inputs). The steps are not counted."""
        self.forced = decision
        try:
            yield
        finally:
            self.forced = None

    def takes(self, graph: StepGraph, args) -> bool:
        """Whether this call of ``graph`` (a piece, or a whole graph) is this scope's transformer's: its first
        parameter input is one of the transformer's (a graph without parameters is taken by the open call)."""
        if graph.anchor_index is None:
            return True
        anchor = id(args[graph.anchor_index])
        if anchor not in self.param_ids:
            model = self.model()
            self.param_ids = set() if model is None else {id(p) for p in model.parameters()}  # adapters added since
        return anchor in self.param_ids

    def run(self, original, args: tuple, kwargs: dict):
        """One call of the transformer: the forward (compiled, in pieces) between the eager opening and closing."""
        call = self._open(args, kwargs)
        if call is None:
            return original(*args, **kwargs)
        try:
            out = original(*args, **kwargs)
        except BaseException:
            self._close(call)
            raise
        return self._close(call, out)

    @torch.compiler.disable
    def _open(self, args: tuple, kwargs: dict) -> PieceCall | None:
        """Decide the step and open the call for the pieces; None when the call runs without the scope (dense)."""
        latents, timestep = self._inputs(args, kwargs)
        control = self._controller(latents) if latents is not None else None
        if control is None or self.broken is not None or torch.is_grad_enabled():
            if control is not None:
                control.skip(latents, timestep)
                if self.broken is not None:
                    self.backend.warn_per_generation(control, self.broken)
            elif latents is not None and self.broken is None:
                self._record_missed(latents, timestep)
            return None
        if not control.busy.acquire(blocking=False):
            raise RuntimeError(
                "rascompile: this compiled transformer is already running in another thread; one RAS-compiled "
                "transformer serves one generation at a time. Compile one transformer per thread."
            )
        try:
            control.check_thread(latents, timestep)
            decision = self.forced if self.forced is not None else control.decide(latents, timestep)
        except BaseException:
            control.busy.release()
            raise
        if decision.reason is not None:
            self.backend.warn_once(decision.reason)
        call = PieceCall(self, control, decision, (control.layout.batch_size, control.layout.num_tokens))
        call.frames = self.frames.get(tuple(latents.shape))
        call.outer, self.backend.open_calls.call = self.backend.open_calls.call, call
        return call

    @torch.compiler.disable
    def _close(self, call: PieceCall, out: Any = None) -> Any:
        self.backend.open_calls.call = call.outer
        try:
            return out if out is None else self._merge(call, out)
        finally:
            if self.forced is None:  # a forced decision (tests, benchmarks) keeps the caches for the next one
                call.controller.finish_call(call.decision)
            call.controller.busy.release()

    def _record_installing_call(self, model: torch.nn.Module) -> None:
        """Keep the inputs of the call under way, which this scope cannot open: ``Module._call_impl``'s frame on the
        Python stack holds them as the caller passed them (unknown: counted without them)."""
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "_call_impl" and frame.f_locals.get("self") is model:
                latents, timestep = self._inputs(frame.f_locals.get("args", ()), frame.f_locals.get("kwargs", {}))
                if latents is not None:
                    self._record_missed(latents, timestep)
                    return
            frame = frame.f_back
        self.missed[None] = [None]

    def _record_missed(self, latents: torch.Tensor, timestep: torch.Tensor | None) -> None:
        """Count a call no controller sees in the step source its controller will share, now, while the step source
        (a pipeline's scheduler) still says which step it is."""
        shape = tuple(latents.shape)
        info = self.backend.step_source(self.anchor, ("scope", shape)).advance(latents, timestep)
        self.missed.setdefault(shape, []).append(info)

    def _inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        try:
            bound = self.signature.bind_partial(None, *args, **kwargs).arguments
        except TypeError:
            return None, None
        latents = bound.get("hidden_states")
        if not isinstance(latents, torch.Tensor):
            latents = next((a for a in bound.values() if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        timestep = next((bound[n] for n in TIMESTEP_NAMES if isinstance(bound.get(n), torch.Tensor)), None)
        return latents, timestep

    def _controller(self, latents: torch.Tensor) -> RASController | None:
        """The controller for this resolution, once a head piece or packed latents tell how the latents split into
        tokens; None until then (the call runs dense, and is counted when the controller comes)."""
        shape = tuple(latents.shape)
        head = self.head_for(shape)
        per_frame = self._per_frame_head(shape) if head is None and latents.dim() == 5 else None
        if head is not None:
            latent, num_tokens = head.latent, head.num_tokens
        elif per_frame is not None:
            latent, num_tokens = per_frame
        elif latents.dim() == 3 and latents.is_floating_point():
            latent, num_tokens = packed_layout(shape), shape[1]  # tokens are rows: an eager token-wise embedding
        elif shape not in self.missed:
            return None  # the first call at this resolution: its pieces compile during it, the head among them
        else:
            self.break_pieces(
                f"none of its graphs embeds its {tuple(shape)} latents as tokens (the patch embedding runs eagerly "
                "or per frame), so RAS cannot tell which latent elements make up each token"
            )
            self.backend.warn_once(self.broken)
            return None
        layout = GraphLayout(
            batch_size=shape[0],
            num_tokens=num_tokens,
            patch_size=latent.spatial_patch,
            output_cache=((shape[0], num_tokens, 1), torch.float32),
            kv_caches=(),
            latent_layout=latent.kind,
            latent=latent,
        )
        control = self.backend.controller(self.anchor, ("scope", shape), layout, latents.device)
        if shape not in self.started:
            self.started.add(shape)
            for info in self.missed.pop(None, []) + self.missed.pop(shape, []):
                control.count_missed_call(info)
        return control

    def _per_frame_head(self, shape: tuple[int, ...]) -> tuple[LatentLayout, int] | None:
        """Video latents whose patch embedding runs per frame (Mochi: ``[B, C, F, H, W]`` permuted to
        ``[B * F, C, H, W]`` eagerly, a head piece over those): the video layout with patches ``(1, p, p)``, frame
        by frame, when one reading of the latents has such a head. The first piece that takes the tokens checks that
        they come frame by frame (``PieceCall.frames``)."""
        found = []
        for channel_axis, frame_axis in ((1, 2), (2, 1)):
            batch, frames = shape[0], shape[frame_axis]
            head = self.head_for((batch * frames, shape[channel_axis], shape[3], shape[4]))
            if head is not None and head.latent.kind == "image":
                layout = LatentLayout("video", shape, channel_axis, (frame_axis, 3, 4), (1, *head.latent.patch))
                found.append((layout, frames * head.num_tokens, (batch, frames, head.num_tokens)))
        if len(found) != 1:
            return None
        layout, num_tokens, frames = found[0]
        self.frames.setdefault(shape, frames)
        return layout, num_tokens

    def _merge(self, call: PieceCall, out: Any) -> Any:
        """The forward's output with the tokens left out of a RAS step taking their cached noise prediction."""
        decision = call.decision
        if decision.kind == "dense":
            return out
        if call.pieces_ran == 0:
            # the forward ran uncompiled (called directly, not through Dynamo): a dense result, and no cache
            # was written, so the next step that plans RAS refills them first
            call.controller.last_step = -1
            return out
        if call.cached_attentions == 0:
            self.eager_attention = True  # Mochi: said by ``status``
        sample = _sample_of(out)
        if any(sample is merged for merged in call.merged_outputs):
            return out
        rows = _token_rows(sample, call.controller.layout.latent)
        if rows is None:
            self.break_pieces(
                f"its output {tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample).__name__} is "
                "not shaped like its latents, so the tokens left out of a step cannot take their last prediction"
            )
            return out
        tokens, view = rows
        layout = dataclasses.replace(call.controller.layout, output_cache=(tuple(tokens.shape), tokens.dtype))
        cache = call.controller.caches(decision.branch, layout, piece="output")[0]
        if decision.kind == "capture":
            cache.copy_(tokens)
            return out
        index = decision.active_idx[:, :, None].expand(-1, -1, tokens.shape[2])
        cache.scatter_(1, index, tokens.gather(1, index))
        return _with_sample(out, view(cache.clone()))


def _sample_of(out: Any) -> Any:
    if isinstance(out, tuple):
        return out[0]
    return getattr(out, "sample", out)


def _with_sample(out: Any, sample: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (sample, *out[1:])
    if isinstance(out, torch.Tensor):
        return sample
    out.sample = sample
    return out


def _token_rows(x: Any, latent: LatentLayout):
    """``x`` (shaped like the latents, channels aside) as ``[B, N, E]`` rows in token order, and the inverse view;
    None when ``x`` is not in the latents' layout."""
    if not isinstance(x, torch.Tensor) or x.dim() != len(latent.shape) or x.shape[0] != latent.shape[0]:
        return None
    if any(x.shape[a] != latent.shape[a] for a in latent.grid_axes):
        return None
    split, order = latent.token_blocks(tuple(x.shape))
    blocked = x.reshape(split).permute(order)
    permuted_shape = blocked.shape
    inverse = [order.index(i) for i in range(len(order))]

    def view(rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(permuted_shape).permute(inverse).reshape(x.shape).contiguous()

    return blocked.reshape(x.shape[0], latent.num_tokens, -1), view
