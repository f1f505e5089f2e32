"""Tensor functions that the RAS passes insert into graphs as ``call_function`` targets.

They are plain torch code, so every inner backend (eager, aot_eager, inductor) and the
ONNX exporter trace through them. ``idx`` is always the per-row active-token index of
shape ``[B, k]`` (int64); ``axis`` is the token axis of the tensor being gathered or written.
"""

from __future__ import annotations

if __name__ != "rascompile.passes.ops":
    # Run under a second name (say top-level ``passes.ops`` from a checkout) this module would define
    # rascompile::scatter_rows_ again, and torch.library would destroy the definition every caller already holds.
    raise ImportError(
        f"import rascompile.passes.ops, not {__name__!r}: this module defines the custom op rascompile::scatter_rows_"
    )

import dataclasses
from dataclasses import dataclass

import torch

from rascompile.kernels.linear_scatter import linear_scatter_
from rascompile.kernels.linear_scatter_quantized import linear_scatter_quantized_, quantize_rows

#: The dtypes of ``kv_cache_dtype`` names (``RASConfig.kv_cache_dtype``, ``PassSettings.kv_cache_dtype``).
KV_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _row_index(idx: torch.Tensor, like_shape: list[int], axis: int) -> torch.Tensor:
    """``idx`` [B, k] broadcast to ``like_shape`` (whose ``axis`` has size k) for gather/scatter."""
    view = [1] * len(like_shape)
    view[0] = idx.shape[0]
    view[axis] = idx.shape[1]
    return idx.view(view).expand(like_shape)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    """Rows ``idx[b]`` of ``x[b]`` along ``axis``: [B, ..., N, ...] -> [B, ..., k, ...].

    ``x`` may be broadcast over the batch (leading size 1) or have fewer leading dims than
    ``ndim`` (a position table such as a RoPE frequency table); it is expanded to ``B`` rows.
    """
    shape = list(x.shape)
    shape[0] = idx.shape[0]
    x = x.expand(shape)
    shape[axis] = idx.shape[1]
    return torch.gather(x, axis, _row_index(idx, shape, axis))


