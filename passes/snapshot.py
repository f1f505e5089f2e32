"""A canonical, human-readable summary of a rewritten graph, for snapshot tests and debugging."""

from __future__ import annotations

from .context import PassContext


def graph_summary(ctx: PassContext) -> str:
    """What the passes found and rewrote, one line each, in graph order; stable across runs."""
    lines = [
        _latents_line(ctx),
        f"timestep: {ctx.timestep}",
        f"output cache: {list(ctx.output_cache_shape)}",
        f"kv caches: {len(ctx.kv_slots)}",
        *ctx.log,
    ]
    return "\n".join(lines) + "\n"


def _latents_line(ctx: PassContext) -> str:
    if ctx.latent is None:
        return f"latents: {ctx.latents} {ctx.latent_hw[0]}x{ctx.latent_hw[1]}, batch {ctx.batch_size}"
    shape = "x".join(map(str, ctx.latent.shape[1:]))
    return f"latents: {ctx.latents} [B, {shape}] ({ctx.latent.describe()}), batch {ctx.batch_size}"
