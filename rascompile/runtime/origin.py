"""Where a Dynamo graph came from, when it is a piece of a transformer rather than the whole forward.

RAS rewrites whole transformers. A graph the passes refuse is often a piece: regional compilation
(``compile_repeated_blocks``) compiles one block class at a time, and a graph break (a hook that runs outside the
graph with ``torch.compiler.disable``, as accelerate's sequential offloading does at every layer) splits the forward
into graphs that each hold a few layers. The passes' own reason for such a piece ("no image-token source found") is
true but says nothing a user can act on; this module reads Dynamo's record of the frame it traced and says what
split the transformer, in the user's words.

It reads ``TracingContext.traced_code`` (the code objects of the traced frame, the root frame first) and the graph's
``compile_subgraph_reason`` (why Dynamo ended the graph: a graph break, with its place); both exist only inside
Dynamo's call of the backend.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx

from .stacks import ACCELERATE_HOOKS, SEQUENTIAL_OFFLOAD, advice_for, hook_of_file

_RESUME = "torch_dynamo_resume_in_"


@dataclass(frozen=True)
class GraphOrigin:
    """The root frame Dynamo traced for a graph, and the graph break that ended it or that it resumes after."""

    qualname: str  # of the root frame's code, e.g. "FluxTransformerBlock.forward"
    filename: str
    break_reason: str | None  # why Dynamo broke the graph, when this graph ends at a break
    break_site: str | None  # "file.py:line" of that break

    @property
    def owner(self) -> str | None:
        """The class whose method is the root frame (``FluxTransformerBlock`` for its ``forward``)."""
        parts = self.qualname.split(".")
        return parts[-2] if len(parts) >= 2 and "<locals>" not in parts[-2] else None

    @property
    def resumes_after_break(self) -> bool:
        return self.qualname.rsplit(".", 1)[-1].startswith(_RESUME)


def graph_origin(gm: torch.fx.GraphModule | None) -> GraphOrigin | None:
    """The origin of the graph ``gm`` Dynamo is handing the backend now (without ``gm``: of its root frame only,
    not the break that ended it); None outside Dynamo's call."""
    context = torch._guards.TracingContext.try_get()
    codes = getattr(context, "traced_code", None)
    if not codes:
        return None
    root = codes[0]
    reason = getattr(gm, "compile_subgraph_reason", None) if gm is not None else None
    break_reason = break_site = None
    if reason is not None and getattr(reason, "graph_break", False):
        break_reason = str(reason.reason).strip().splitlines()[0]
        stack = getattr(reason, "user_stack", None) or []
        if stack:
            frame = stack[-1]
            break_site = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
            hook = hook_of_file(frame.filename)
            break_reason = f"{break_reason} ({hook})" if hook else break_reason
    return GraphOrigin(getattr(root, "co_qualname", root.co_name), root.co_filename, break_reason, break_site)


def caller_owners(depth: int | None = None) -> Iterator[object]:
    """The ``self`` of each frame on the Python call stack, nearest first (the first ``depth`` frames, or all)."""
    frame = sys._getframe(1)
    while frame is not None and depth != 0:
        yield frame.f_locals.get("self")
        frame = frame.f_back
        depth = None if depth is None else depth - 1


def calling_model() -> torch.nn.Module | None:
    """The diffusers model whose method is running on the Python call stack now, nearest first: inside Dynamo's
    call of the backend for a piece of a transformer, the transformer itself (its forward called the piece)."""
    from diffusers import ModelMixin

    return next((owner for owner in caller_owners() if isinstance(owner, ModelMixin)), None)


def calling_pipeline() -> object | None:
    """The diffusers pipeline whose method is running on the Python call stack now (its ``__call__``), or None."""
    from diffusers import DiffusionPipeline

    return next((owner for owner in caller_owners() if isinstance(owner, DiffusionPipeline)), None)


class GenerationWatch:
    """A transformer's generations, counted from the calling pipeline's scheduler: its ``step_index`` is None
    exactly during a generation's first step (as ``SchedulerSteps`` tells them), so a call that sees None after one
    that did not begins a new generation."""

    _UNSEEN = object()

    def __init__(self):
        self.count = 0
        self.last: object = self._UNSEEN

    def see(self, pipeline: object | None) -> int | None:
        """The generation of a call made by ``pipeline``; None when there is no pipeline or scheduler to read."""
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is None or not hasattr(scheduler, "step_index"):
            return None
        index = scheduler.step_index
        if index is None and self.last is not None:
            self.count += 1
        self.last = index
        return self.count


def _subclasses(root: type) -> set[type]:
    """``root`` and every class derived from it that is imported so far."""
    found: set[type] = set()
    pending = [root]
    while pending:
        cls = pending.pop()
        if cls not in found:
            found.add(cls)
            pending.extend(cls.__subclasses__())
    return found


def _subclass_names(root: type) -> set[str]:
    return {cls.__name__ for cls in _subclasses(root)}


