"""A graph that is a piece of a transformer Dynamo split (``ScopedPiece``): it runs its transformer call's decision
(``pieces.TransformerScope`` makes one per call) on its own caches, rewritten by the passes for a piece (its image
tokens arrive embedded, or inside a joint sequence). See ``pieces`` for the call scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rascompile.passes.context import RewriteError
from rascompile.passes.find_token_source import carries_piece_tokens, is_model_input, stores_tokens_only
from rascompile.passes.graph_utils import example_value, placeholders
from rascompile.passes.pipeline import build_ras_graph
from rascompile.passes.rules.patchify import patchified_latents
from rascompile.passes.snapshot import graph_summary

from .graph import RASGraph, StepGraph
from .pieces import PieceCall, _Head
from .stacks import advice_for, hooks_on

if TYPE_CHECKING:
    from .backend import RASBackend


@dataclass
class _Form:
    kind: str  # "head" | "patchify" | "store" | "through" | "tail" | "token-free"
    graph: RASGraph | None = None
    cached_attentions: int = 0
    joint: tuple[int, int] | None = None  # (input, row): its image tokens arrive inside a joint sequence


class _PieceGraph(RASGraph):
    """The RAS form of a piece: variants per k; the scope's controller drives it."""

    def controller_for(self, args):
        return None


