"""Plain torch versions of the ops in ``ops.py``, for exporters: no custom ops, no complex numbers.

``lower_for_export`` swaps them in. They write into their cache arguments in place, as the
originals do; the export wrapper hands them fresh copies of the caches and returns those, so the
exported graph is a pure function (ScatterElements / ScatterND in ONNX).
"""

from __future__ import annotations

import torch

from rascompile.kernels.linear_scatter import normalize_arguments, reference_rows, write_rows

from ..ops import joint_around, rope_cos_sin, scatter_rows, write_joint_sequence


def update_kv_cache(cache: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    scatter_rows(cache, fresh, idx, axis)
    return cache


def update_joint_rows_cache(cache, fresh, idx, axis: int, offset: int) -> torch.Tensor:
    k = idx.shape[1]
    scatter_rows(cache, fresh.narrow(axis, offset, k), idx, axis)
    return joint_around(cache, fresh, axis, offset, k)


def update_joint_kv_cache(cache, parts, idx, axis: int, image_part: int) -> torch.Tensor:
    return write_joint_sequence(cache, parts, idx, axis, image_part, scatter_rows)


def merge_output(cache: torch.Tensor, fresh: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    scatter_rows(cache, fresh, idx, 1)
    return cache.to(fresh.dtype, copy=True)


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
    """``ops.fused_kv_update`` decomposed: projection, norm, RoPE, row scatter. ``rope_table`` holds
    real (cos, sin) pairs [..., D/2, 2] instead of complex numbers."""
    cos = sin = None
    if rope_table is not None:
        cos, sin = rope_cos_sin(rope_table, rope_axis, rope_ndim)
    tables = dict(norm_weight=norm_weight, norm_bias=norm_bias, rope_cos=cos, rope_sin=sin)
    cache4, head_dim, norm_group, cos, sin = normalize_arguments(
        cache, x, weight, bias, idx, token_axis=axis, head_dim=head_dim, norm=norm, norm_group=norm_group, **tables
    )
    rows = reference_rows(
        x,
        weight,
        bias,
        idx,
        head_dim=head_dim,
        norm=norm,
        norm_group=norm_group,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        eps=eps,
        rope_cos=cos,
        rope_sin=sin,
    )
    write_rows(cache4, rows, idx, row_offset)
    return cache


def rope_real(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``view_as_real(view_as_complex(x) * view_as_complex(table))`` in real arithmetic.

    ``x`` holds (real, imaginary) pairs [..., 2]; ``table`` too, broadcastable to ``x``.
    """
    xr, xi = x[..., 0], x[..., 1]
    tr, ti = table[..., 0], table[..., 1]
    return torch.stack([xr * tr - xi * ti, xr * ti + xi * tr], dim=-1)
