"""The read-only settings of one run of the pass pipeline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PassSettings:
    """What the caller asks of the passes; no pass writes it (``ctx.settings``).

    ``probe_tokens``: the k the passes rewrite with (None: ``gather_active_tokens`` picks one from N; any k in
    [1, N] is valid afterwards). ``kv_cache``: give attention per-layer K/V caches of all N image tokens.
    ``fuse_kv_projection``: turn each K/V projection chain that feeds a cache into one
    ``rascompile::linear_scatter_`` op. ``dump_dir``: write each graph before and after every pass there.
    """

    probe_tokens: int | None = None
    kv_cache: bool = True
    fuse_kv_projection: bool = False
    dump_dir: str | None = None
