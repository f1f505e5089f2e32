"""``torch.ops.rascompile.linear_scatter_``: project the active tokens and write them into a K/V cache.

    cache[b, idx[b, i] + row_offset] = rope(norm(x[b, i] @ weight.T + bias))

One opaque op that mutates ``cache``: Triton on CUDA, plain torch elsewhere, a fake
implementation for tracing, so a graph that uses it runs on every device and inductor keeps it
as one node. The epilogue:

- ``norm``: ``"none"``, ``"layer_norm"`` or ``"rms_norm"`` over groups of ``norm_group``
  consecutive output columns (the head dim for a per-head q/k norm, every column for a norm
  across heads), with optional ``norm_weight``/``norm_bias`` of length ``norm_group``.
- RoPE: ``rope_cos``/``rope_sin`` of shape [N, D/2] or [1 or B, N, D/2], read at each token's
  position ``idx[b, i]``; pairs of columns (2p, 2p+1) within each head of ``head_dim`` columns are
  rotated, as in diffusers' ``apply_rotary_emb`` with interleaved pairs (Lumina-Next, Flux).

Cache layouts: [B, T, C_out] (``token_axis`` 1), or split into heads [B, T, H, D] (``token_axis``
1) or [B, H, T, D] (``token_axis`` 2), any strides; ``row_offset`` places the image rows inside a
joint [image ; text] cache. The product accumulates in fp32 and the epilogue runs in fp32 for
fp16, bf16 and fp32 inputs; the result is cast to the cache's dtype.
"""

from __future__ import annotations

if __name__ != "rascompile.kernels.linear_scatter":
    # Run under a second name (say top-level ``kernels.linear_scatter`` from a checkout) this module would define
    # rascompile::linear_scatter_ again, and torch.library would destroy the definition every caller already holds.
    raise ImportError(
        f"import rascompile.kernels.linear_scatter, not {__name__!r}: it defines the op rascompile::linear_scatter_"
    )

import warnings

import torch
import torch.nn.functional as F

NORMS = ("none", "layer_norm", "rms_norm")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fail(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"linear_scatter_: {name} is {value}; {allowed}")


def _shape(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}"


