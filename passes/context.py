"""What the RAS passes share: the facts they find about a graph and the decisions they record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx


class RewriteError(Exception):
    """The passes cannot prove that their rewrite applies to this graph; it must run dense."""


@dataclass
class KVCacheSlot:
    """One cached key or value tensor of one attention layer."""

    placeholder: str  # name of the cache placeholder in the rewritten graph
    attention: str  # module path of the attention layer
    kind: str  # "key" or "value"
    shape: tuple[int, ...]  # dense shape, with the token axis of size N
    axis: int  # token axis
    dtype: object = None


@dataclass
class PassContext:
    """State threaded through the pass pipeline for one graph.

    Filled in as the passes run: ``find_token_source`` sets the token facts, the others add
    the placeholders they create and a log of what they rewrote (the graph snapshot).
    """

    probe_tokens: int | None = None  # k used while rewriting; any k in [1, N] is valid afterwards
    kv_cache: bool = True
    fuse_kv_projection: bool = False
    dump_dir: str | None = None

    # facts found by find_token_source
    latents: str | None = None  # placeholder name of the latents (B, C, H, W), or (B, N, C) when packed
    latent_layout: str = "image"  # kind of ``latent``: "image", "video" or "packed"
    latent: Any = None  # the LatentLayout (see latent_layout): which latent elements make up each token
    timestep: str | None = None  # placeholder name of the timestep, when one is found
    token_source: str | None = None  # node producing the image tokens [B, N, C]
    batch_size: int = 0
    num_tokens: int = 0  # N
    patch_size: int = 0
    latent_hw: tuple[int, int] = (0, 0)

    # placeholders added by the rewrite (names), in graph order
    active_idx: str | None = None
    active_count: str | None = None
    output_cache: str | None = None
    output_cache_shape: tuple[int, ...] = ()
    output_cache_dtype: object = None
    final_projection: str | None = None
    kv_slots: list[KVCacheSlot] = field(default_factory=list)

    # human-readable record of every rewrite, for snapshots and debugging
    log: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        self.log.append(line)


def module_path(node: torch.fx.Node) -> str:
    """Dotted module path of the innermost module that produced ``node`` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    _, (path, _) = list(stack.items())[-1]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # Dynamo records paths like "L['self'].__dict__['_modules']['transformer_blocks'].0.attn".
    for junk in ("L['self'].", "__dict__['_modules']", "['", "']", "_modules"):
        path = path.replace(junk, ".")
    parts = [p for p in path.split(".") if p and p != "self"]
    return ".".join(parts)
