"""``benchmarks/kernel_speed.py``: its run without CUDA, its FLOP and byte counts, and its unfused baseline."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kernel_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script measures for real")
def test_without_cuda_it_says_so_and_exits_0():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "no cuda device" in result.stdout.lower()
    assert "nothing was measured" in result.stdout


def test_help_lists_the_options():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for option in ("--dtype", "--ratios", "--models", "--json"):
        assert option in result.stdout


def test_defaults(bench):
    args = bench.parse_args([])
    assert args.dtype == ["bfloat16", "float16"]
    assert args.ratios == [0.5, 0.25]
    assert args.models == ["sd3-medium", "sd3.5-medium", "lumina-next-2b"]
    assert bench.parse_args(["--dtype", "float32"]).dtype == ["float32"]


def test_sd3_medium_counts_by_hand(bench):
    s = bench.MODELS["sd3-medium"]
    k = bench.active_tokens(0.5)
    assert (k, s.c_out) == (2048, 1536)
    assert bench.flops(s, k) == 2 * 2 * 2048 * 1536 * 1536 == 19_327_352_832
    # bf16: x 2*2048*1536*2, weight 1536*1536*2, bias 1536*2, idx 2*2048*8, cache rows 2*2048*1536*2
    fused = 12_582_912 + 4_718_592 + 3_072 + 32_768 + 12_582_912
    assert bench.fused_bytes(s, k, 2) == fused == 29_920_256
    # y written by F.linear and read back by index_put_
    assert bench.unfused_bytes(s, k, 2) == fused + 2 * 12_582_912
    assert bench.unfused_bytes(s, k, 2, epilogue=False) == fused + 2 * 12_582_912


def test_lumina_counts_by_hand(bench):
    s = bench.MODELS["lumina-next-2b"]
    k = bench.active_tokens(0.25)
    assert (k, s.c_out) == (1024, 576)
    assert bench.flops(s, k) == 2 * 2 * 1024 * 2304 * 576
    # fp16: x 2*1024*2304*2, weight 576*2304*2, no bias, idx 2*1024*8, cache rows 2*1024*576*2,
    # LayerNorm weight and bias 2*576*2, fp32 cos and sin at the active positions 2*(2*1024*36*4)
    plain = 9_437_184 + 2_654_208 + 16_384 + 2_359_296
    fused = plain + 2_304 + 589_824
    assert bench.fused_bytes(s, k, 2) == fused
    assert bench.fused_bytes(s, k, 2, epilogue=False) == plain
    y = 2 * 1024 * 576 * 2
    assert bench.unfused_bytes(s, k, 2) == fused + 3 * 2 * y  # linear, layer_norm, RoPE: three intermediates
    assert bench.unfused_bytes(s, k, 2, epilogue=False) == plain + 2 * y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model", ["sd3-medium", "sd3.5-medium", "lumina-next-2b"])
def test_unfused_baseline_equals_the_op_on_cpu(bench, model, dtype):
    s = bench.MODELS[model]
    t = bench.make_inputs(s, 64, dtype, "cpu")
    bench.check(s, t, dtype, model)  # the op's plain torch version on the CPU
    cache = t["cache"] if s.token_axis == 1 else t["cache"].transpose(1, 2)  # [B, T, H, D]
    written = cache.abs().amax(dim=(2, 3)) > 0
    expected = torch.zeros_like(written)
    expected[t["batch_index"], t["idx"]] = True
    assert torch.equal(written, expected)


def test_check_fails_when_the_results_differ(bench, monkeypatch):
    s = bench.MODELS["sd3-medium"]
    t = bench.make_inputs(s, 16, torch.float32, "cpu")
    monkeypatch.setattr(bench, "fused", lambda s, t: None)  # leaves the cache zero
    with pytest.raises(AssertionError, match="linear_scatter_ != unfused torch for sd3-medium"):
        bench.check(s, t, torch.float32, "sd3-medium")


def test_table_has_one_line_per_row(bench):
    s = bench.MODELS["sd3-medium"]
    row = {
        "model": "sd3-medium", "ratio": 0.5, "dtype": "bfloat16", "k": 2048, "fused_ms": 0.05,
        "fused_tflops": 386.5, "fused_bytes": bench.fused_bytes(s, 2048, 2), "unfused_ms": 0.1,
        "unfused_bytes": bench.unfused_bytes(s, 2048, 2), "matmul_copy_ms": 0.075, "speedup": 2.0,
        "speedup_vs_matmul_copy": 1.5,
    }  # fmt: skip
    lines = bench.format_table([row, {**row, "ratio": 0.25}]).splitlines()
    assert len(lines) == 3
    assert lines[0].split()[:4] == ["model", "ratio", "dtype", "k"]
    assert lines[1].split() == [
        "sd3-medium", "0.5", "bfloat16", "2048", "0.0500", "386.5", "29.92", "0.1000", "55.09", "2.00x", "0.0750",
        "1.50x",
    ]  # fmt: skip
    assert lines[2].split()[1] == "0.25"