class ScopedPiece(StepGraph):
    """A graph of a split transformer: it runs the open call's decision in the form it has (see the module)."""

    def __init__(self, backend: RASBackend, model_class: type, gm, example_inputs: list, reason: str):
        StepGraph.__init__(self, backend, gm, example_inputs)
        self.model_class = model_class
        self.fallback_reason = reason  # why it is not a whole transformer
        # a whole graph of the same transformer called outside an open call (the scope is broken) must run dense
        self.counts_as_split = True
        self.forms: dict[tuple[int, int], _Form] = {}  # per (B, N)
        self.patchify: int | None = None  # the token count, when it only cuts the latents into tokens
        self.head = self._as_head(gm, example_inputs)

    def _as_head(self, gm, example_inputs) -> _Form | None:
        """The head form, when this piece holds the patch embedding of image or video latents."""
        try:
            ras_gm, signature, ctx = build_ras_graph(
                gm, piece_outputs=True, **self.backend.pass_options(example_inputs)
            )
        except Exception:  # noqa: BLE001 - not a head (or the passes failed): tried as a later piece at its call
            self._as_patchify(gm, example_inputs)
            return None
        if ctx.latent_layout not in ("image", "video"):
            return None  # embedded tokens handed in: the selection must read the latents, not hidden states
        graph = _PieceGraph(self.backend, gm, example_inputs, ras_gm, signature, graph_summary(ctx))
        shape = tuple(example_inputs[signature.latents].shape)
        self.backend.piece_heads.setdefault((self.model_class, shape), _Head(ctx.latent, ctx.num_tokens))
        return _Form("head", graph, cached_attentions(signature))

    def _as_patchify(self, gm, example_inputs) -> None:
        """A piece that only cuts the latents into tokens (its patch-embedding linear sits in the next piece) tells
        the scope how they split: it runs dense, as a token-free piece, and hands its tokens on whole."""
        inputs = [n for n in placeholders(gm) if is_model_input(n)]
        found = patchified_latents(gm, inputs)
        if found is None:
            return
        shape = tuple(int(s) for s in example_value(next(n for n in inputs if n.name == found.latents)).shape)
        self.backend.piece_heads.setdefault((self.model_class, shape), _Head(found.layout, found.num_tokens))
        self.patchify = found.num_tokens

    def describe(self) -> str:
        """This piece's forms per (B, N), for ``status``."""
        if not self.forms:
            return "a piece of a split transformer, not yet run inside a call (graph_pieces=True)"
        forms = ", ".join(f"{form.kind} at {b} x {n} tokens" for (b, n), form in self.forms.items())
        return f"a piece of a split transformer, RAS across its pieces: {forms}"

    @property
    def compile_count(self) -> int:
        return super().compile_count + sum(len(f.graph.variants) for f in self.forms.values() if f.graph is not None)

    def _call(self, args):
        call = self.backend.open_calls.call
        if call is None or not call.scope.takes(self, args):
            if call is None:
                self.backend.adopt_caller()  # another instance of the class, which no compile has seen: scope it
            return self._dense(args)
        form = self._form(call, args)
        call.cached_attentions += form.cached_attentions
        call.pieces_ran += 1
        if form.joint is not None and not _joint_holds_handed(args, form.joint, call):
            call.scope.break_pieces(
                "the image tokens no longer sit where they sat in the joint sequence one of its pieces takes"
            )
        if form.graph is None or call.decision.kind == "dense" or call.scope.broken is not None:
            out = self._dense(args)
        else:
            out = run_in_call(self, form.graph, call, args)
        call.hand_on(out)
        return out

    def _form(self, call: PieceCall, args) -> _Form:
        form = self.forms.get(call.tokens)
        if form is None:
            form = self.forms[call.tokens] = self._classify(call, list(args))
        return form

    def _classify(self, call: PieceCall, args: list) -> _Form:
        if self.head is not None and self.head.graph.layout.num_tokens == call.tokens[1]:
            return self.head
        if self.patchify == call.tokens[1]:
            return _Form("patchify")  # dense: it hands its tokens on whole
        tokens = call.tokens
        token_inputs = [i for i, a in enumerate(args) if _token_input(a, tokens)]
        joint = None if token_inputs else _joint_input(args, call)
        if not token_inputs and joint is None:
            return _Form("token-free")
        if token_inputs and stores_tokens_only(self.dense_gm, token_inputs):
            return _Form("store")  # dense: its tokens go, whole, into another input's storage
        if token_inputs and not _frames_in_order(call, args[token_inputs[0]]):
            call.scope.break_pieces(
                "its per-frame patch embedding's tokens reach its blocks in another order than frame by frame, so "
                "RAS cannot tell which latent elements make up each token"
            )
            return _Form("token-free")
        reasons = []
        for kind, hands_on in (("tail", False), ("through", True)):
            try:
                ras_gm, signature, ctx = build_ras_graph(
                    self.dense_gm,
                    piece_tokens=tokens,
                    piece_outputs=hands_on,
                    piece_joint=joint,
                    **self.backend.pass_options(args),
                )
            except RewriteError as exc:
                reasons.append(str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a bug in the passes must not fail the user's call
                reasons.append(f"the RAS passes failed: {type(exc).__name__}: {exc}")
                break
            graph = _PieceGraph(self.backend, self.dense_gm, args, ras_gm, signature, graph_summary(ctx))
            return _Form(kind, graph, cached_attentions(signature), joint)
        made_by = f", made by {' and '.join(self.hooks)}," if self.hooks else ""
        model = call.scope.model()
        # a layer Dynamo traced alone does not show the hook that split its model: name the model's own hooks
        installed = () if self.hooks or model is None else tuple(hooks_on(model))
        on_model = f" (hooks on this transformer: {', '.join(installed)})" if installed else ""
        call.scope.break_pieces(
            f"a piece{made_by} that takes its image tokens cannot be rewritten ({reasons[-1]}){on_model}",
            advice_for(self.hooks or installed) if self.hooks or installed else None,
        )
        return _Form("token-free")


def _token_input(value: Any, tokens: tuple[int, int]) -> bool:
    return not isinstance(value, torch.nn.Parameter) and carries_piece_tokens(value, tokens)


def _frames_in_order(call: PieceCall, tokens: torch.Tensor) -> bool:
    """For a per-frame patch embedding, checked at the first piece of a shape that takes the tokens: they are the
    per-frame tokens frame by frame (the video layout's token order). True when there is nothing to check."""
    shape = call.controller.layout.latent.shape
    if call.frames is None or shape in call.scope.frames_checked:
        return True
    call.scope.frames_checked.add(shape)
    return any(h.shape == tokens.shape and torch.equal(h, tokens) for h in call.handed)


def _joint_input(args: list, call: PieceCall) -> tuple[int, int] | None:
    """``(input, row)`` when an input ``[B, S, C]`` (S > N) holds, from ``row``, the image tokens an earlier piece of
    this call handed on (Qwen-Image 2.1 writes them into its joint sequence between two pieces)."""
    batch, n = call.tokens
    for position, value in enumerate(args):
        if isinstance(value, torch.nn.Parameter) or not isinstance(value, torch.Tensor):
            continue
        if value.dim() != 3 or not value.is_floating_point() or value.shape[0] != batch or value.shape[1] <= n:
            continue
        for handed in call.handed:
            if handed.shape[2] != value.shape[2] or handed.dtype != value.dtype:
                continue
            for row in range(value.shape[1] - n + 1):
                if torch.equal(value[:, row : row + n], handed):
                    return position, row
    return None


def _joint_holds_handed(args, joint: tuple[int, int], call: PieceCall) -> bool:
    """Whether the joint input still holds, from its row, the image tokens last handed on in this call."""
    position, row = joint
    if not call.handed:
        return False
    value, handed = args[position], call.handed[-1]
    return handed.shape == value[:, row : row + handed.shape[1]].shape and torch.equal(
        value[:, row : row + handed.shape[1]], handed
    )


def run_in_call(owner: StepGraph, graph: RASGraph, call: PieceCall, args):
    """Run ``graph`` (the RAS form of ``owner``) with the open call's decision on its own caches; its outputs are
    merged with its caches in the graph (``PieceCall.merged_outputs``). A graph that did not run the previous step
    of this generation (Dynamo compiled it anew, or a hook skipped it) runs over all tokens, refreshing its
    caches."""
    decision, control = call.decision, call.controller
    key, now = (id(control), decision.branch), (control.steps.generation, decision.step)
    fresh = owner.ran.get(key) == (now[0], now[1] - 1)
    owner.ran[key] = now
    active = decision.active_idx
    if decision.kind == "ras" and not fresh:
        active = torch.arange(call.tokens[1], device=active.device).expand(call.tokens[0], -1).contiguous()
    piece = (id(owner), id(graph._anchor(args)))  # one graph may serve several blocks: caches per block
    output_cache, kv_caches = control.caches(decision.branch, graph.layout, piece=piece)
    bound = graph.signature.bind(args, active, output_cache, kv_caches)
    out = graph._variant(int(active.shape[1]), bound)(*bound)
    call.merged_outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return out


def cached_attentions(signature) -> int:
    """How many K/V caches of attentions over the image tokens a rewritten graph holds (boundary caches aside)."""
    return sum(c.kind in ("key", "value") for c in signature.kv_caches)
