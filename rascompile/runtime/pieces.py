"""RAS across the pieces of one transformer call that a graph break split (docs/ARCHITECTURE.md, "RAS across the
pieces of one transformer call").

The piece that holds the patch embedding (the *head*, a ``HeadPiece``) decides the step as a whole graph does and
opens a ``PieceCall``; every later piece of the call (a ``Piece``) runs the same decision on its own caches: it
gathers the active rows of the image tokens it receives at full width and, unless it holds the final projection,
merges the ones it hands on into its boundary cache (``passes/scatter_piece_outputs.py``), so the Python between
pieces sees the dense shapes. The piece that holds the final projection (the *tail*) closes the call.

Never half RAS within a step: a call the head opens that no tail closes (the last piece ran uncompiled or was
refused), or a piece that takes image tokens and that the passes refuse, makes the head run every later call dense,
with a warning.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .controller import Decision, GraphLayout, RASController
from .graph import RASGraph
from .origin import caller_owners

if TYPE_CHECKING:
    from .backend import RASBackend


@dataclass
class PieceCall:
    """One call of a transformer split into pieces, from its head's decision until its tail."""

    head: HeadPiece
    controller: RASController
    decision: Decision


class OpenCalls(threading.local):
    """The call under way in this thread, if any (pieces of one call run one after the other in one thread)."""

    call: PieceCall | None = None


class HeadPiece(RASGraph):
    """The piece that holds the patch embedding: it decides each step and opens the call for the pieces after it."""

    broken: str | None = None

    def _step(self, control: RASController, args):
        calls = self.backend.open_calls
        if calls.call is not None and calls.call.head is self:
            self.break_pieces("the call before ended without its last piece (the one with the final projection)")
        calls.call = None
        latents, timestep = args[self.latents_index], self._timestep(args)
        if self.broken is not None or torch.is_grad_enabled():
            control.skip(latents, timestep)
            if self.broken is not None:
                self.backend.warn_per_generation(control, self.broken)
            return self._dense(args)
        control.check_thread(latents, timestep)
        decision = control.decide(latents, timestep)
        if decision.reason is not None:
            self.backend.warn_once(decision.reason)
        calls.call = PieceCall(self, control, decision)
        if decision.kind == "dense":
            return self._dense(args)
        return self._run_active(control, decision.active_idx, args, decision.branch)

    def break_pieces(self, why: str) -> None:
        """Run every later call of this transformer dense, saying why."""
        if self.broken is None:
            self.broken = (
                f"RAS is off for this transformer: Dynamo split it into pieces and {why}; every piece runs dense"
            )


class Piece(RASGraph):
    """A piece after the head: it runs the open call's decision on its own caches; the tail closes the call."""

    def __init__(self, backend: RASBackend, gm, example_inputs, ras_gm, signature, summary, tail: bool):
        self.tail = tail
        super().__init__(backend, gm, example_inputs, ras_gm, signature, summary)

    def controller_for(self, args):
        return None  # a piece has no step of its own: it runs its head's

    def _call(self, args):
        calls = self.backend.open_calls
        call = calls.call
        if self.tail:
            calls.call = None
        if call is None or call.decision.kind == "dense" or call.head.broken is not None:
            return self._dense(args)
        decision = call.decision
        # one graph may serve several blocks of a class (their parameters are its inputs): caches per block
        piece = (id(self), id(self._anchor(args)))
        output_cache, kv_caches = call.controller.caches(decision.branch, self.layout, piece=piece)
        bound = self.signature.bind(args, decision.active_idx, output_cache, kv_caches)
        return self._variant(int(decision.active_idx.shape[1]), bound)(*bound)


def called_by_transformer_of(head: HeadPiece, depth: int = 64) -> bool:
    """Whether the frame Dynamo compiles now was called, directly or through layers and hooks, by the forward of
    the module that owns ``head``'s parameters: a later piece of the same transformer, not another model's graph
    compiled while a call of this one was left open."""
    anchor = head.example_inputs[head.anchor_index] if head.anchor_index is not None else None
    if anchor is None:
        return False
    return any(
        isinstance(owner, torch.nn.Module) and any(p is anchor for p in owner.parameters())
        for owner in caller_owners(depth)
    )


def piece_tokens(call: PieceCall | None) -> tuple[int, int] | None:
    """``(B, N)`` of the transformer whose call is under way: what a later piece's image-token input looks like."""
    if call is None:
        return None
    layout: GraphLayout = call.head.layout
    return (layout.batch_size, layout.num_tokens)
