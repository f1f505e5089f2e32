"""What the RAS passes share: the settings they run with, the facts they find about a graph, the placeholders
they add and a structured record of every rewrite."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch.fx

from .settings import PassSettings


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


@dataclass(frozen=True)
class RewriteRecord:
    """One thing a pass found or rewrote. ``snapshot.render_record`` writes it as one line of the graph summary.

    ``kind`` says what was done (one of ``snapshot.RECORD_FORMATS``: ``"fused"``, ``"unfused"``, ``"kv_cached"``,
    ...); ``node`` is the node or module it was done at, as ``describe`` writes it (the module path for a fused
    projection); ``detail`` the rest of the record (what was cached, which literal, why a chain stays unfused);
    ``cache`` the K/V cache placeholder a cache or fusion record is about; ``offset`` the dense row where the image
    rows of a joint sequence start, for the records about joint sequences.
    """

    pass_name: str
    kind: str
    node: str = ""
    detail: str = ""
    cache: str = ""
    offset: int | None = None


@dataclass
class TokenRegionFacts:
    """What ``analyze_token_region`` finds, by node name, before any K/V cache is added: the token axis of each
    node that carries the active tokens, and where a joint [text; image] sequence keeps its image rows."""

    axes: dict[str, int] = field(default_factory=dict)
    image_offsets: dict[str, int] = field(default_factory=dict)


@dataclass
class PassContext:
    """State threaded through the pass pipeline for one graph.

    ``settings`` is read-only. The rest is filled in as the passes run: ``find_token_source`` sets the token
    facts, ``gather_active_tokens`` the probe token count, ``analyze_token_region`` the token region, the
    rewriting passes the placeholders they create, and every pass adds ``records`` of what it found or rewrote
    (the graph summary).
    """

    settings: PassSettings = field(default_factory=PassSettings)

    # facts found by find_token_source
    latents: str | None = None  # placeholder name of the latents (B, C, H, W), or (B, N, C) when packed
    # latents passed as a list of per-row tensors (Z-Image): their placeholders in batch order, stacked along a new
    # batch axis they are the latents (``latents`` is the first); empty otherwise
    latents_rows: list[str] = field(default_factory=list)
    latent_layout: str = "image"  # kind of ``latent``: "image", "video" or "packed"
    latent: Any = None  # the LatentLayout (see latent_layout): which latent elements make up each token
    timestep: str | None = None  # placeholder name of the timestep, when one is found
    token_source: str | None = None  # node producing the image tokens [B, N, C]
    # a piece's further inputs of the image tokens [B, N, C] (a block's residual beside its attention output),
    # gathered like the token source
    more_token_sources: list[str] = field(default_factory=list)
    batch_size: int = 0
    # rows of the token tensors per latent batch row: 1, or F when the model folds its frames into the batch
    # (Latte's [B*F, N, C] spatial tokens, row b*F + f); the token tensors' batch is ``token_batch``
    token_rows: int = 1
    num_tokens: int = 0  # N
    patch_size: int = 0
    latent_hw: tuple[int, int] = (0, 0)

    # chosen by gather_active_tokens: the k the graph is rewritten with (any k in [1, N] is valid afterwards)
    probe_tokens: int | None = None

    # found by analyze_token_region (None until it runs, and when the K/V caches are off)
    token_region: TokenRegionFacts | None = None

    # placeholders added by the rewrite (names), in graph order
    active_idx: str | None = None
    active_count: str | None = None
    output_cache: str | None = None
    output_cache_shape: tuple[int, ...] = ()
    output_cache_dtype: object = None
    kv_slots: list[KVCacheSlot] = field(default_factory=list)
    context_parallel: Any = None  # unshard_ulysses' ContextParallel: the graph's Ulysses degree, rank and group

    # what every pass found and rewrote, in order (the graph summary renders them)
    records: list[RewriteRecord] = field(default_factory=list)

    @property
    def token_batch(self) -> int:
        """The leading size of the token tensors: the latents' batch times ``token_rows``."""
        return self.batch_size * self.token_rows

    def record(self, pass_name: str, kind: str, node: str = "", detail: str = "", **more: Any) -> None:
        """Add a ``RewriteRecord`` (``more``: ``cache``, ``offset``)."""
        self.records.append(RewriteRecord(pass_name, kind, node, detail, **more))


_DYNAMO_ROOT = re.compile(r"^L\['[A-Za-z_][A-Za-z0-9_]*'\]")


def module_path(node: torch.fx.Node) -> str:
    """Dotted module path of the innermost module that produced ``node`` ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    _, (path, _) = list(stack.items())[-1]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # Dynamo records paths like "L['self'].__dict__['_modules']['transformer_blocks'].0.attn", rooted at the local
    # that holds the transformer: "self" in its own forward, "module" when a hook wrapped that forward (accelerate's
    # offloading hooks call ``module._old_forward``).
    path = _DYNAMO_ROOT.sub("", path)
    for junk in ("__dict__['_modules']", "['", "']", "_modules"):
        path = path.replace(junk, ".")
    parts = [p for p in path.split(".") if p and p != "self"]
    # a model whose forward a hook registry replaced (diffusers' context-parallel hooks) is reached through the bound
    # method the registry holds: "forward.__self__" is the model itself
    while parts[:2] == ["forward", "__self__"]:
        parts = parts[2:]
    # a submodule whose forward a hook replaced: "<module>.forward.func.__closure__[0].cell_contents.forward.__self__"
    path = ".".join(parts)
    return re.sub(r"\.forward\.func\.__closure__\[\d+\]\.cell_contents\.forward\.__self__", "", path)
