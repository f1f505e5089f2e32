"""Triton kernel: a token projection whose epilogue writes each output row straight into its cache slot.

cache[b, idx[b, i] + row_offset, :] = epilogue(x[b, i, :] @ W^T + bias)

The output columns are computed as (even, odd) pairs, two accumulators per tile, so the RoPE
epilogue (which rotates column pairs 2p, 2p+1 within a head) has both halves of each pair in
registers. Columns are grouped in segments of ``SEG`` columns: with a norm a segment is one norm
group (a head for a per-head q/k norm, every column for a norm across heads) and one program
covers a whole segment, so the norm's statistics never leave the program. Accumulation is fp32
for every input dtype; the epilogue runs in fp32 and the store casts to the cache's dtype.

Import this module only where a kernel is launched: ``triton.jit`` reads ``TRITON_INTERPRET``
when the module is imported.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NORM_KINDS = {"none": 0, "layer_norm": 1, "rms_norm": 2}


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # Triton >= 3.4; older releases read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs() -> list[triton.Config]:
    if _interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=1)]
    # The last two suit wide norm groups (a norm across all heads puts a whole group in one tile): a
    # config that runs out of registers or shared memory is skipped by the autotuner.
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for m, k, w, s in [
            (32, 64, 4, 3),
            (64, 32, 4, 3),
            (64, 64, 4, 3),
            (128, 32, 8, 3),
            (16, 64, 4, 4),
            (32, 32, 8, 2),
            (16, 32, 8, 2),
        ]
    ]


#: The autotuner's key. ``K_BUCKET``, the active-row count rounded up to a power of two, keeps the tile chosen at
#: one k (the capture step's k = N, the first launch) from serving every later step at a much smaller k.
AUTOTUNE_KEY = ["C_IN", "C_OUT", "SEG", "NORM", "HAS_ROPE", "QUANT", "BLOCK_P", "K_BUCKET"]


@triton.autotune(configs=_configs(), key=AUTOTUNE_KEY)
@triton.jit
def _linear_scatter_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    idx_ptr,
    cache_ptr,
    norm_w_ptr,
    norm_b_ptr,
    cos_ptr,
    sin_ptr,
    scale_ptr,
    rows_ptr,
    K_ROWS,
    K_BUCKET,  # triton.next_power_of_2(K_ROWS): read by the autotuner's key only
    C_IN,
    C_OUT,
    SEG,
    HEAD_DIM,
    ROW_OFFSET,
    EPS,
    stride_xb,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ib,
    stride_im,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_cd,
    stride_cos_b,
    stride_cos_t,
    stride_cos_p,
    stride_sin_b,
    stride_sin_t,
    stride_sin_p,
    stride_sb,
    stride_st,
    stride_sg,
    stride_rb,
    stride_rm,
    stride_rc,
    QGROUP,
    FP8_MAX,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_NORM_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    HAS_ROPE: tl.constexpr,
    QUANT: tl.constexpr,
    GROUPS_PER_SEG: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)

    blocks_per_seg = tl.cdiv(tl.cdiv(SEG, 2), BLOCK_P)
    seg = pid_n // blocks_per_seg
    pair = (pid_n % blocks_per_seg) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_seg_e = 2 * pair
    in_seg_o = 2 * pair + 1
    mask_e = in_seg_e < SEG
    mask_o = in_seg_o < SEG
    col_e = seg * SEG + in_seg_e
    col_o = seg * SEG + in_seg_o

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < K_ROWS

    acc_e = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    x_row_ptr = x_ptr + b * stride_xb + rows[:, None] * stride_xm
    for k0 in range(0, C_IN, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < C_IN
        x = tl.load(x_row_ptr + kk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w_e = tl.load(
            w_ptr + col_e[None, :] * stride_wn + kk[:, None] * stride_wk,
            mask=mask_k[:, None] & mask_e[None, :],
            other=0.0,
        )
        w_o = tl.load(
            w_ptr + col_o[None, :] * stride_wn + kk[:, None] * stride_wk,
            mask=mask_k[:, None] & mask_o[None, :],
            other=0.0,
        )
        if UPCAST_DOT:
            # Triton's interpreter multiplies bf16 operands wrongly; it runs the product in fp32.
            x = x.to(tl.float32)
            w_e = w_e.to(tl.float32)
            w_o = w_o.to(tl.float32)
        acc_e = tl.dot(x, w_e, acc_e, input_precision=DOT_PRECISION)
        acc_o = tl.dot(x, w_o, acc_o, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc_e += tl.load(bias_ptr + col_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
        acc_o += tl.load(bias_ptr + col_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]

    if NORM != 0:
        acc_e = tl.where(mask_e[None, :], acc_e, 0.0)
        acc_o = tl.where(mask_o[None, :], acc_o, 0.0)
        if NORM == 1:
            mean = (tl.sum(acc_e, axis=1) + tl.sum(acc_o, axis=1)) / SEG
            acc_e = tl.where(mask_e[None, :], acc_e - mean[:, None], 0.0)
            acc_o = tl.where(mask_o[None, :], acc_o - mean[:, None], 0.0)
        var = (tl.sum(acc_e * acc_e, axis=1) + tl.sum(acc_o * acc_o, axis=1)) / SEG
        rstd = 1.0 / tl.sqrt(var + EPS)
        acc_e = acc_e * rstd[:, None]
        acc_o = acc_o * rstd[:, None]
        if HAS_NORM_WEIGHT:
            acc_e *= tl.load(norm_w_ptr + in_seg_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
            acc_o *= tl.load(norm_w_ptr + in_seg_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]
        if HAS_NORM_BIAS:
            acc_e += tl.load(norm_b_ptr + in_seg_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
            acc_o += tl.load(norm_b_ptr + in_seg_o, mask=mask_o, other=0.0).to(tl.float32)[None, :]

    token = tl.load(idx_ptr + b * stride_ib + rows * stride_im, mask=mask_m, other=0)
    head = col_e // HEAD_DIM
    dim_e = col_e % HEAD_DIM

    if HAS_ROPE:
        rope_mask = mask_m[:, None] & mask_e[None, :]
        pair_in_head = (dim_e // 2)[None, :]
        cos = tl.load(
            cos_ptr + b * stride_cos_b + token[:, None] * stride_cos_t + pair_in_head * stride_cos_p,
            mask=rope_mask,
            other=0.0,
        ).to(tl.float32)
        sin = tl.load(
            sin_ptr + b * stride_sin_b + token[:, None] * stride_sin_t + pair_in_head * stride_sin_p,
            mask=rope_mask,
            other=0.0,
        ).to(tl.float32)
        rotated_e = acc_e * cos - acc_o * sin
        acc_o = acc_e * sin + acc_o * cos
        acc_e = rotated_e

    store_e = mask_m[:, None] & mask_e[None, :]
    store_o = mask_m[:, None] & mask_o[None, :]
    if QUANT:
        # The rows as the model's dtype holds them: attention reads these, and they are what gets quantized.
        row_ty = rows_ptr.dtype.element_ty
        acc_e = acc_e.to(row_ty).to(tl.float32)
        acc_o = acc_o.to(row_ty).to(tl.float32)
        out_rows = rows_ptr + b * stride_rb + rows[:, None] * stride_rm
        tl.store(out_rows + col_e[None, :] * stride_rc, acc_e.to(row_ty), mask=store_e)
        tl.store(out_rows + col_o[None, :] * stride_rc, acc_o.to(row_ty), mask=store_o)
        # One scale per row of each quantization group (a head, or every column of a cache without a head axis):
        # the program holds whole groups, so each group's largest magnitude is a masked row maximum.
        group_e = in_seg_e // QGROUP
        group_o = in_seg_o // QGROUP
        scale_e = tl.full((BLOCK_M, BLOCK_P), 1.0, tl.float32)
        scale_o = tl.full((BLOCK_M, BLOCK_P), 1.0, tl.float32)
        for g in tl.static_range(GROUPS_PER_SEG):
            in_e = (group_e == g) & mask_e
            in_o = (group_o == g) & mask_o
            amax_e = tl.max(tl.where(in_e[None, :], tl.abs(acc_e), 0.0), axis=1)
            amax_o = tl.max(tl.where(in_o[None, :], tl.abs(acc_o), 0.0), axis=1)
            scale = tl.maximum(tl.maximum(amax_e, amax_o) / FP8_MAX, 1.1754943508222875e-38)
            scale_e = tl.where(in_e[None, :], scale[:, None], scale_e)
            scale_o = tl.where(in_o[None, :], scale[:, None], scale_o)
            group = seg * GROUPS_PER_SEG + g
            tl.store(scale_ptr + b * stride_sb + token * stride_st + group * stride_sg, scale, mask=mask_m)
        acc_e = _round_to_e4m3(tl.div_rn(acc_e, scale_e))
        acc_o = _round_to_e4m3(tl.div_rn(acc_o, scale_o))

    out_ty = cache_ptr.dtype.element_ty
    row_ptr = cache_ptr + b * stride_cb + (token + ROW_OFFSET)[:, None] * stride_ct
    ptr_e = row_ptr + (head * stride_ch + dim_e * stride_cd)[None, :]
    ptr_o = row_ptr + ((col_o // HEAD_DIM) * stride_ch + (col_o % HEAD_DIM) * stride_cd)[None, :]
    tl.store(ptr_e, acc_e.to(out_ty), mask=store_e)
    tl.store(ptr_o, acc_o.to(out_ty), mask=store_o)


@triton.jit
def _round_to_e4m3(v):
    """``v`` (within e4m3's range) rounded to the nearest e4m3 value, ties to even, in fp32 arithmetic: the store's
    cast to float8 then has nothing left to round, so hardware and Triton's interpreter (whose float8 conversion
    drops the carry of a mantissa that rounds up to the next power of two) write the same bytes as torch's cast."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3  # of one e4m3 step at v (subnormals below 2^-6)
    step = ((exponent + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
    # adding and taking away 1.5 * 2^23 rounds an fp32 of magnitude below 2^22 to an integer, ties to even
    rounded = ((tl.abs(v) * inv_step + 12582912.0) - 12582912.0) * step
    return tl.where(v < 0, -rounded, rounded)


def k_bucket(rows: int) -> int:
    """The autotuner's bucket of an active-row count: the next power of two (k = N and k = N / 4 tune apart)."""
    return triton.next_power_of_2(max(int(rows), 1))


def _pair_block(seg: int, whole_segment: bool) -> int:
    """Pairs per program: a whole segment (a norm group, or a quantization group) when the epilogue reduces over it,
    else a fixed tile (>= 16 for tl.dot)."""
    if whole_segment:
        return max(16, triton.next_power_of_2((seg + 1) // 2))
    return 32


def launch(
    cache4: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    *,
    row_offset: int,
    norm: str,
    norm_group: int,
    norm_weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    rope_cos: torch.Tensor | None,
    rope_sin: torch.Tensor | None,
    scale4: torch.Tensor | None = None,
    rows_out: torch.Tensor | None = None,
    quant_group: int = -1,
) -> None:
    """Run the kernel on validated inputs. ``cache4`` is the cache viewed as [B, T, H, D] (any strides);
    ``rope_cos``/``rope_sin`` are [Bt, N, D/2] with Bt 1 or B.

    A float8 cache comes with ``scale4`` (its scales viewed as [B, T, G, 1], one per ``quant_group`` columns, which
    divides ``norm_group``) and ``rows_out`` [B, k, C_out] in x's dtype, which receives the rows unquantized."""
    batch, rows, c_in = x.shape
    c_out = weight.shape[0]
    head_dim = cache4.shape[3]
    has_norm = norm != "none"
    quant = scale4 is not None
    seg = norm_group if has_norm else (quant_group if quant else c_out)
    block_p = _pair_block(seg, has_norm or quant)
    segments = c_out // seg
    blocks_per_seg = triton.cdiv(triton.cdiv(seg, 2), block_p)
    dummy = x  # never read: the constexpr flags switch the loads off
    cos = rope_cos if rope_cos is not None else dummy.new_zeros(1, 1, 1)
    sin = rope_sin if rope_sin is not None else dummy.new_zeros(1, 1, 1)

    def cos_strides(t):
        return (0 if t.shape[0] == 1 else t.stride(0), t.stride(1), t.stride(2))

    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), segments * blocks_per_seg, batch)  # noqa: E731
    _linear_scatter_kernel[grid](
        x,
        weight,
        bias if bias is not None else dummy,
        idx,
        cache4,
        norm_weight if norm_weight is not None else dummy,
        norm_bias if norm_bias is not None else dummy,
        cos,
        sin,
        scale4 if quant else dummy,
        rows_out if quant else dummy,
        rows,
        k_bucket(rows),
        c_in,
        c_out,
        seg,
        head_dim,
        row_offset,
        eps,
        *x.stride(),
        *weight.stride(),
        *idx.stride(),
        *cache4.stride(),
        *cos_strides(cos),
        *cos_strides(sin),
        *((scale4.stride(0), scale4.stride(1), scale4.stride(2)) if quant else (0, 0, 0)),
        *(rows_out.stride() if quant else (0, 0, 0)),
        quant_group if quant else 1,
        torch.finfo(cache4.dtype).max if quant else 1.0,
        HAS_BIAS=bias is not None,
        NORM=NORM_KINDS[norm],
        HAS_NORM_WEIGHT=norm_weight is not None,
        HAS_NORM_BIAS=norm_bias is not None,
        HAS_ROPE=rope_cos is not None,
        QUANT=quant,
        GROUPS_PER_SEG=seg // quant_group if quant else 1,
        UPCAST_DOT=_interpreting(),
        # fp32 products stay fp32 (torch's default for matmul); half types use the tensor cores as usual
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_P=block_p,
    )
