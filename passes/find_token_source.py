"""Analysis pass: find the latents input, the timestep input and the image-token tensor.

Matches one of three latent layouts (see ``latent_layout``):
- ``image``: a 4-D floating model input ``x`` [B, C, H, W] whose forward slice first enters a
  submodule (the patch embedding), and the last 3-D node ``[B, N, C']`` computed from ``x``
  before the slice enters a second submodule (the first block), with ``N * p * p == H * W`` for
  an integer patch size ``p``. That node is the image-token tensor after patch (and, for models
  that add it there, position) embedding.
- ``video``: the same for a 5-D input [B, C, F, H, W] or [B, F, C, H, W] and ``(p_t, p, p)`` patches,
  the reading confirmed by the patch embedding's convolution (its stride and input channels).
- ``packed``: no such input, and a 3-D floating model input ``x`` [B, N, C] of tokens the pipeline
  packed itself (Flux, Qwen-Image, LTX), the only one whose token count N is that of the graph's
  3-D output [B, N, C_out]; the token source is the last [B, N, C'] node computed from it before
  the second submodule (after the token-wise input projection). Each token's latent elements are
  its own row.
Produces: no graph change (but for a piece whose image tokens arrive inside a joint sequence, ``piece_joint``: the
input's image rows are sliced out, the token source, and joined back); fills ``ctx.latents``, ``ctx.latent``,
``ctx.latent_layout``, ``ctx.timestep``, ``ctx.token_source``, ``ctx.num_tokens``, ``ctx.patch_size`` (spatial; 1
when packed), ``ctx.batch_size`` and ``ctx.latent_hw`` (``(N, 1)`` when packed).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from .context import PassContext, RewriteError, module_path
from .graph_utils import describe, example_value, forward_slice, is_linear, placeholders
from .op_sets import CASTS, ELEMENTWISE, VIEWS, WRITES, matches
from .rules.latent_layout import (
    LatentLayout,
    choose_video_layout,
    folded_frames_layout,
    image_layout,
    packed_layout,
    patch_evidence,
    video_layouts,
)
from .rules.latent_rows import LatentRows, latent_rows
from .rules.patchify import layout_through_linear

#: What Dynamo puts in the placeholder names of parameters and buffers (module state, not the caller's inputs).
MODULE_STATE_MARKERS = ("_parameters_", "_buffers_")


def is_model_input(node: torch.fx.Node) -> bool:
    """True for placeholders the caller passes (latents, timestep, ...), not parameters or buffers.

    Dynamo records where each placeholder came from (``node._dynamo_source``; ``meta["grapharg"]`` in older
    releases): a parameter or buffer has a ``ParamBufferSource`` in its chain. Without a source, the names
    Dynamo gives module state (``..._parameters_...``, ``..._buffers_...``) tell."""
    grapharg = node.meta.get("grapharg")
    source = getattr(node, "_dynamo_source", None) or getattr(grapharg, "source", None)
    if source is not None:
        return not _is_module_state(source)
    if isinstance(example_value(node), torch.nn.Parameter):
        return False
    return not any(marker in node.name for marker in MODULE_STATE_MARKERS)


def _is_module_state(source) -> bool:
    from torch._dynamo.source import ParamBufferSource, UnspecializedParamBufferSource

    while source is not None:
        if isinstance(source, (ParamBufferSource, UnspecializedParamBufferSource)):
            return True
        source = getattr(source, "base", None)
    return False


def find_token_source(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    inputs = [n for n in placeholders(gm) if is_model_input(n)]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    reasons = []
    for latents in inputs:
        value = example_value(latents)
        if not (isinstance(value, torch.Tensor) and value.dim() in (4, 5) and value.is_floating_point()):
            continue
        found = _token_source_from(latents, order)
        if isinstance(found, str):
            reasons.append(f"{latents.name}: {found}")
            continue
        _record(ctx, inputs, latents, *found)
        return gm
    rows = latent_rows(gm, inputs)
    if isinstance(rows, LatentRows):
        _record(ctx, inputs, rows.rows[0], rows.tokens, rows.layout)
        ctx.latents_rows = [r.name for r in rows.rows]
        return gm
    if isinstance(rows, str):
        reasons.append(f"latents as a list of rows: {rows}")
    if ctx.settings.piece_joint is not None:
        joint, tokens = _open_joint_input(gm, ctx.settings.piece_joint, ctx.settings.piece_tokens)
        _record(ctx, inputs, joint, tokens, packed_layout(tuple(int(s) for s in example_value(tokens).shape)))
        return gm
    pieces = _piece_tokens(inputs, ctx.settings.piece_tokens, reasons)
    if pieces:
        # a piece's image tokens arrive embedded: the input itself is the source (no embedding to walk through)
        piece = pieces[0]
        _record(ctx, inputs, piece, piece, packed_layout(tuple(int(s) for s in example_value(piece).shape)))
        ctx.more_token_sources = [n.name for n in pieces[1:]]
        return gm
    packed = _packed_latents(gm, inputs, reasons)
    if packed is not None:
        found = _token_source_from(packed, order)
        if not isinstance(found, str):
            _record(ctx, inputs, packed, *found)
            return gm
        reasons.append(f"{packed.name}: {found}")
    detail = "; ".join(reasons) if reasons else "no 4-D or 5-D floating-point model input"
    raise RewriteError(f"no image-token source found ({detail})")


def _record(ctx: PassContext, inputs, latents, source, layout: LatentLayout, rows: int = 1) -> None:
    batch = layout.shape[0]
    ctx.token_rows = rows
    ctx.latents = latents.name
    ctx.latent = layout
    ctx.latent_layout = layout.kind
    ctx.token_source = source.name
    ctx.batch_size = batch
    ctx.num_tokens = int(example_value(source).shape[1])
    ctx.patch_size = layout.spatial_patch
    ctx.latent_hw = (layout.shape[-2], layout.shape[-1]) if layout.kind != "packed" else (layout.shape[1], 1)
    ctx.timestep = _find_timestep(inputs, batch)
    kind = f"patch {layout.patch[-1]}" if layout.kind == "image" else layout.describe()
    if rows > 1:
        kind += f"; frames folded into the batch: {rows} rows per item, one token per site across them"
    ctx.record("find_token_source", "tokens", describe(source), f"{ctx.num_tokens} image tokens ({kind})")


def _packed_latents(gm: torch.fx.GraphModule, inputs: list[torch.fx.Node], reasons: list[str]) -> torch.fx.Node | None:
    """The one 3-D floating input [B, N, C] whose N is the token count of the graph's 3-D output, if any."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    if not results:  # a piece that only writes into its inputs (Qwen-Image 2.1 places image tokens in place)
        return None
    first = results[0]
    out = example_value(first) if isinstance(first, torch.fx.Node) else None
    if not (isinstance(out, torch.Tensor) and out.dim() == 3):
        return None
    batch, num_tokens = int(out.shape[0]), int(out.shape[1])
    candidates = []
    for node in inputs:
        value = example_value(node)
        if isinstance(value, torch.Tensor) and value.dim() == 3 and value.is_floating_point():
            if tuple(int(s) for s in value.shape[:2]) == (batch, num_tokens):
                candidates.append(node)
    if len(candidates) > 1:
        # floating position ids [B, N, d] (FLUX.2's img_ids, when the caller passes them as floats) have the tokens'
        # shape too; the latents are the one input a linear projects first
        projected = [n for n in candidates if _enters_a_linear(n)]
        if len(projected) == 1:
            return projected[0]
        # Ideogram 4 packs text features [B, S, D_text] beside the latents [B, S, C]; a noise prediction has the
        # latents' channels
        widths = [n for n in candidates if example_value(n).shape[-1] == out.shape[-1]]
        if len(widths) == 1:
            return widths[0]
        names = ", ".join(n.name for n in candidates)
        reasons.append(f"packed latents are ambiguous: {names} all have the output's {num_tokens} tokens")
        return None
    return candidates[0] if candidates else None


