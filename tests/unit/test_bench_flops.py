"""The analytic FLOP model behind the benchmark's ideal speedups."""

import pytest

from rascompile.bench.flops import StepFlops, measured_loop_ideal_speedup
from rascompile.bench.runner import ModelSpec, ideal_speedup, loop_ideal_speedup, step_flops
from rascompile.config import RASConfig
from rascompile.runtime.schedule import build_schedule

BENCH = ModelSpec(hidden=768, layers=4, num_tokens=1024, text_tokens=77, batch=2, joint_dim=768, pooled_dim=768)
TINY = ModelSpec(hidden=32, layers=2, num_tokens=64, text_tokens=8, batch=2, joint_dim=32, pooled_dim=32)


@pytest.mark.parametrize("spec", [BENCH, TINY])
def test_dense_is_one(spec):
    assert ideal_speedup(spec, spec.num_tokens) == 1.0
    assert loop_ideal_speedup(spec, [spec.num_tokens] * 5) == pytest.approx(1.0)


@pytest.mark.parametrize("spec", [BENCH, TINY])
def test_monotone_in_active_tokens(spec):
    values = [ideal_speedup(spec, k) for k in range(1, spec.num_tokens + 1)]
    assert all(a > b for a, b in zip(values, values[1:]))
    # the text tokens' work and the attention over all N keys stay: never the naive N / k
    assert all(v < spec.num_tokens / k for k, v in zip(range(1, spec.num_tokens), values))


def test_hand_computed_single_layer():
    spec = ModelSpec(
        hidden=4, layers=1, num_tokens=8, text_tokens=2, batch=1, patch=1, in_channels=1, out_channels=1,
        joint_dim=3, pooled_dim=5, mlp_ratio=4, freq_dim=6,
    )  # fmt: skip
    d, n, length, k = 4, 8, 2, 3
    macs = (
        12 * d * d * k  # image tokens: QKV, out projection, MLP
        + 3 * d * d * length  # last (only) block: text Q/K/V only (context_pre_only)
        + 2 * d * (k + length) * (n + length)  # attention against all N + L keys
        + 6 * d * d
        + 2 * d * d  # adaLN modulation, image and text
        + 1 * d * n  # patch embedding over all tokens
        + d * 1 * k  # final projection over the active tokens
        + 2 * d * d  # final adaLN
        + 3 * d * length  # context embedder
        + 6 * d
        + d * d
        + 5 * d
        + d * d  # timestep and pooled embeddings
    )
    assert step_flops(spec, k) == 2 * macs


def test_batch_scales_linearly():
    assert step_flops(BENCH.__class__(**{**BENCH.__dict__, "batch": 4}), 256) == 2 * step_flops(BENCH, 256)


def test_out_of_range():
    with pytest.raises(ValueError):
        step_flops(TINY, 0)
    with pytest.raises(ValueError):
        step_flops(TINY, TINY.num_tokens + 1)


def test_bench_numbers():
    # The paper's SD3 loop at ratio 0.25 on the benchmark model: 6 dense steps (0-3, 12, 20), 22 RAS steps.
    schedule = build_schedule(
        RASConfig.reference_defaults(sample_ratio=0.25, error_reset_steps=(12, 20), num_inference_steps=28),
        28,
        BENCH.num_tokens,
    )
    ks = [p.num_active for p in schedule]
    assert ks.count(BENCH.num_tokens) == 6 and ks.count(256) == 22
    per_step = ideal_speedup(BENCH, 256)
    assert 3.0 < per_step < 3.6
    loop = loop_ideal_speedup(BENCH, ks)
    assert loop == pytest.approx(28 / (6 + 22 / per_step))


def test_step_flops_rows_analytic():
    # dense, capture (k = N), two RAS steps; the measured FLOPs are off the analytic ones by 1 %
    ks = [TINY.num_tokens, TINY.num_tokens, 32, 16]
    measured = [round(step_flops(TINY, k) * 1.01) for k in ks]
    flops = StepFlops(measured[0], ks, measured, TINY)
    row = flops.row(2)
    assert list(row) == ["measured_flops", "measured_ideal_speedup", "ideal_speedup", "flops"]  # the JSON's order
    assert row["ideal_speedup"] == ideal_speedup(TINY, 32) and row["flops"] == step_flops(TINY, 32)
    assert row["measured_ideal_speedup"] == measured[0] / measured[2]
    summary = flops.summary()
    assert list(summary) == ["dense_measured", "source", "measured_vs_analytic_max_relative_difference"]
    assert summary["source"] == "analytic"
    assert summary["measured_vs_analytic_max_relative_difference"] == pytest.approx(0.01, abs=1e-6)
    assert flops.loop_ideal_speedup(TINY.num_tokens, [64, 32, 16]) == loop_ideal_speedup(TINY, [64, 32, 16])


def test_step_flops_rows_measured():
    flops = StepFlops(1000, [64, 64, 32, 16], [1000, 1000, 600, 400])
    assert flops.row(3) == {"measured_flops": 400, "measured_ideal_speedup": 2.5, "ideal_speedup": 2.5, "flops": 400}
    assert flops.summary() == {"dense_measured": 1000, "source": "measured"}
    expected = measured_loop_ideal_speedup({64: 1000, 32: 600, 16: 400}, 64, [64, 32, 16, 16])
    assert flops.loop_ideal_speedup(64, [64, 32, 16, 16]) == expected == 4000 / 2400
