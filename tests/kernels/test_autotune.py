"""The Triton kernel's autotuner keys its choice on the active-row count's power-of-two bucket, so the tile picked
at the capture step (k = N) does not serve the RAS steps (k = N / 4). Runs under Triton's CPU interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before Triton compiles anything: kernels run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.support.kernel_cases import make_case, run_op  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton is not installed")
kernel_module = pytest.importorskip("rascompile.kernels.triton_linear_scatter", reason="Triton is not installed")


def _launch(case):
    """The kernel on ``case`` (a [B, T, H, D] cache, no norm or RoPE); the cache it wrote."""
    cache = case["cache"].clone()
    kernel_module.launch(
        cache,
        case["x"],
        case["weight"],
        case["bias"],
        case["idx"],
        row_offset=0,
        norm="none",
        norm_group=case["weight"].shape[0],
        norm_weight=None,
        norm_bias=None,
        eps=case["eps"],
        rope_cos=None,
        rope_sin=None,
    )
    return cache


@pytest.fixture
def two_configs(monkeypatch):
    """The autotuner with two configs (the interpreter has one, which Triton never tunes) and a stand-in timing,
    since the interpreter cannot time a launch; its cache starts empty."""
    kernel = kernel_module._linear_scatter_kernel
    configs = [
        triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 16}, num_warps=1),
    ]
    timed = []

    def bench(*args, config, **kwargs):
        timed.append(config.kwargs["BLOCK_M"])
        return float(config.kwargs["BLOCK_M"])

    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench", bench)
    return kernel, timed


def test_bucket_is_the_next_power_of_two():
    assert [kernel_module.k_bucket(k) for k in (1, 2, 3, 7, 8, 9, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 128]
    assert "K_BUCKET" in kernel_module._linear_scatter_kernel.keys


@pytest.mark.triton_interpreter
def test_launches_with_k_in_different_buckets_autotune_separately(two_configs):
    kernel, timed = two_configs
    position = kernel.keys.index("K_BUCKET")
    full = make_case(num_tokens=32, k=32, c_in=16)  # the capture step: every token
    quarter = make_case(num_tokens=32, k=8, c_in=16, seed=1)  # a RAS step: a quarter of them
    same_bucket = make_case(num_tokens=32, k=7, c_in=16, seed=2)

    for case in (full, quarter, same_bucket):
        torch.testing.assert_close(_launch(case), run_op(case), rtol=1e-5, atol=1e-5)

    buckets = sorted(key[position] for key in kernel.cache)
    assert buckets == [8, 32], "k = 32 and k = 8 are tuned apart; k = 7 reuses k = 8's choice"
    assert len(timed) == 2 * 2, "two tunings of two configs each"
