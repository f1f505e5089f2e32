"""Analysis pass: find the latents input, the timestep input and the image-token tensor.

Matches one of two latent layouts:
- ``image``: a 4-D floating model input ``x`` [B, C, H, W] whose forward slice first enters a
  submodule (the patch embedding), and the last 3-D node ``[B, N, C']`` computed from ``x``
  before the slice enters a second submodule (the first block), with ``N * p * p == H * W`` for
  an integer patch size ``p``. That node is the image-token tensor after patch (and, for models
  that add it there, position) embedding.
- ``packed``: no such input, and a 3-D floating model input ``x`` [B, N, C] of tokens the pipeline
  packed itself (Flux, Qwen-Image, LTX), the only one whose token count N is that of the graph's
  3-D output [B, N, C_out]; the token source is the last [B, N, C'] node computed from it before
  the second submodule (after the token-wise input projection). Each token's latent elements are
  its own row.
Produces: no graph change; fills ``ctx.latents``, ``ctx.latent_layout``, ``ctx.timestep``,
``ctx.token_source``, ``ctx.num_tokens``, ``ctx.patch_size`` (1 when packed), ``ctx.batch_size`` and
``ctx.latent_hw`` (``(N, 1)`` when packed).
"""

from __future__ import annotations

import math

import torch
import torch.fx

from .context import PassContext, RewriteError, module_path
from .graph_utils import describe, example_value, forward_slice, placeholders


def is_model_input(node: torch.fx.Node) -> bool:
    """True for placeholders the caller passes (latents, timestep, ...), not parameters or buffers."""
    grapharg = node.meta.get("grapharg")
    if grapharg is not None and getattr(grapharg, "source", None) is not None:
        return not grapharg.source.name.startswith("L['self']")
    return not isinstance(example_value(node), torch.nn.Parameter)


def find_token_source(gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
    inputs = [n for n in placeholders(gm) if is_model_input(n)]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    reasons = []
    for latents in inputs:
        value = example_value(latents)
        if not (isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point()):
            continue
        found = _token_source_from(latents, order)
        if isinstance(found, str):
            reasons.append(f"{latents.name}: {found}")
            continue
        source, patch = found
        batch, _, height, width = (int(s) for s in value.shape)
        _record(ctx, inputs, latents, source, "image", patch, (height, width))
        return gm
    packed = _packed_latents(gm, inputs, reasons)
    if packed is not None:
        found = _token_source_from(packed, order)
        if not isinstance(found, str):
            _record(ctx, inputs, packed, found[0], "packed", 1, (int(example_value(packed).shape[1]), 1))
            return gm
        reasons.append(f"{packed.name}: {found}")
    detail = "; ".join(reasons) if reasons else "no 4-D floating-point model input"
    raise RewriteError(f"no image-token source found ({detail})")


def _record(ctx: PassContext, inputs, latents, source, layout: str, patch: int, latent_hw: tuple[int, int]) -> None:
    batch = int(example_value(latents).shape[0])
    ctx.latents = latents.name
    ctx.latent_layout = layout
    ctx.token_source = source.name
    ctx.batch_size = batch
    ctx.num_tokens = int(example_value(source).shape[1])
    ctx.patch_size = patch
    ctx.latent_hw = latent_hw
    ctx.timestep = _find_timestep(inputs, batch)
    kind = f"patch {patch}" if layout == "image" else "packed latents"
    ctx.note(f"tokens: {ctx.num_tokens} image tokens ({kind}) from {describe(source)}")


def _packed_latents(gm: torch.fx.GraphModule, inputs: list[torch.fx.Node], reasons: list[str]) -> torch.fx.Node | None:
    """The one 3-D floating input [B, N, C] whose N is the token count of the graph's 3-D output, if any."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    first = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
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
        names = ", ".join(n.name for n in candidates)
        reasons.append(f"packed latents are ambiguous: {names} all have the output's {num_tokens} tokens")
        return None
    return candidates[0] if candidates else None


def _token_source_from(latents: torch.fx.Node, order: dict) -> tuple[torch.fx.Node, int] | str:
    value = example_value(latents)
    if value.dim() == 3:  # packed: N tokens of one latent element row each
        height, width = int(value.shape[1]), 1
    else:
        height, width = int(value.shape[2]), int(value.shape[3])
    downstream = sorted(forward_slice([latents]), key=order.__getitem__)
    first_module = next((module_path(n) for n in downstream if module_path(n)), None)
    if first_module is None:
        return "it never enters a submodule"
    top = first_module.split(".")[0]
    best = None
    for node in downstream:
        owner = module_path(node).split(".")[0]
        if owner and owner != top:
            break  # the first block: everything before it is patch and position embedding
        val = example_value(node)
        if not (isinstance(val, torch.Tensor) and val.dim() == 3 and int(val.shape[0]) == int(value.shape[0])):
            continue
        tokens = int(val.shape[1])
        patch = math.isqrt(height * width // tokens) if tokens and (height * width) % tokens == 0 else 0
        if patch and patch * patch * tokens == height * width and height % patch == 0 and width % patch == 0:
            best = (node, patch)
    if best is None:
        return f"no [B, N, C] tensor with N = H*W/p^2 after {top!r}"
    return best


def _find_timestep(inputs: list[torch.fx.Node], batch: int) -> str | None:
    candidates = []
    for node in inputs:
        val = example_value(node)
        if isinstance(val, torch.Tensor) and val.dim() <= 1 and val.numel() in (1, batch):
            candidates.append(node)
    named = [n for n in candidates if "timestep" in n.name]
    chosen = (named or candidates or [None])[0]
    return chosen.name if chosen is not None else None
