"""Benchmark of ``torch.ops.rascompile.linear_scatter_`` against the same work done in separate torch ops.

For each model's K/V projection (table ``MODELS`` below) at 1024x1024 (N = 4096 image tokens, batch 2
for classifier-free guidance), each sample ratio (k = ratio * N active tokens) and each dtype, it times:

- fused: one ``linear_scatter_`` call (``validate_indices=False``): projection, norm, RoPE and the
  scatter into the cache rows in one Triton kernel;
- unfused: ``F.linear``, then the model's norm (``F.layer_norm`` / RMSNorm math), then RoPE
  (``view_as_complex`` multiply, as Lumina-Next does), then ``index_put_`` into the cache rows;
- matmul + copy: ``F.linear`` and ``index_put_`` only, no norm and no RoPE;
- fused float8 / unfused float8 (``fused_fp8``, ``unfused_fp8``): the same into a float8 cache with per-row scales
  (``RASConfig.kv_cache_dtype="fp8_e4m3"``): one ``linear_scatter_quantized_`` call against the unfused ops, then
  the quantization and two ``index_put_`` (rows and scales).

Before timing, the fused op's cache must equal the unfused one (``torch.testing.assert_close`` with a
tolerance for the dtype); a mismatch stops the run with an error. Times are medians of
``triton.testing.do_bench`` per call, launch overhead included. TFLOP/s counts the projection,
2 * B * k * C_in * C_out. Bytes moved are a lower bound: x, weight, bias, norm weights, the RoPE table
entries at the active positions (fp32 cos and sin) and the indices read once, the cache rows written
once; the unfused ops add one y-sized intermediate written and read back per separate step.

    python benchmarks/kernel_speed.py [--dtype bfloat16 float16 float32] [--ratios 0.5 0.25] [--json PATH]

Needs a CUDA device; without one it prints a line saying so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import rascompile.kernels.linear_scatter  # noqa: F401  (registers torch.ops.rascompile.linear_scatter_)
from rascompile.kernels.linear_scatter_quantized import quantize_rows

IMAGE_TOKENS = 4096  # 1024x1024 image, 2x2 patches of the 128x128 latent
BATCH = 2  # classifier-free guidance
TABLE_BYTES = 4  # the RoPE cos/sin tables are fp32, as Lumina-Next's complex64 freqs_cis


@dataclass(frozen=True)
class Shape:
    c_in: int
    heads: int
    head_dim: int
    bias: bool
    norm: str = "none"  # "none", "layer_norm" or "rms_norm"
    norm_group: int = -1
    norm_bias: bool = False  # the norm has a weight; a bias too for LayerNorm
    eps: float = 1e-6
    rope: bool = False
    text_tokens: int = 0  # joint [image ; text] cache rows after the image rows
    token_axis: int = 1  # cache [B, T, H, D] (1) or [B, H, T, D] (2)

    @property
    def c_out(self) -> int:
        return self.heads * self.head_dim


# fmt: off
MODELS = {
    "sd3-medium": Shape(c_in=1536, heads=24, head_dim=64, bias=True, text_tokens=333, token_axis=2),
    "sd3.5-medium": Shape(c_in=1536, heads=24, head_dim=64, bias=True, norm="rms_norm", norm_group=64,
                          text_tokens=333, token_axis=2),
    "lumina-next-2b": Shape(c_in=2304, heads=8, head_dim=72, bias=False, norm="layer_norm", norm_group=576,
                            norm_bias=True, eps=1e-5, rope=True),
}
# fmt: on
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}  # atol = rtol


def active_tokens(ratio: float, n: int = IMAGE_TOKENS) -> int:
    return int(ratio * n)


def flops(s: Shape, k: int, batch: int = BATCH) -> int:
    return 2 * batch * k * s.c_in * s.c_out


def fused_bytes(s: Shape, k: int, elem: int, batch: int = BATCH, epilogue: bool = True) -> int:
    """Bytes read and written once: x, weight, bias, indices, cache rows (+ norm weights, RoPE entries)."""
    total = (batch * k * s.c_in + s.c_out * s.c_in + s.bias * s.c_out + batch * k * s.c_out) * elem + batch * k * 8
    if epilogue and s.norm != "none":
        total += (1 + s.norm_bias) * s.norm_group * elem
    if epilogue and s.rope:
        total += 2 * batch * k * (s.head_dim // 2) * TABLE_BYTES
    return total


def unfused_bytes(s: Shape, k: int, elem: int, batch: int = BATCH, epilogue: bool = True) -> int:
    """``fused_bytes`` plus, for each separate step, a [B, k, C_out] intermediate written and read back."""
    steps = 1 + (epilogue and s.norm != "none") + (epilogue and s.rope)
    return fused_bytes(s, k, elem, batch, epilogue) + steps * 2 * batch * k * s.c_out * elem


def make_inputs(s: Shape, k: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)
    t = {
        "x": rand(BATCH, k, s.c_in),
        "weight": rand(s.c_out, s.c_in, scale=s.c_in**-0.5),
        "bias": rand(s.c_out, scale=0.1) if s.bias else None,
        "idx": torch.stack([torch.randperm(IMAGE_TOKENS, generator=g)[:k] for _ in range(BATCH)]).to(device),
        "norm_weight": None,
        "norm_bias": None,
        "cos": None,
        "sin": None,
        "freqs_cis": None,
    }
    if s.norm != "none":
        t["norm_weight"] = 1 + rand(s.norm_group, scale=0.1)
        t["norm_bias"] = rand(s.norm_group, scale=0.1) if s.norm_bias else None
    if s.rope:
        inv_freq = 10000.0 ** (-torch.arange(s.head_dim // 2) / (s.head_dim // 2))
        angles = torch.arange(IMAGE_TOKENS)[:, None] * inv_freq[None, :]
        t["cos"], t["sin"] = angles.cos().to(device), angles.sin().to(device)
        t["freqs_cis"] = torch.polar(torch.ones_like(angles), angles).to(device)
    shape = (BATCH, s.heads, IMAGE_TOKENS + s.text_tokens, s.head_dim)
    if s.token_axis == 1:
        shape = (BATCH, IMAGE_TOKENS + s.text_tokens, s.heads, s.head_dim)
    t["cache"] = torch.zeros(shape, device=device, dtype=dtype)
    t["cache_fp8"] = torch.zeros(shape, device=device, dtype=torch.float8_e4m3fn)
    t["scale"] = torch.ones(*shape[:-1], 1, device=device)
    t["batch_index"] = torch.arange(BATCH, device=device)[:, None]
    return t


def fused(s: Shape, t: dict) -> None:
    torch.ops.rascompile.linear_scatter_(
        t["cache"], t["x"], t["weight"], t["bias"], t["idx"], token_axis=s.token_axis, head_dim=s.head_dim,
        row_offset=0, norm=s.norm, norm_group=s.norm_group, norm_weight=t["norm_weight"], norm_bias=t["norm_bias"],
        eps=s.eps, rope_cos=t["cos"], rope_sin=t["sin"], validate_indices=False,
    )  # fmt: skip


def fused_fp8(s: Shape, t: dict) -> None:
    torch.ops.rascompile.linear_scatter_quantized_(
        t["cache_fp8"], t["scale"], t["x"], t["weight"], t["bias"], t["idx"], token_axis=s.token_axis,
        head_dim=s.head_dim, norm=s.norm, norm_group=s.norm_group, norm_weight=t["norm_weight"],
        norm_bias=t["norm_bias"], eps=s.eps, rope_cos=t["cos"], rope_sin=t["sin"], validate_indices=False,
    )  # fmt: skip


def unfused_fp8(s: Shape, t: dict) -> None:
    y = unfused(s, t, write=False)
    rows, scales = quantize_rows(y, torch.float8_e4m3fn)
    at = (t["batch_index"], t["idx"])
    transpose = (lambda c: c) if s.token_axis == 1 else (lambda c: c.transpose(1, 2))  # noqa: E731
    transpose(t["cache_fp8"]).view(torch.uint8).index_put_(at, rows.view(torch.uint8))
    transpose(t["scale"]).index_put_(at, scales)


def unfused(s: Shape, t: dict, epilogue: bool = True, write: bool = True) -> torch.Tensor:
    y = F.linear(t["x"], t["weight"], t["bias"])  # [B, k, C_out]
    if epilogue and s.norm == "layer_norm":
        y = F.layer_norm(y.unflatten(-1, (-1, s.norm_group)), (s.norm_group,), t["norm_weight"], t["norm_bias"], s.eps)
    elif epilogue and s.norm == "rms_norm":  # diffusers' RMSNorm
        y = y.unflatten(-1, (-1, s.norm_group))
        y = (y * torch.rsqrt(y.float().pow(2).mean(-1, keepdim=True) + s.eps)).to(y.dtype) * t["norm_weight"]
    y = y.reshape(BATCH, -1, s.heads, s.head_dim)
    if epilogue and s.rope:  # diffusers' apply_rotary_emb(use_real=False), Lumina-Next's form
        pairs = torch.view_as_complex(y.float().reshape(*y.shape[:-1], -1, 2))
        y = torch.view_as_real(pairs * t["freqs_cis"][t["idx"]].unsqueeze(2)).flatten(3).type_as(y)
    if write:
        cache = t["cache"] if s.token_axis == 1 else t["cache"].transpose(1, 2)
        cache.index_put_((t["batch_index"], t["idx"]), y)
    return y


def check(s: Shape, t: dict, dtype: torch.dtype, name: str) -> None:
    """The fused op's cache equals the unfused ops' cache, or an AssertionError names the case."""
    t["cache"].zero_()
    unfused(s, t)
    expected = t["cache"].clone()
    t["cache"].zero_()
    fused(s, t)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(
        t["cache"], expected, atol=tol, rtol=tol, msg=lambda m: f"linear_scatter_ != unfused torch for {name}: {m}"
    )


def measure(name: str, s: Shape, ratio: float, dtype: torch.dtype) -> dict:
    from triton.testing import do_bench

    k = active_tokens(ratio)
    t = make_inputs(s, k, dtype, "cuda")
    check(s, t, dtype, f"{name}, ratio {ratio}, {dtype}")
    elem = torch.finfo(dtype).bits // 8
    times = {
        "fused": do_bench(lambda: fused(s, t), return_mode="median"),
        "unfused": do_bench(lambda: unfused(s, t), return_mode="median"),
        "matmul_copy": do_bench(lambda: unfused(s, t, epilogue=False), return_mode="median"),
    }
    return {
        "model": name, "ratio": ratio, "dtype": str(dtype).removeprefix("torch."), "k": k, **asdict(s),
        "c_out": s.c_out, "flops": flops(s, k), "fused_ms": times["fused"],
        "fused_tflops": flops(s, k) / times["fused"] / 1e9, "fused_bytes": fused_bytes(s, k, elem),
        "unfused_ms": times["unfused"], "unfused_bytes": unfused_bytes(s, k, elem),
        "matmul_copy_ms": times["matmul_copy"], "matmul_copy_bytes": unfused_bytes(s, k, elem, epilogue=False),
        "speedup": times["unfused"] / times["fused"], "speedup_vs_matmul_copy": times["matmul_copy"] / times["fused"],
    }  # fmt: skip


COLUMNS = [  # (header, format of the value)
    ("model", "{model}"), ("ratio", "{ratio:g}"), ("dtype", "{dtype}"), ("k", "{k}"),
    ("fused ms", "{fused_ms:.4f}"), ("TFLOP/s", "{fused_tflops:.1f}"), ("fused MB", "{fused_mb:.2f}"),
    ("unfused ms", "{unfused_ms:.4f}"), ("unfused MB", "{unfused_mb:.2f}"), ("speedup", "{speedup:.2f}x"),
    ("mm+copy ms", "{matmul_copy_ms:.4f}"), ("speedup", "{speedup_vs_matmul_copy:.2f}x"),
]  # fmt: skip


def format_table(rows: list[dict]) -> str:
    """One line per row: text columns left-aligned, numbers right-aligned; MB = 1e6 bytes."""
    cells = [[header for header, _ in COLUMNS]]
    for row in rows:
        row = {**row, "fused_mb": row["fused_bytes"] / 1e6, "unfused_mb": row["unfused_bytes"] / 1e6}
        cells.append([fmt.format(**row) for _, fmt in COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    align = lambda i, text: text.ljust(widths[i]) if COLUMNS[i][0] in ("model", "dtype") else text.rjust(widths[i])
    return "\n".join("  ".join(align(i, text) for i, text in enumerate(line)).rstrip() for line in cells)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Needs a CUDA device.")
    add = parser.add_argument
    add("--dtype", nargs="+", choices=list(DTYPES), default=["bfloat16", "float16"], help="default: bfloat16 float16")
    add("--ratios", nargs="+", type=float, default=[0.5, 0.25], help="active fractions of N (default: 0.5 0.25)")
    add("--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="default: all")
    add("--json", metavar="PATH", help="also write the rows and the environment as JSON to PATH")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "No CUDA device: nothing was measured (the kernel's correctness is tested on the CPU by "
            "tests/kernels/test_kernels.py through Triton's interpreter)."
        )
        return 0
    import triton

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(f"GPU: {env['gpu']}  torch {env['torch']}  triton {env['triton']}")
    print(f"B = {BATCH}, N = {IMAGE_TOKENS} image tokens; times are do_bench medians\n")
    rows = [
        measure(name, MODELS[name], ratio, DTYPES[dtype])
        for name in args.models
        for ratio in args.ratios
        for dtype in args.dtype
    ]
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "batch": BATCH, "image_tokens": IMAGE_TOKENS, "rows": rows}, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