def _check_float(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise _fail(f"{name}.dtype", t.dtype, "must be one of float16, bfloat16, float32")
    if t.device != device:
        raise _fail(f"{name}.device", t.device, f"must be on {device}, the device of x")


def normalize_arguments(
    cache: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    token_axis: int,
    head_dim: int,
    norm: str,
    norm_group: int,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    cache_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> tuple[torch.Tensor, int, int, torch.Tensor | None, torch.Tensor | None]:
    """Check shapes, dtypes and devices (metadata only, so it also runs on fake tensors).

    Returns the cache viewed as [B, T, H, D], the head dim, the norm group, and the RoPE tables
    as [Bt, N, D/2]. ``cache_dtypes``: the cache dtypes the caller writes (float8 only for a quantized write).
    """
    device = x.device
    if x.dim() != 3:
        raise _fail("x", _shape(x), "must be [B, k, C_in]")
    batch, rows, c_in = x.shape
    _check_float("x", x, device)
    if weight.dim() != 2 or weight.shape[1] != c_in:
        raise _fail("weight", _shape(weight), f"must be [C_out, C_in] with C_in = {c_in} (from x)")
    c_out = weight.shape[0]
    _check_float("weight", weight, device)
    if weight.dtype != x.dtype:
        raise _fail("weight.dtype", weight.dtype, f"must equal x.dtype ({x.dtype})")
    if bias is not None:
        _check_float("bias", bias, device)
        if tuple(bias.shape) != (c_out,):
            raise _fail("bias", _shape(bias), f"must be [C_out] = [{c_out}]")
        if bias.dtype != x.dtype:
            raise _fail("bias.dtype", bias.dtype, f"must equal x.dtype ({x.dtype})")
    if idx.dim() != 2 or tuple(idx.shape) != (batch, rows):
        raise _fail("idx", _shape(idx), f"must be [B, k] = [{batch}, {rows}] (from x)")
    if idx.dtype not in (torch.int64, torch.int32):
        raise _fail("idx.dtype", idx.dtype, "must be int64 or int32")
    if idx.device != device:
        raise _fail("idx.device", idx.device, f"must be on {device}, the device of x")
    if cache.dtype not in cache_dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in cache_dtypes)
        raise _fail("cache.dtype", cache.dtype, f"must be one of {names}")
    if cache.device != device:
        raise _fail("cache.device", cache.device, f"must be on {device}, the device of x")

    if cache.dim() == 3:
        if token_axis != 1:
            raise _fail("token_axis", token_axis, "must be 1 for a cache of shape [B, T, C_out]")
        if cache.shape[0] != batch or cache.shape[2] != c_out:
            raise _fail("cache", _shape(cache), f"must be [B, T, C_out] = [{batch}, T, {c_out}]")
        head_dim = c_out if head_dim == -1 else head_dim
        if head_dim <= 0 or c_out % head_dim:
            raise _fail("head_dim", head_dim, f"must divide C_out = {c_out}")
        cache4 = cache.unflatten(2, (c_out // head_dim, head_dim))
    elif cache.dim() == 4:
        if token_axis not in (1, 2):
            raise _fail("token_axis", token_axis, "must be 1 ([B, T, H, D]) or 2 ([B, H, T, D]) for a 4-d cache")
        cache4 = cache if token_axis == 1 else cache.transpose(1, 2)
        heads, dim = cache4.shape[2], cache4.shape[3]
        if cache4.shape[0] != batch or heads * dim != c_out:
            raise _fail("cache", _shape(cache), f"must hold B = {batch} rows of H x D = C_out = {c_out} columns")
        if head_dim not in (-1, dim):
            raise _fail("head_dim", head_dim, f"must be -1 or the cache's head dim {dim}")
        head_dim = dim
    else:
        raise _fail("cache", _shape(cache), "must be [B, T, C_out], [B, T, H, D] or [B, H, T, D]")

    if norm not in NORMS:
        raise _fail("norm", repr(norm), f"must be one of {', '.join(NORMS)}")
    if norm == "none":
        if norm_weight is not None or norm_bias is not None:
            raise _fail("norm_weight", "given", "needs norm='layer_norm' or 'rms_norm'")
        norm_group = c_out
    else:
        norm_group = c_out if norm_group == -1 else norm_group
        if norm_group <= 0 or c_out % norm_group:
            raise _fail("norm_group", norm_group, f"must divide C_out = {c_out}")
        for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
            if t is not None:
                _check_float(name, t, device)
                if tuple(t.shape) != (norm_group,):
                    raise _fail(name, _shape(t), f"must be [norm_group] = [{norm_group}]")

    if (rope_cos is None) != (rope_sin is None):
        raise _fail("rope_sin" if rope_sin is None else "rope_cos", None, "RoPE needs both rope_cos and rope_sin")
    if rope_cos is not None:
        if head_dim % 2:
            raise _fail("head_dim", head_dim, "must be even for RoPE")
        if norm != "none" and norm_group % 2:
            raise _fail("norm_group", norm_group, "must be even with RoPE (a norm group holds whole column pairs)")
        tables = []
        for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            _check_float(name, t, device)
            t = t.unsqueeze(0) if t.dim() == 2 else t
            if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[2] != head_dim // 2:
                raise _fail(name, _shape(t), f"must be [N, D/2] or [1 or B, N, D/2] with D/2 = {head_dim // 2}")
            tables.append(t)
        if tables[0].shape[1] != tables[1].shape[1]:
            raise _fail("rope_sin", _shape(rope_sin), f"must have as many positions as rope_cos ({_shape(rope_cos)})")
        rope_cos, rope_sin = tables
    return cache4, head_dim, norm_group, rope_cos, rope_sin


def check_indices(idx: torch.Tensor, num_rows: int, row_offset: int, num_positions: int | None) -> None:
    """Every index addresses a cache row (and a RoPE position); needs the values, so it syncs on CUDA."""
    if idx.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(idx))
    limit = num_rows - row_offset
    if num_positions is not None:
        limit = min(limit, num_positions)
    if lo < 0 or hi >= limit:
        raise _fail(
            "idx",
            f"in [{lo}, {hi}]",
            f"indices must lie in [0, {limit - 1}] (cache rows {num_rows}, row_offset {row_offset}"
            + (f", RoPE positions {num_positions})" if num_positions is not None else ")"),
        )


def reference_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    head_dim: int,
    norm: str,
    norm_group: int,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
) -> torch.Tensor:
    """The op's rows [B, k, C_out] in fp32, in plain torch (tables already [Bt, N, D/2])."""
    f32 = lambda t: None if t is None else t.float()  # noqa: E731
    y = F.linear(x.float(), weight.float(), f32(bias))
    if norm != "none":
        groups = y.unflatten(-1, (-1, norm_group))
        if norm == "layer_norm":
            groups = F.layer_norm(groups, (norm_group,), f32(norm_weight), f32(norm_bias), eps)
        else:
            groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + eps)
            if norm_weight is not None:
                groups = groups * norm_weight.float()
            if norm_bias is not None:
                groups = groups + norm_bias.float()
        y = groups.flatten(-2)
    if rope_cos is not None:
        batch = idx.shape[0]
        cos = rope_cos.float().expand(batch, -1, -1)
        sin = rope_sin.float().expand(batch, -1, -1)
        at = idx.long()[:, :, None].expand(-1, -1, cos.shape[2])
        cos = torch.gather(cos, 1, at)[:, :, None, :]  # [B, k, 1, D/2]
        sin = torch.gather(sin, 1, at)[:, :, None, :]
        pairs = y.unflatten(-1, (-1, head_dim // 2, 2))  # [B, k, H, D/2, 2]
        even, odd = pairs[..., 0], pairs[..., 1]
        y = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-3)
    return y


@torch.library.custom_op("rascompile::linear_scatter_", mutates_args=("cache",))
def linear_scatter_(
    cache: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    token_axis: int = 1,
    head_dim: int = -1,
    row_offset: int = 0,
    norm: str = "none",
    norm_group: int = -1,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
    validate_indices: bool = True,
) -> None:
    """``cache[b, idx[b, i] + row_offset] = rope(norm(x[b, i] @ weight.T + bias))``, in place.

    ``validate_indices=False`` skips the index range check, which reads ``idx`` (a device sync on
    CUDA); the RAS graphs pass it because their indices come from a top-k over the N tokens.
    """
    cache4, head_dim, norm_group, cos, sin = normalize_arguments(
        cache, x, weight, bias, idx, token_axis, head_dim, norm, norm_group, norm_weight, norm_bias, rope_cos, rope_sin
    )
    if validate_indices or not x.is_cuda:
        check_indices(idx, cache4.shape[1], row_offset, None if cos is None else cos.shape[1])
    if x.is_cuda and _triton_available():
        from . import triton_linear_scatter

        triton_linear_scatter.launch(
            cache4,
            x,
            weight,
            bias,
            idx,
            row_offset=row_offset,
            norm=norm,
            norm_group=norm_group,
            norm_weight=norm_weight,
            norm_bias=norm_bias,
            eps=eps,
            rope_cos=cos,
            rope_sin=sin,
        )
        return
    rows = reference_rows(x, weight, bias, idx, head_dim, norm, norm_group, norm_weight, norm_bias, eps, cos, sin)
    write_rows(cache4, rows, idx, row_offset)


def write_rows(cache4: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, row_offset: int) -> None:
    """``cache4[b, idx[b, i] + row_offset] = rows[b, i]`` for a cache viewed as [B, T, H, D], in place."""
    batch = torch.arange(idx.shape[0], device=idx.device)[:, None]
    cache4[batch, idx.long() + row_offset] = rows.unflatten(-1, (cache4.shape[2], cache4.shape[3])).to(cache4.dtype)


@linear_scatter_.register_fake
def _(
    cache,
    x,
    weight,
    bias,
    idx,
    token_axis=1,
    head_dim=-1,
    row_offset=0,
    norm="none",
    norm_group=-1,
    norm_weight=None,
    norm_bias=None,
    eps=1e-6,
    rope_cos=None,
    rope_sin=None,
    validate_indices=True,
) -> None:
    normalize_arguments(
        cache, x, weight, bias, idx, token_axis, head_dim, norm, norm_group, norm_weight, norm_bias, rope_cos, rope_sin
    )
    return None


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        warnings.warn(
            "rascompile: Triton is not installed, so linear_scatter_ runs its plain torch version on CUDA",
            stacklevel=3,
        )
        return False
    return True
