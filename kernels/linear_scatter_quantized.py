"""``torch.ops.rascompile.linear_scatter_quantized_``: ``linear_scatter_`` into a float8 cache with per-row scales.

    rows = rope(norm(x @ weight.T + bias))                    (in x's dtype, returned)
    cache[b, idx[b, i]], scale[b, idx[b, i]] = quantize(rows[b, i])

The projection and epilogue are ``linear_scatter_``'s; the cache is float8 (e4m3) and ``scale`` holds a float32
scale per row of the cache's last dim (one head of one token for [B, T, H, D] / [B, H, T, D] caches, one token for a
[B, T, C_out] cache), shaped like the cache with a last dim of 1. Each row is divided by its scale, chosen so that its
largest magnitude is float8's largest, and rounded to nearest. The rows are quantized as x's dtype holds them, and
returned unquantized ([B, k, C_out]): attention reads the step's own rows at full precision. Triton on CUDA (the
quantization is the kernel's epilogue, so the rows reach memory once as float8 and once in x's dtype), plain torch
elsewhere.
"""

from __future__ import annotations

if __name__ != "rascompile.kernels.linear_scatter_quantized":
    # A second name would define rascompile::linear_scatter_quantized_ again (see linear_scatter.py).
    raise ImportError(
        f"import rascompile.kernels.linear_scatter_quantized, not {__name__!r}: it defines the op "
        "rascompile::linear_scatter_quantized_"
    )

import torch

from .linear_scatter import _fail, _shape, _triton_available, check_indices, normalize_arguments, reference_rows

#: The float8 dtypes a quantized cache may have.
FLOAT8_CACHE_DTYPES = (torch.float8_e4m3fn,)


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` as float8 rows and their float32 scales ``[..., 1]``: each row (the last dim) scaled so that its
    largest magnitude is float8's largest."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / torch.finfo(dtype).max).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale).to(dtype), scale


def scale_view(cache: torch.Tensor, scale: torch.Tensor, token_axis: int) -> tuple[torch.Tensor, int]:
    """Check ``scale`` against ``cache``; return it viewed as [B, T, G, 1] and the quantization group (columns per
    scale: the cache's last dim)."""
    expected = [*cache.shape[:-1], 1]
    if list(scale.shape) != expected:
        raise _fail("scale", _shape(scale), f"must be the cache's shape with a last dim of 1: {expected}")
    if scale.dtype != torch.float32:
        raise _fail("scale.dtype", scale.dtype, "must be float32")
    if scale.device != cache.device:
        raise _fail("scale.device", scale.device, f"must be on {cache.device}, the device of the cache")
    if cache.dim() == 3:
        return scale.unsqueeze(-1), int(cache.shape[-1])
    return (scale if token_axis == 1 else scale.transpose(1, 2)), int(cache.shape[-1])


def normalize_quantized(cache, scale, x, weight, bias, idx, token_axis, head_dim, norm, norm_group, *tables):
    """``normalize_arguments`` for a float8 cache, plus its scales: returns the cache as [B, T, H, D], the scales as
    [B, T, G, 1], the head dim, the norm group, the quantization group and the RoPE tables as [Bt, N, D/2]."""
    cache4, head_dim, norm_group, cos, sin = normalize_arguments(
        cache, x, weight, bias, idx, token_axis, head_dim, norm, norm_group, *tables, cache_dtypes=FLOAT8_CACHE_DTYPES
    )
    scale4, quant_group = scale_view(cache, scale, token_axis)
    if norm != "none" and norm_group % quant_group:
        raise _fail(
            "norm_group",
            norm_group,
            f"must be a multiple of the cache's last dim ({quant_group}), the columns of one float8 scale",
        )
    return cache4, scale4, head_dim, norm_group, quant_group, cos, sin


@torch.library.custom_op("rascompile::linear_scatter_quantized_", mutates_args=("cache", "scale"))
def linear_scatter_quantized_(
    cache: torch.Tensor,
    scale: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    token_axis: int = 1,
    head_dim: int = -1,
    norm: str = "none",
    norm_group: int = -1,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    validate_indices: bool = True,
) -> torch.Tensor:
    """Write ``rope(norm(x @ weight.T + bias))`` quantized into ``cache``/``scale`` at rows ``idx``; return the
    rows [B, k, C_out] unquantized, in x's dtype (``validate_indices``: as for ``linear_scatter_``)."""
    tables = (norm_weight, norm_bias, rope_cos, rope_sin)
    cache4, scale4, head_dim, norm_group, quant_group, cos, sin = normalize_quantized(
        cache, scale, x, weight, bias, idx, token_axis, head_dim, norm, norm_group, *tables
    )
    if validate_indices or not x.is_cuda:
        check_indices(idx, cache4.shape[1], 0, None if cos is None else cos.shape[1])
    rows = x.new_empty(x.shape[0], x.shape[1], weight.shape[0])
    if x.is_cuda and _triton_available():
        from . import triton_linear_scatter

        triton_linear_scatter.launch(
            cache4,
            x,
            weight,
            bias,
            idx,
            row_offset=0,
            norm=norm,
            norm_group=norm_group,
            norm_weight=norm_weight,
            norm_bias=norm_bias,
            eps=eps,
            rope_cos=cos,
            rope_sin=sin,
            scale4=scale4,
            rows_out=rows,
            quant_group=quant_group,
        )
        return rows
    exact = reference_rows(x, weight, bias, idx, head_dim, norm, norm_group, norm_weight, norm_bias, eps, cos, sin)
    rows.copy_(exact)
    write_quantized_rows(cache4, scale4, rows, idx, quant_group)
    return rows


def write_quantized_rows(
    cache4: torch.Tensor, scale4: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, quant_group: int
) -> None:
    """Quantize ``rows`` [B, k, C_out] per ``quant_group`` columns into ``cache4`` [B, T, H, D] (float8) and their
    scales into ``scale4`` [B, T, G, 1] at rows ``idx``, in place."""
    quantized, scales = quantize_rows(rows.unflatten(-1, (-1, quant_group)), cache4.dtype)
    batch = torch.arange(idx.shape[0], device=idx.device)[:, None]
    at = idx.long()
    # index_put has no float8 kernels: write the bytes
    cache4.view(torch.uint8)[batch, at] = quantized.flatten(-2).unflatten(-1, cache4.shape[2:]).view(torch.uint8)
    scale4[batch, at] = scales


@linear_scatter_quantized_.register_fake
def _(
    cache,
    scale,
    x,
    weight,
    bias,
    idx,
    token_axis=1,
    head_dim=-1,
    norm="none",
    norm_group=-1,
    norm_weight=None,
    norm_bias=None,
    eps=1e-6,
    rope_cos=None,
    rope_sin=None,
    validate_indices=True,
):
    tables = (norm_weight, norm_bias, rope_cos, rope_sin)
    normalize_quantized(cache, scale, x, weight, bias, idx, token_axis, head_dim, norm, norm_group, *tables)
    return x.new_empty(x.shape[0], x.shape[1], weight.shape[0])