def _enters_a_linear(node: torch.fx.Node) -> bool:
    """Whether ``node`` (through dtype casts only) is the input of a linear layer."""
    frontier = [node]
    while frontier:
        current = frontier.pop()
        for user in current.users:
            if is_linear(user) and user.args and user.args[0] is current:
                return True
            if matches(user, CASTS):
                frontier.append(user)
    return False


def _open_joint_input(
    gm: torch.fx.GraphModule, joint: tuple[int, int], piece: tuple[int, int] | None
) -> tuple[torch.fx.Node, torch.fx.Node]:
    """A piece's joint-sequence input ``[B, S, C]`` with its N image rows from ``row``: the rows sliced out (the
    token source) and joined back, so the gather that follows puts k active rows where the N were."""
    position, row = joint
    graph_inputs = placeholders(gm)
    if piece is None or not 0 <= position < len(graph_inputs):
        raise RewriteError(f"piece_joint={joint} names no input of this graph (it has {len(graph_inputs)})")
    node = graph_inputs[position]
    value = example_value(node)
    batch, num_tokens = piece
    if not (isinstance(value, torch.Tensor) and value.dim() == 3 and int(value.shape[0]) == batch):
        raise RewriteError(f"piece_joint={joint}: input {node.name} is not a [B, S, C] sequence of batch {batch}")
    length = int(value.shape[1])
    if not 0 <= row <= length - num_tokens:
        raise RewriteError(f"piece_joint={joint}: {num_tokens} image rows from row {row} overflow {node.name}")
    users = list(node.users)
    with gm.graph.inserting_after(graph_inputs[-1]):
        before = gm.graph.call_function(operator.getitem, (node, (slice(None), slice(None, row))))
    with gm.graph.inserting_after(before):
        tokens = gm.graph.call_function(operator.getitem, (node, (slice(None), slice(row, row + num_tokens))))
    with gm.graph.inserting_after(tokens):
        after = gm.graph.call_function(operator.getitem, (node, (slice(None), slice(row + num_tokens, None))))
    with gm.graph.inserting_after(after):
        joined = gm.graph.call_function(torch.cat, ([before, tokens, after], 1))
    for user in users:
        user.replace_input_with(node, joined)
    for made, part in (
        (before, value[:, :row]),
        (tokens, value[:, row : row + num_tokens]),
        (after, value[:, row + num_tokens :]),
        (joined, value),
    ):
        made.meta["example_value"] = part
        made.meta["ras_dense_shape"] = tuple(int(s) for s in part.shape)
    return node, tokens


