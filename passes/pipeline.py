"""The RAS pass pipeline: turns a diffusion transformer's Dynamo graph into its RAS step graph.

``build_ras_graph`` runs the pipeline on a copy of the dense graph:

1. ``tensorify_scalar_reads`` — ``x * s.item()`` becomes ``x * s`` (a LoRA scale stays a graph input)
2. ``normalize_attention_args`` — attention calls read one way (q, k, v positional, the rest by name)
3. ``find_token_source``      — analysis: latents and their layout, timestep, image tokens [B, N, C]
   ``batch_row_loops``        — loops over the batch rows that Dynamo unrolled become batched ops
4. ``functionalize_inplace_writes`` — in-place writes into token tensors become out-of-place ops
5. ``gather_active_tokens``   — gather active tokens [B, k, C] right after the token source
6. ``scatter_output``         — merge fresh and cached token outputs before unpatchify
   ``scatter_piece_outputs``  — (a piece of a transformer) merge the image tokens it hands on, at its output
7. ``analyze_token_region``   — analysis: token axes and joint-sequence image rows of the token region
8. ``cache_attention_kv``     — per-layer K/V caches of all N image tokens for attention
9. ``retarget_token_region``  — token-count constants, position tables and masks follow k
10. ``fuse_kv_projection``     — (optional) K/V projection + norm + RoPE + cache write as one op
11. ``verify_ras_graph``      — checks the result at three token counts, then cleans up

The rewritten graph takes the original inputs followed by ``ras_active_idx`` [B, k],
``ras_output_cache`` [B, N, C_out] and the K/V caches, and works for any k in [1, N].
"""

from __future__ import annotations

from typing import NamedTuple

import torch.fx

from .analyze_token_region import analyze_token_region
from .batch_row_loops import batch_row_loops
from .cache_attention_kv import cache_attention_kv
from .context import PassContext, RewriteError
from .find_token_source import find_token_source
from .functionalize_inplace_writes import functionalize_inplace_writes
from .fuse_kv_projection import fuse_kv_projection
from .gather_active_tokens import gather_active_tokens
from .graph_utils import copy_graph_module, record_dense_shapes
from .manager import PassManager
from .normalize_attention_args import normalize_attention_args
from .retarget_token_region import retarget_token_region
from .scatter_output import scatter_output
from .scatter_piece_outputs import scatter_piece_outputs
from .settings import PassSettings
from .shard_ulysses import shard_ulysses
from .signature import StepSignature, step_signature
from .snapshot import RECORDS_KEY
from .specialize_shapes import has_symbolic_shapes
from .tensorify_scalar_reads import tensorify_scalar_reads
from .unshard_ulysses import unshard_ulysses
from .verify_ras_graph import verify_ras_graph

RAS_PASSES = PassManager(
    [
        unshard_ulysses,
        tensorify_scalar_reads,
        normalize_attention_args,
        find_token_source,
        batch_row_loops,
        functionalize_inplace_writes,
        gather_active_tokens,
        scatter_output,
        scatter_piece_outputs,
        analyze_token_region,
        cache_attention_kv,
        retarget_token_region,
        shard_ulysses,
        fuse_kv_projection,
        verify_ras_graph,
    ]
)


def _refuse_dynamic_shapes(gm: torch.fx.GraphModule) -> None:
    if has_symbolic_shapes(gm):
        raise RewriteError(
            "Dynamo traced this graph with dynamic shapes (it does so after a resolution change); "
            "specialise it first (rascompile.passes.specialize_shapes) or compile with dynamic=False"
        )


def _refuse_data_dependent_sizes(gm: torch.fx.GraphModule) -> None:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    from .graph_utils import describe, example_value

    for node in gm.graph.nodes:
        value = example_value(node)
        if isinstance(value, (torch.Tensor, torch.SymInt, tuple, list)) and free_unbacked_symbols(value):
            raise RewriteError(
                f"{node.name} ({describe(node)}) has sizes that depend on tensor data (Dynamo's "
                "capture_scalar_outputs / capture_dynamic_output_shape_ops): the token count cannot be followed"
            )


class RASRewrite(NamedTuple):
    """What ``build_ras_graph`` returns."""

    graph: torch.fx.GraphModule  # the RAS step graph
    signature: StepSignature  # its inputs in order, caches, sizes, latent layout: the contract with the runtime
    context: PassContext  # the facts the passes found and the records of what they rewrote


def build_ras_graph(
    gm: torch.fx.GraphModule,
    *,
    kv_cache: bool = True,
    kv_cache_dtype: str | None = None,
    fuse_kv_projection: bool = False,
    dump_dir: str | None = None,
    piece_tokens: tuple[int, int] | None = None,
    piece_outputs: bool = False,
    piece_joint: tuple[int, int] | None = None,
) -> RASRewrite:
    """Rewrite a copy of the dense Dynamo graph ``gm`` into the RAS step graph.

        ``kv_cache_dtype="fp8_e4m3"`` stores the K/V caches as float8 with per-token, per-head scales (see
        ``cache_attention_kv``). ``fuse_kv_projection`` turns each K/V projection chain that feeds a cache into one
        ``rascompile::linear_scatter_`` op (see ``fuse_kv_projection``). ``piece_tokens`` and ``piece_outputs`` rewrite
        a piece of a transformer that Dynamo split, ``piece_joint`` one whose image tokens arrive inside a joint
    sequence (see ``PassSettings``).

        Returns ``(graph, signature, context)``: the rewritten graph, its ``StepSignature`` (the inputs it takes, in
        order, and the caches; what the runtime and the export bind to) and the pass context (facts and records).

        The rewritten graph carries the passes' records (``rewrite_records``); ``ctx.records`` holds them too.
        Raises RewriteError, with the reason, when the rewrite cannot be shown to apply.
    """
    _refuse_data_dependent_sizes(gm)
    _refuse_dynamic_shapes(gm)
    record_dense_shapes(gm)
    settings = PassSettings(
        kv_cache=kv_cache,
        kv_cache_dtype=kv_cache_dtype,
        fuse_kv_projection=fuse_kv_projection,
        dump_dir=dump_dir,
        piece_tokens=piece_tokens,
        piece_outputs=piece_outputs,
        piece_joint=piece_joint,
    )
    ctx = PassContext(settings=settings)
    ras = RAS_PASSES(copy_graph_module(gm), ctx)
    ras.meta[RECORDS_KEY] = tuple(ctx.records)
    return RASRewrite(ras, step_signature(gm, ctx), ctx)


__all__ = ["RAS_PASSES", "RASRewrite", "build_ras_graph", "copy_graph_module"]
