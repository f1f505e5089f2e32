"""The read-only settings of one run of the pass pipeline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassSettings:
    """What the caller asks of the passes; no pass writes it (``ctx.settings``).

    ``probe_tokens``: the k the passes rewrite with (None: ``gather_active_tokens`` picks one from N; any k in
    [1, N] is valid afterwards). ``kv_cache``: give attention per-layer K/V caches of all N image tokens.
    ``kv_cache_dtype``: None (the caches take the model's dtype) or ``"fp8_e4m3"`` (float8 rows with a float32
    scale per token and head). ``fuse_kv_projection``: turn each K/V projection chain that feeds a cache into one
    ``rascompile::linear_scatter_`` op. ``dump_dir``: write each graph before and after every pass there.
    ``piece_tokens``: ``(B, N)`` of the transformer this graph is a piece of (the runtime knows them from the piece
    that holds the patch embedding): a 3-D model input ``[B, N, C]`` is then the piece's image tokens.
    ``piece_outputs``: the graph is a piece whose image-token outputs cross to the next piece; they are merged with
    a cache at the outputs instead of at a final projection.
    ``piece_joint``: ``(input, row)``: the piece's image tokens arrive inside a joint sequence, the graph input at
    position ``input`` (``[B, S, C]``, its N image rows from ``row``); outputs of that sequence's length hand the
    joint sequence on, image rows from the same row.
    """

    probe_tokens: int | None = None
    kv_cache: bool = True
    kv_cache_dtype: str | None = None
    fuse_kv_projection: bool = False
    dump_dir: str | None = None
    piece_tokens: tuple[int, int] | None = None
    piece_outputs: bool = False
    piece_joint: tuple[int, int] | None = None