def stores_tokens_only(gm: torch.fx.GraphModule, token_inputs: list[int]) -> bool:
    """Whether the image tokens that enter ``gm`` at the inputs ``token_inputs`` only go, through views, casts and
    element-wise ops, into in-place writes into other inputs' storage (Qwen-Image 2.1 places them into its joint
    sequence so), reaching no output and mixing no tokens: run dense, such a piece is exact under RAS."""
    graph_inputs = placeholders(gm)
    sources = [graph_inputs[i] for i in token_inputs]
    region = forward_slice(sources)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    if any(n in region for n in output.all_input_nodes):
        return False
    writes = [n for n in region if matches(n, WRITES)]
    allowed = WRITES | VIEWS | CASTS | ELEMENTWISE
    return bool(writes) and all(n in sources or matches(n, allowed) for n in region)


def carries_piece_tokens(value, piece: tuple[int, int]) -> bool:
    """Whether ``value`` is a floating [B, N, C] tensor of the image tokens of a transformer of ``piece = (B, N)``."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 3
        and value.is_floating_point()
        and tuple(int(s) for s in value.shape[:2]) == tuple(piece)
    )


def _piece_tokens(
    inputs: list[torch.fx.Node], piece: tuple[int, int] | None, reasons: list[str]
) -> list[torch.fx.Node]:
    """In a piece of a transformer of ``piece = (B, N)`` image tokens, its 3-D floating inputs [B, N, C]."""
    if piece is None:
        return []
    candidates = [n for n in inputs if carries_piece_tokens(example_value(n), piece)]
    if not candidates:
        reasons.append(f"a piece needs a [B, N, C] input of the transformer's {piece[1]} image tokens: none")
    return candidates


def _token_source_from(latents: torch.fx.Node, order: dict) -> tuple[torch.fx.Node, LatentLayout, int] | str:
    """``(token source, layout, rows per latent batch row)``, or the reason none is found."""
    value = example_value(latents)
    shape = tuple(int(s) for s in value.shape)
    downstream = sorted(forward_slice([latents]), key=order.__getitem__)
    first_module = next((module_path(n) for n in downstream if module_path(n)), None)
    if first_module is None:
        return "it never enters a submodule"
    top = first_module.split(".")[0]
    embedding = []
    for node in downstream:
        owner = module_path(node).split(".")[0]
        if owner and owner != top:
            break  # the first block: everything before it is patch and position embedding
        embedding.append(node)
    best, reason = None, None
    for node in embedding:
        val = example_value(node)
        if not (isinstance(val, torch.Tensor) and val.dim() == 3):
            continue
        rows = 1
        if int(val.shape[0]) == shape[0]:
            layout = _layout_for(shape, int(val.shape[1]), embedding)
            if len(shape) == 5 and not isinstance(layout, LatentLayout):
                layout = layout_through_linear(latents, node) or layout
        else:
            folded = folded_frames_layout(latents, node, embedding)
            if folded is None:
                continue
            layout, rows = folded
        if isinstance(layout, LatentLayout):
            if best is None or not _bypassed(node, set(embedding), int(val.shape[1]), order):
                best = (node, layout, rows)
        elif layout is not None:
            reason = layout
    if best is None:
        return reason or f"no [B, N, C] tensor with N = H*W/p^2 after {top!r}"
    return best


def _bypassed(node: torch.fx.Node, embedding: set, num_tokens: int, order: dict) -> bool:
    """Whether the tokens reach the blocks around ``node`` too: an earlier token tensor of the embedding has a user
    that is not on the way to ``node`` (Motif-Video's decoder takes ``hidden_states.clone()`` while the encoder
    blocks take ``hidden_states``). Gathering after ``node`` would leave that other path dense, with N tokens
    beside k in one sequence; the tensor both paths leave from is the token source."""
    ancestors, pending = set(), [node]
    while pending:
        current = pending.pop()
        for arg in current.all_input_nodes:
            if arg in embedding and arg not in ancestors:
                ancestors.add(arg)
                pending.append(arg)
    for earlier in ancestors:
        val = example_value(earlier)
        if not (isinstance(val, torch.Tensor) and val.dim() == 3 and int(val.shape[1]) == num_tokens):
            continue
        # after an in-place write into ``earlier`` on the way (``tokens.mul_(2)``), its later readers read the write
        written = [u for u in earlier.users if (u is node or u in ancestors) and matches(u, WRITES)]
        since = min((order[w] for w in written), default=None)
        for user in earlier.users:
            if user is node or user in ancestors or not isinstance(example_value(user), torch.Tensor):
                continue
            if since is None or order[user] < since:
                return True
    return False


def _layout_for(shape: tuple[int, ...], num_tokens: int, embedding: list) -> LatentLayout | str | None:
    """The latent layout that gives ``num_tokens`` tokens, the reason none can be told apart, or None."""
    if len(shape) == 3:
        return packed_layout(shape) if num_tokens == shape[1] else None
    if len(shape) == 4:
        return image_layout(shape, num_tokens)
    candidates = video_layouts(shape, num_tokens)
    return choose_video_layout(candidates, patch_evidence(embedding)) if candidates else None


def _find_timestep(inputs: list[torch.fx.Node], batch: int) -> str | None:
    candidates = []
    for node in inputs:
        val = example_value(node)
        if isinstance(val, torch.Tensor) and val.dim() <= 1 and val.numel() in (1, batch):
            candidates.append(node)
    named = [n for n in candidates if "timestep" in n.name]
    chosen = (named or candidates or [None])[0]
    return chosen.name if chosen is not None else None