def gather_position_table(table: torch.Tensor, idx: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    """A table combined by broadcasting with token tensors of ``ndim`` dims, gathered at the active rows."""
    while table.dim() < ndim:
        table = table.unsqueeze(0)
    return gather_tokens(table, idx, axis)


def gather_fused_rows(table: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    """Rows ``b * N + idx[b, j]`` of a table whose ``axis`` holds N rows per batch item, item-major (a per-token
    table beside a token axis fused with the batch: Latte's timestep repeated for each spatial site)."""
    batch = idx.shape[0]
    first = torch.arange(batch, device=idx.device).unsqueeze(1) * (table.shape[axis] // batch)
    return table.index_select(axis, (idx + first).flatten())


def rows_like(table: torch.Tensor, ref: torch.Tensor, axis: int, ref_axis: int) -> torch.Tensor:
    """The first ``ref.shape[ref_axis]`` rows of ``table`` along ``axis``: a table whose rows along the token axis
    are all one row broadcast (ERNIE-Image expands its adaLN modulation to the joint sequence's length)."""
    return table.narrow(axis, 0, ref.shape[ref_axis])


def joint_rows(idx: torch.Tensor, offset: int, num_tokens: int, total: int) -> torch.Tensor:
    """The dense rows a joint sequence keeps on a RAS step: [B, total - N + k].

    The dense joint sequence has ``total`` rows with the N image rows at ``[offset, offset + N)``; the
    rewritten one keeps the other rows whole and the active image rows ``offset + idx`` in their place.
    """
    batch = idx.shape[0]
    before = torch.arange(offset, device=idx.device).expand(batch, offset)
    after = torch.arange(offset + num_tokens, total, device=idx.device).expand(batch, total - offset - num_tokens)
    return torch.cat([before, idx + offset, after], dim=1)


def gather_joint_table(
    table: torch.Tensor, idx: torch.Tensor, axis: int, ndim: int, offset: int, num_tokens: int, total: int
) -> torch.Tensor:
    """A position table over a joint (text + image) sequence, gathered at the rows the joint sequence keeps."""
    return gather_position_table(table, joint_rows(idx, offset, num_tokens, total), axis, ndim)


def setitem_copy(tensor: torch.Tensor, index, value) -> torch.Tensor:
    """``tensor`` with ``tensor[index] = value`` applied to a copy: the out-of-place form of an in-place write."""
    out = tensor.clone()
    out[index] = value
    return out


@torch.library.custom_op("rascompile::scatter_rows_", mutates_args=("cache",))
def scatter_rows_(cache: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor, axis: int) -> None:
    """``cache[b, ..., idx[b, i], ...] = fresh[b, ..., i, ...]`` along ``axis``, in place.

    An opaque mutating op rather than ``Tensor.scatter_``: after functionalization inductor
    writes only the k fresh rows into the caller's cache instead of rebuilding the whole cache
    and copying it back at the end of the graph.
    """
    scatter_rows(cache, fresh, idx, axis)


def scatter_rows(cache: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor, axis: int) -> None:
    """The plain torch body of ``scatter_rows_`` (exporters use it: it is no custom op)."""
    fresh = fresh.to(cache.dtype)
    if cache.dtype in FLOAT8:  # scatter has no float8 kernels: write the bytes
        cache, fresh = cache.view(torch.uint8), fresh.view(torch.uint8)
    cache.scatter_(axis, _row_index(idx, list(fresh.shape), axis), fresh)


@scatter_rows_.register_fake
def _(cache: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor, axis: int) -> None:
    return None


def update_kv_cache(cache: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    """Write the active tokens' fresh keys (or values) into their slots of ``cache``; return the cache.

    ``cache`` holds all N image tokens and is mutated in place, so slots written now stay for
    later steps.
    """
    scatter_rows_(cache, fresh, idx, axis)
    return cache


def update_joint_rows_cache(
    cache: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor, axis: int, offset: int
) -> torch.Tensor:
    """A joint (text + image) key or value tensor with its image rows taken from their cache.

    ``fresh`` holds the rows a RAS step keeps (see ``joint_rows``): every text row and, from row ``offset``, the k
    active image rows. Those are written into ``cache``, which holds the N image rows only (the text rows come from
    the step itself); the result is the joint tensor at its dense length, the cached image rows between the text
    rows.
    """
    k = idx.shape[1]
    scatter_rows_(cache, fresh.narrow(axis, offset, k), idx, axis)
    return joint_around(cache, fresh, axis, offset, k)


def joint_around(cache: torch.Tensor, fresh: torch.Tensor, axis: int, offset: int, k: int) -> torch.Tensor:
    """``fresh`` with its k rows from ``offset`` along ``axis`` replaced by ``cache`` (all N image rows)."""
    after = fresh.shape[axis] - offset - k
    return torch.cat([fresh.narrow(axis, 0, offset), cache, fresh.narrow(axis, offset + k, after)], dim=axis)


def update_joint_kv_cache(
    cache: torch.Tensor, parts: list[torch.Tensor], idx: torch.Tensor, axis: int, image_part: int
) -> torch.Tensor:
    """The joint sequence ``cat(parts, axis)`` with its image part taken from its cache of the N image tokens.

    ``parts[image_part]`` holds the active image tokens: they are written into ``cache`` (rows ``idx``), and the
    sequence is joined with the whole cache in that part's place; the other parts (text tokens) come from the step
    itself. A part that is ``None`` was written into the cache already (by ``fused_kv_update``).
    """
    return write_joint_sequence(cache, parts, idx, axis, image_part, scatter_rows_)


def write_joint_sequence(cache, parts, idx, axis: int, image_part: int, scatter) -> torch.Tensor:
    """``update_joint_kv_cache`` with the row writer ``scatter(cache, fresh, rows, axis)`` given."""
    if parts[image_part] is not None:
        scatter(cache, parts[image_part], idx, axis)
    return torch.cat([cache if i == image_part else part for i, part in enumerate(parts)], dim=axis)


def update_quantized_kv_cache(
    cache: torch.Tensor, scale: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor, axis: int
) -> torch.Tensor:
    """``update_kv_cache`` for a float8 cache with per-row scales: the active rows are quantized into
    ``cache``/``scale``, and attention gets the cache dequantized to ``fresh``'s dtype (one layer at a time) with
    the step's own rows in place, unquantized."""
    rows, row_scales = quantize_rows(fresh, cache.dtype)
    scatter_rows_(cache, rows, idx, axis)
    scatter_rows_(scale, row_scales, idx, axis)
    return dequantized_around(cache, scale, fresh, idx, axis)


def dequantized_around(
    cache: torch.Tensor, scale: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor, axis: int
) -> torch.Tensor:
    """The float8 ``cache`` dequantized to ``fresh``'s dtype, with the step's own rows ``fresh`` at ``idx``."""
    full = (cache.to(torch.float32) * scale).to(fresh.dtype)
    return full.scatter(axis, _row_index(idx, list(fresh.shape), axis), fresh)


def update_quantized_joint_kv_cache(
    cache: torch.Tensor, scale: torch.Tensor, parts: list[torch.Tensor], idx: torch.Tensor, axis: int, image_part: int
) -> torch.Tensor:
    """``update_joint_kv_cache`` for a float8 cache (see ``update_quantized_kv_cache``)."""
    image = update_quantized_kv_cache(cache, scale, parts[image_part], idx, axis)
    return torch.cat([image if i == image_part else part for i, part in enumerate(parts)], dim=axis)


def update_quantized_joint_rows_cache(
    cache: torch.Tensor, scale: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor, axis: int, offset: int
) -> torch.Tensor:
    """``update_joint_rows_cache`` for a float8 cache (see ``update_quantized_kv_cache``)."""
    k = idx.shape[1]
    image = update_quantized_kv_cache(cache, scale, fresh.narrow(axis, offset, k), idx, axis)
    return joint_around(image, fresh, axis, offset, k)


def merge_output(cache: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Token outputs [B, N, C]: fresh rows at ``idx``, the last computed rows elsewhere.

    ``cache`` is updated in place so that it always holds each token's last computed output;
    the result is a copy, so later steps never change a tensor handed back to the caller.
    """
    scatter_rows_(cache, fresh, idx, 1)
    return cache.to(fresh.dtype, copy=True)


def merge_joint_output(cache: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """A joint output ``[B, k + L, C]`` whose first k rows are the active image tokens' (Z-Image's
    ``[image; caption]`` sequence): those rows merged with the output cache ``[B, N, C]`` as ``merge_output`` does,
    the other L rows after them, ``[B, N + L, C]``."""
    k = idx.shape[1]
    merged = merge_output(cache, fresh[:, :k], idx)
    return torch.cat([merged, fresh[:, k:].to(merged.dtype)], dim=1)


@dataclass(frozen=True)
class KVEpilogue:
    """What ``fused_kv_update`` does after the projection, and where it writes: its settings (not tensors).

    ``axis``: the cache's token axis; ``head_dim``: columns per head (-1: the cache's own, or all columns of a
    3-d cache); ``row_offset``: the cache row of image token 0 (0 for the passes' caches, which hold image rows only);
    ``norm``: ``"none"``, ``"layer_norm"`` or ``"rms_norm"`` over groups of ``norm_group`` columns with ``eps``;
    ``rope_axis``/``rope_ndim``: how the RoPE table broadcasts against the keys (tokens on ``rope_axis`` of
    ``rope_ndim``-d keys). On a graph node these are keyword arguments of the call (``kwargs()``), next to the
    tensors ``cache``, ``x``, ``weight``, ``bias``, ``idx``, ``norm_weight``, ``norm_bias`` and ``rope_table``.
    """

    axis: int
    head_dim: int = -1
    row_offset: int = 0
    norm: str = "none"
    norm_group: int = -1
    eps: float = 1e-6
    rope_axis: int = 1
    rope_ndim: int = 4

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, kwargs: dict) -> KVEpilogue:
        """The epilogue of a call's (or a node's) keyword arguments."""
        return cls(**{f.name: kwargs[f.name] for f in dataclasses.fields(cls) if f.name in kwargs})


#: The tensor arguments of ``fused_kv_update`` (all by name on a graph node; the last three may be None).
FUSED_KV_TENSORS = ("cache", "x", "weight", "bias", "idx", "norm_weight", "norm_bias", "rope_table")


def fused_kv_update(
    cache: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    rope_table: torch.Tensor | None = None,
    axis: int,
    head_dim: int = -1,
    row_offset: int = 0,
    norm: str = "none",
    norm_group: int = -1,
    eps: float = 1e-6,
    rope_axis: int = 1,
    rope_ndim: int = 4,
) -> torch.Tensor:
    """Project the active tokens ``x`` [B, k, C] and write their keys (or values) into ``cache``; return it.

    The fused form of linear -> optional norm -> optional RoPE -> ``update_kv_cache``, through the
    custom op ``rascompile::linear_scatter_``; the settings after ``rope_table`` are a ``KVEpilogue``'s.
    ``rope_table`` is the complex RoPE table over all N tokens as the model broadcasts it against
    ``rope_ndim``-d keys with tokens on ``rope_axis``; the op reads it at the active positions itself.
    """
    tensors = dict(norm_weight=norm_weight, norm_bias=norm_bias, rope_table=rope_table)
    epilogue = dict(axis=axis, head_dim=head_dim, row_offset=row_offset, norm=norm, norm_group=norm_group, eps=eps)
    rope = dict(rope_axis=rope_axis, rope_ndim=rope_ndim)
    if not x.is_cuda:
        # Off CUDA the op has no kernel of its own: its CPU implementation is this plain body, run here directly
        # rather than through the custom-op dispatcher (same result, less overhead per call).
        return fused_kv_update_body(cache, x, weight, bias, idx, **tensors, **epilogue, **rope)
    cos = sin = None
    if rope_table is not None:
        cos, sin = rope_cos_sin(torch.view_as_real(rope_table), rope_axis, rope_ndim)
    linear_scatter_(
        cache,
        x,
        weight,
        bias,
        idx,
        token_axis=axis,
        head_dim=head_dim,
        row_offset=row_offset,
        norm=norm,
        norm_group=norm_group,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        eps=eps,
        rope_cos=cos,
        rope_sin=sin,
        validate_indices=False,
    )
    return cache


def fused_kv_update_body(cache, x, weight, bias, idx, *, rope_table=None, **rest) -> torch.Tensor:
    """``fused_kv_update`` as its plain torch body (``portable_ops``), never through the custom-op dispatcher;
    the RoPE table may be complex (as the graph holds it) or real pairs."""
    from .export import portable_ops

    real = torch.view_as_real(rope_table) if rope_table is not None and rope_table.is_complex() else rope_table
    return portable_ops.fused_kv_update(cache, x, weight, bias, idx, rope_table=real, **rest)


def fused_quantized_kv_update(
    cache: torch.Tensor,
    scale: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    *,
    dtype: torch.dtype,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    rope_table: torch.Tensor | None = None,
    axis: int,
    head_dim: int = -1,
    row_offset: int = 0,
    norm: str = "none",
    norm_group: int = -1,
    eps: float = 1e-6,
    rope_axis: int = 1,
    rope_ndim: int = 4,
) -> torch.Tensor:
    """``fused_kv_update`` into a float8 cache with per-row scales (``kv_cache_dtype``): the active tokens' rows
    are written quantized by ``rascompile::linear_scatter_quantized_`` (the Triton epilogue on CUDA), and, as
    ``update_quantized_kv_cache`` does, attention gets the cache dequantized to ``dtype`` with the step's own rows
    unquantized. The settings after ``rope_table`` are a ``KVEpilogue``'s (``row_offset`` must be 0)."""
    if row_offset:
        raise ValueError(f"fused_quantized_kv_update: row_offset is {row_offset}; must be 0 (image-row caches)")
    cos = sin = None
    if rope_table is not None:
        real = torch.view_as_real(rope_table) if rope_table.is_complex() else rope_table
        cos, sin = rope_cos_sin(real, rope_axis, rope_ndim)
    rows = linear_scatter_quantized_(
        cache,
        scale,
        x,
        weight,
        bias,
        idx,
        token_axis=axis,
        head_dim=head_dim,
        norm=norm,
        norm_group=norm_group,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        eps=eps,
        rope_cos=cos,
        rope_sin=sin,
        validate_indices=False,
    )
    return dequantized_around(cache, scale, rows_in_cache_layout(rows, cache, axis).to(dtype), idx, axis)


def rows_in_cache_layout(rows: torch.Tensor, cache: torch.Tensor, axis: int) -> torch.Tensor:
    """Projected rows [B, k, C_out] laid out as ``cache`` lays out its tokens ([B, k, C_out], [B, k, H, D] or
    [B, H, k, D] for ``axis`` 1, 1 and 2)."""
    if cache.dim() == 3:
        return rows
    if axis == 1:
        return rows.unflatten(-1, tuple(cache.shape[2:]))
    return rows.unflatten(-1, (cache.shape[1], cache.shape[3])).transpose(1, 2)


def rope_cos_sin(table: torch.Tensor, axis: int, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [Bt, N, D/2] of a RoPE table given as real pairs [..., N, ..., D/2, 2].

    The table broadcasts against ``ndim``-d keys (without the pair dim) with tokens on ``axis``.
    """
    while table.dim() < ndim + 1:
        table = table.unsqueeze(0)
    table = table.movedim(axis, 1)
    table = table.reshape(table.shape[0], table.shape[1], table.shape[-2], 2)
    return table[..., 0], table[..., 1]