def is_submodule_frame(origin: GraphOrigin | None, inside_model: bool) -> bool:
    """Whether the root frame is the method of a layer or block (an ``nn.Module`` that is not a diffusers model)
    that a diffusers model's forward called (``inside_model``): Dynamo traces such a frame on its own only after a
    graph break in its caller, or when the layer alone was compiled. Either way the graph is not a whole
    transformer."""
    from diffusers import ModelMixin

    owner = origin.owner if origin is not None else None
    if owner is None or not inside_model:
        return False
    return owner in _subclass_names(torch.nn.Module) and owner not in _subclass_names(ModelMixin)


def layer_reason(gm: torch.fx.GraphModule | None) -> str | None:
    """Why the graph Dynamo hands the backend now is a layer of a diffusers model, not a whole transformer (its root
    frame is the method of a block or layer that the model's forward called: Dynamo traced it alone after a graph
    break in its caller, or the layer was compiled on its own); None when it is not, or outside Dynamo's call. The
    passes can mistake such a layer for a transformer of packed latents (a block takes and returns ``[B, N, C]``)."""
    origin = graph_origin(gm)
    model = calling_model()
    if not is_submodule_frame(origin, model is not None):
        return None
    return (
        f"this graph is {origin.qualname}, a layer of {type(model).__name__}, not the whole transformer (RAS gathers "
        "the image tokens at the transformer's input and merges them at its output)"
    )


def repeated_block_classes() -> set[str]:
    """The block classes diffusers' ``compile_repeated_blocks`` compiles one at a time (the ``_repeated_blocks`` of
    every model class imported so far)."""
    from diffusers import ModelMixin

    return {name for cls in _subclasses(ModelMixin) for name in getattr(cls, "_repeated_blocks", None) or ()}


def blocks_compiled_alone(model: torch.nn.Module) -> bool:
    """Whether a submodule of ``model`` was compiled on its own (``compile_repeated_blocks`` calls ``.compile()`` on
    each block), so ``model``'s forward itself runs uncompiled."""
    return any(m.__dict__.get("_compiled_call_impl") is not None for m in model.modules() if m is not model)


PIECES_ADVICE = "or set graph_pieces=True (experimental) to run RAS across the pieces"
REGIONAL_ADVICE = (
    "compile the whole transformer instead: torch.compile(pipe.transformer, backend='ras') or rascompile.apply(pipe); "
    + PIECES_ADVICE
)
GRAPH_BREAK_ADVICE = (
    "remove what breaks the graph (TORCH_LOGS=graph_breaks lists each break), or compile with fullgraph=True to see "
    "the first one as an error; " + PIECES_ADVICE
)


@dataclass(frozen=True)
class PieceCause:
    """Why a graph is a piece of a transformer, and what keeps RAS, in the user's words. ``named``: the cause is a
    particular thing the user did (regional compilation, an offloading hook), not only "a graph break"."""

    cause: str
    advice: str
    named: bool


def piece_cause(
    origin: GraphOrigin | None,
    hooks: tuple[str, ...] = (),
    inside_model: bool = False,
    blocks_compiled: bool | None = None,
) -> PieceCause | None:
    """Why the graph is a piece of a transformer (regional compilation, a graph break); None when it looks like a
    whole forward or its origin is unknown. ``inside_model``: a diffusers model's forward called the frame;
    ``blocks_compiled``: whether that model's blocks were compiled on their own (None: unknown). A block compiled
    alone whose blocks were not (the forward fell back to eager at a break in its block loop) is a graph break."""
    if origin is None:
        return None
    broken = origin.resumes_after_break or origin.break_reason is not None
    if origin.owner in repeated_block_classes() and not broken and blocks_compiled is not False:
        return PieceCause(
            f"regional compilation (compile_repeated_blocks) compiles each {origin.owner} on its own, and RAS "
            "rewrites only a whole transformer (it gathers the image tokens once at the input and scatters them "
            "once at the output)",
            REGIONAL_ADVICE,
            named=True,
        )
    if not broken and not is_submodule_frame(origin, inside_model):
        return None
    step_caches = [h for h in hooks if h not in (ACCELERATE_HOOKS, SEQUENTIAL_OFFLOAD)]
    if step_caches:
        return PieceCause(
            f"{' and '.join(step_caches)} splits the transformer into several graphs, and RAS rewrites only a whole "
            "transformer",
            advice_for(step_caches),
            named=True,
        )
    if (
        SEQUENTIAL_OFFLOAD in hooks
        or ACCELERATE_HOOKS in (origin.break_reason or "")
        or hook_of_file(origin.filename) == ACCELERATE_HOOKS
    ):
        return PieceCause(
            "accelerate's offloading hooks (enable_sequential_cpu_offload) run outside the compiled graph at every "
            "layer, so Dynamo splits the transformer into a graph per layer, and RAS rewrites only a whole "
            "transformer",
            "pipe.enable_model_cpu_offload() keeps RAS; enable_sequential_cpu_offload() does not",
            named=True,
        )
    where = f" ({origin.break_reason} at {origin.break_site})" if origin.break_reason else ""
    if not broken:
        where = f" (Dynamo compiled {origin.qualname} on its own)"
    return PieceCause(
        f"Dynamo split the transformer's forward at graph breaks{where}",
        GRAPH_BREAK_ADVICE,
        named=False,
    )
