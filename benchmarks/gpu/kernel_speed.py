"""The ``kernel_speed`` stage: ``linear_scatter_`` against ``F.linear`` + ``index_put_`` and against the model's
norm/RoPE run separately (``benchmarks/kernel_speed.py``'s functions) for the K/V projections of SD3-medium,
SD3.5-medium and Flux-dev, with TFLOP/s and GB/s against the device's datasheet peaks."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Callable, Iterator

import torch

from rascompile.bench.timing import time_interleaved

from .config import ROOT
from .env import device_peaks
from .suite import SkipStage, Stage, Suite

KERNEL_RATIOS = (0.5, 0.25)
KERNEL_DTYPES = ("bfloat16", "float16")


def load_kernel_benchmark():
    """benchmarks/kernel_speed.py as a module (it is a script, not part of the package)."""
    name = "rascompile_kernel_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "kernel_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def kernel_shapes(kb, dry: bool) -> tuple[dict, int]:
    """The K/V projections measured, and the image tokens N. Flux-dev: to_k Linear(3072, 3072) with bias,
    per-head RMSNorm over 128 and interleaved RoPE; its cache is [B, T, H, D] with the 512 text rows first
    (placed after the image rows here, as for the other shapes: the same work)."""
    if dry:
        s = kb.Shape
        return {
            "sd3-medium": s(c_in=64, heads=4, head_dim=16, bias=True, text_tokens=8, token_axis=2),
            "sd3.5-medium": s(c_in=64, heads=4, head_dim=16, bias=True, norm="rms_norm", norm_group=16,
                              text_tokens=8, token_axis=2),
            "flux-dev": s(c_in=64, heads=4, head_dim=16, bias=True, norm="rms_norm", norm_group=16, rope=True,
                          text_tokens=8, token_axis=1),
        }, 256  # fmt: skip
    flux = kb.Shape(
        c_in=3072, heads=24, head_dim=128, bias=True, norm="rms_norm", norm_group=128, rope=True,
        text_tokens=512, token_axis=1,
    )  # fmt: skip
    return {"sd3-medium": kb.MODELS["sd3-medium"], "sd3.5-medium": kb.MODELS["sd3.5-medium"], "flux-dev": flux}, 4096


@contextlib.contextmanager
def _image_tokens(kb, n: int) -> Iterator[None]:
    """benchmarks/kernel_speed.py's N (a module constant its helpers read), set for the dry run's tiny shapes."""
    saved = kb.IMAGE_TOKENS
    kb.IMAGE_TOKENS = n
    try:
        yield
    finally:
        kb.IMAGE_TOKENS = saved


def _cpu_median_ms(fn: Callable, repeats: int = 5) -> float:
    """Median milliseconds of ``repeats`` calls after a warm-up (``rascompile.bench``'s timer; CUDA uses do_bench)."""
    return 1e3 * time_interleaved({"fn": fn}, repeats)["fn"]["median_s"]


def measure_kernel(kb, name: str, s, ratio: float, dtype: torch.dtype, n: int, device: str, peaks: dict) -> dict:
    """benchmarks/kernel_speed.py's ``measure`` on ``device`` (CUDA: do_bench medians; CPU: perf_counter medians),
    plus GB/s and the shares of the device's peaks. The correctness check's error is kept, not raised."""
    if device == "cuda":
        from triton.testing import do_bench

        timer = lambda fn: do_bench(fn, return_mode="median")  # noqa: E731
    else:
        timer = _cpu_median_ms
    k = kb.active_tokens(ratio, n)
    t = kb.make_inputs(s, k, dtype, device)
    try:
        kb.check(s, t, dtype, f"{name}, ratio {ratio}, {dtype}")
        mismatch = None
    except AssertionError as exc:
        mismatch = str(exc).splitlines()[0][:300]
    ms = {
        "fused": timer(lambda: kb.fused(s, t)),
        "unfused": timer(lambda: kb.unfused(s, t)),
        "matmul_copy": timer(lambda: kb.unfused(s, t, epilogue=False)),
    }
    elem = torch.finfo(dtype).bits // 8
    flops = kb.flops(s, k)
    bytes_ = {
        "fused": kb.fused_bytes(s, k, elem),
        "unfused": kb.unfused_bytes(s, k, elem),
        "matmul_copy": kb.unfused_bytes(s, k, elem, epilogue=False),
    }
    row = {
        "model": name, "ratio": ratio, "dtype": str(dtype).removeprefix("torch."), "k": k, "n": n,
        "batch": kb.BATCH, "c_in": s.c_in, "c_out": s.c_out, "norm": s.norm, "rope": s.rope, "flops": flops,
        "matches_unfused": mismatch is None, "mismatch": mismatch,
    }  # fmt: skip
    for variant in ms:
        row[f"{variant}_ms"] = ms[variant]
        row[f"{variant}_bytes"] = bytes_[variant]
        row[f"{variant}_tflops"] = flops / ms[variant] / 1e9
        row[f"{variant}_gbps"] = bytes_[variant] / ms[variant] / 1e6
    row["speedup_vs_unfused"] = ms["unfused"] / ms["fused"]
    # into a float8 cache with scales (kv_cache_dtype="fp8_e4m3"): the quantization in the kernel's epilogue
    row["fused_fp8_ms"] = timer(lambda: kb.fused_fp8(s, t))
    row["unfused_fp8_ms"] = timer(lambda: kb.unfused_fp8(s, t))
    row["speedup_fp8_vs_unfused"] = row["unfused_fp8_ms"] / row["fused_fp8_ms"]
    row["speedup_vs_matmul_copy"] = ms["matmul_copy"] / ms["fused"]
    tflops, gbps = peaks.get("tflops_bf16_fp16"), peaks.get("gbps")
    row["fused_pct_peak_tflops"] = 100 * row["fused_tflops"] / tflops if tflops else None
    row["fused_pct_peak_gbps"] = 100 * row["fused_gbps"] / gbps if gbps else None
    return row


def stage_kernel_speed(suite: Suite, st: Stage) -> None:
    import rascompile.kernels.linear_scatter  # noqa: F401  (registers torch.ops.rascompile.linear_scatter_)

    kb = load_kernel_benchmark()
    shapes, n = kernel_shapes(kb, suite.dry)
    peaks = device_peaks(torch.cuda.get_device_name(0) if suite.cuda else None)
    st.data.update({"batch": kb.BATCH, "image_tokens": n, "peaks": peaks, "rows": []})
    if suite.dry:
        st.skip_part(
            "the Triton kernel's speed",
            "no CUDA: on the CPU linear_scatter_ runs its plain torch version, so these tiny-shape numbers "
            "time that, not the kernel (the kernel's interpreter run is in kernel_tests)",
        )
    elif importlib.util.find_spec("triton") is None:
        raise SkipStage("triton is not installed: on CUDA linear_scatter_ would run its torch version")
    with _image_tokens(kb, n):
        for name, s in shapes.items():
            for ratio in KERNEL_RATIOS:
                for dtype_name in KERNEL_DTYPES:
                    with st.step(f"{name} ratio {ratio:g} {dtype_name}"):
                        row = measure_kernel(kb, name, s, ratio, getattr(torch, dtype_name), n, suite.device, peaks)
                        st.data["rows"].append(row)
                    suite.log(
                        st.name,
                        f"  fused {row['fused_ms']:.4f} ms, unfused {row['unfused_ms']:.4f} ms "
                        f"({row['speedup_vs_unfused']:.2f}x), mm+copy {row['matmul_copy_ms']:.4f} ms",
                    )
    bad = [f"{r['model']} {r['ratio']:g} {r['dtype']}" for r in st.data["rows"] if not r["matches_unfused"]]
    st.check(
        "fused cache equals the unfused ops' cache",
        not bad,
        f"{len(st.data['rows']) - len(bad)} of {len(st.data['rows'])} cases match"
        + (f"; mismatches: {', '.join(bad)}" if bad else ""),
    )
