import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rascompile.runtime.selector import initial_drop_counts, select_active_tokens, token_metric

SETTINGS = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------------------------------------- token_metric


def loop_token_metric(delta: torch.Tensor, p: int, metric: str) -> torch.Tensor:
    """Plain per-token reference: per pixel std / L2 norm over channels, then the mean over the patch."""
    batch, _, height, width = delta.shape
    rows, cols = height // p, width // p
    out = torch.empty(batch, rows * cols, dtype=torch.float64)
    x = delta.to(torch.float64)
    for b in range(batch):
        for r in range(rows):
            for c in range(cols):
                values = []
                for i in range(r * p, (r + 1) * p):
                    for j in range(c * p, (c + 1) * p):
                        pixel = x[b, :, i, j]
                        if metric == "std":
                            values.append(torch.std(pixel, unbiased=True).item())
                        else:
                            values.append(math.sqrt(sum(v * v for v in pixel.tolist())))
                out[b, r * cols + c] = sum(values) / len(values)
    return out


@SETTINGS
@given(
    batch=st.integers(1, 2),
    channels=st.integers(2, 5),
    rows=st.integers(1, 3),
    cols=st.integers(1, 4),
    p=st.integers(1, 3),
    metric=st.sampled_from(["std", "l2norm"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_token_metric_matches_loop_reference(batch, channels, rows, cols, p, metric, seed):
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(batch, channels, rows * p, cols * p, generator=gen)
    got = token_metric(delta, p, metric)
    assert got.dtype == torch.float32
    assert got.shape == (batch, rows * cols)
    torch.testing.assert_close(got.double(), loop_token_metric(delta, p, metric), rtol=1e-5, atol=1e-6)


def test_token_metric_row_major_order_non_square():
    # 4 x 6 latent, p=2 -> 2 x 3 token grid. Disturb only token (row 1, col 0) -> index 1 * 3 + 0 = 3.
    delta = torch.zeros(1, 4, 4, 6)
    delta[0, :, 2:4, 0:2] = torch.arange(4.0).view(4, 1, 1)
    for metric in ("std", "l2norm"):
        m = token_metric(delta, 2, metric)
        assert m.shape == (1, 6)
        assert torch.nonzero(m[0]).flatten().tolist() == [3]


def test_token_metric_known_values():
    # One 1x1 token per pixel (p=1), channels (0, 2): unbiased std = sqrt(2), l2 norm = 2.
    delta = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1)
    assert token_metric(delta, 1, "std").item() == pytest.approx(math.sqrt(2))
    assert token_metric(delta, 1, "l2norm").item() == pytest.approx(2.0)
    # Half precision input is upcast.
    assert token_metric(delta.half(), 1, "l2norm").dtype == torch.float32


def test_token_metric_validation():
    with pytest.raises(ValueError, match="H=5.*W=4.*patch_size=2"):
        token_metric(torch.zeros(1, 4, 5, 4), 2, "std")
    with pytest.raises(ValueError, match="H=4.*W=3.*patch_size=2"):
        token_metric(torch.zeros(1, 4, 4, 3), 2, "std")
    with pytest.raises(ValueError, match="metric='l1'"):
        token_metric(torch.zeros(1, 4, 4, 4), 2, "l1")
    with pytest.raises(ValueError, match="C=1"):
        token_metric(torch.zeros(1, 1, 4, 4), 2, "std")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        token_metric(torch.zeros(4, 4, 4), 2, "std")
    with pytest.raises(ValueError, match="patch_size=0"):
        token_metric(torch.zeros(1, 4, 4, 4), 0, "std")


# ---------------------------------------------------------------------------------------- initial_drop_counts


def test_initial_drop_counts():
    counts = initial_drop_counts(3, 16, 28, "cpu")
    assert counts.shape == (3, 16) and counts.dtype == torch.float32
    assert torch.all(counts == -29.0)
    with pytest.raises(ValueError, match="num_steps=0"):
        initial_drop_counts(1, 16, 0)


# -------------------------------------------------------------------------------------- select_active_tokens


@st.composite
def selection_inputs(draw, distinct=False):
    batch = draw(st.integers(1, 4))
    n = draw(st.integers(2, 64))
    if distinct:
        # Distinct scores: a random permutation of 1..n per row, no starvation scaling.
        perms = [draw(st.permutations(list(range(1, n + 1)))) for _ in range(batch)]
        metric = torch.tensor(perms, dtype=torch.float32)
        counts = torch.full((batch, n), -29.0)
        scale = 0.0
    else:
        metric = torch.from_numpy(draw(hnp.arrays(np.float32, (batch, n), elements=st.floats(0, 10, width=32))))
        counts = torch.from_numpy(draw(hnp.arrays(np.float32, (batch, n), elements=st.integers(-40, 0).map(float))))
        scale = draw(st.sampled_from([0.0, 0.1, -0.1, 0.5]))
    d = draw(st.integers(0, n - 1))
    high = draw(st.sampled_from([0.0, 0.3, 0.5, 1.0]) | st.floats(0, 1))
    return metric, counts, d, high, scale


def expected_k(n, d, high):
    return n - math.floor(d * (1 - high)) - math.floor(d * high)


def scores(metric, counts, scale):
    return metric.double() * torch.exp(scale * counts.double())


@SETTINGS
@given(selection_inputs())
def test_active_indices_sorted_unique_in_range_count_k(inputs):
    metric, counts, d, high, scale = inputs
    batch, n = metric.shape
    active = select_active_tokens(metric, counts.clone(), d, high, scale)
    k = expected_k(n, d, high)
    assert active.dtype == torch.int64
    assert active.shape == (batch, k)
    for row in active.tolist():
        assert row == sorted(set(row))
        assert all(0 <= i < n for i in row)


@SETTINGS
@given(selection_inputs())
def test_drop_counts_incremented_exactly_at_dropped_tokens(inputs):
    metric, counts, d, high, scale = inputs
    batch, n = metric.shape
    updated = counts.clone()
    active = select_active_tokens(metric, updated, d, high, scale)
    delta = updated - counts
    k = active.shape[1]
    for b in range(batch):
        active_set = set(active[b].tolist())
        dropped_set = set(range(n)) - active_set
        assert active_set | dropped_set == set(range(n))
        assert len(dropped_set) == n - k
        for i in range(n):
            assert delta[b, i].item() == (1.0 if i in dropped_set else 0.0)


@SETTINGS
@given(selection_inputs())
def test_dropped_are_the_extremes_of_the_score(inputs):
    """Every low-dropped score <= every active score <= every high-dropped score."""
    metric, counts, d, high, scale = inputs
    batch, n = metric.shape
    low = math.floor(d * (1 - high))
    score = scores(metric, counts, scale)
    active = select_active_tokens(metric, counts.clone(), d, high, scale)
    for b in range(batch):
        active_set = set(active[b].tolist())
        dropped = [i for i in range(n) if i not in active_set]
        dropped.sort(key=lambda i: score[b, i].item())
        low_dropped, high_dropped = dropped[:low], dropped[low:]
        active_scores = [score[b, i].item() for i in active_set]
        tol = 1e-6 * (1 + max(score[b].abs().max().item(), 0))
        if low_dropped:
            assert max(score[b, i].item() for i in low_dropped) <= min(active_scores) + tol
        if high_dropped:
            assert min(score[b, i].item() for i in high_dropped) >= max(active_scores) - tol


@SETTINGS
@given(selection_inputs(distinct=True))
def test_high_ratio_one_drops_exactly_the_d_highest(inputs):
    metric, counts, d, _, scale = inputs
    batch, n = metric.shape
    active = select_active_tokens(metric, counts, d, 1.0, scale)
    for b in range(batch):
        highest = set(torch.argsort(metric[b], descending=True)[:d].tolist())
        assert set(range(n)) - set(active[b].tolist()) == highest


@SETTINGS
@given(selection_inputs(distinct=True))
def test_high_ratio_zero_drops_exactly_the_d_lowest(inputs):
    metric, counts, d, _, scale = inputs
    batch, n = metric.shape
    active = select_active_tokens(metric, counts, d, 0.0, scale)
    for b in range(batch):
        lowest = set(torch.argsort(metric[b])[:d].tolist())
        assert set(range(n)) - set(active[b].tolist()) == lowest


@SETTINGS
@given(selection_inputs(), st.integers(0, 3))
def test_identical_rows_get_identical_selection(inputs, position):
    metric, counts, d, high, scale = inputs
    # Put a copy of row 0 at `position`, like the classifier-free-guidance rows of one image.
    position = min(position, metric.shape[0])
    metric = torch.cat([metric[:position], metric[:1], metric[position:]])
    counts = torch.cat([counts[:position], counts[:1], counts[position:]])
    twin = 0 if position > 0 else 1
    active = select_active_tokens(metric, counts, d, high, scale)
    assert torch.equal(active[position], active[twin])
    assert torch.equal(counts[position], counts[twin])


def test_ties_are_broken_by_token_index():
    # All scores equal: the stable sort keeps token order, so the D highest are the last D tokens.
    metric = torch.ones(2, 8)
    counts = torch.full((2, 8), -29.0)
    active = select_active_tokens(metric, counts, 3, 1.0, 0.1)
    assert active.tolist() == [[0, 1, 2, 3, 4]] * 2
    active = select_active_tokens(torch.ones(1, 8), torch.zeros(1, 8), 3, 0.0, 0.1)
    assert active.tolist() == [[3, 4, 5, 6, 7]]


def test_rows_are_selected_independently():
    metric = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    counts = torch.zeros(2, 4)
    active = select_active_tokens(metric, counts, 2, 1.0, 0.0)
    assert active.tolist() == [[0, 1], [2, 3]]
    assert counts.tolist() == [[0, 0, 1, 1], [1, 1, 0, 0]]


def test_no_drops_leaves_counts_unchanged():
    counts = torch.full((1, 5), -3.0)
    active = select_active_tokens(torch.rand(1, 5), counts, 0, 0.5, 0.1)
    assert active.tolist() == [[0, 1, 2, 3, 4]]
    assert torch.all(counts == -3.0)


class TestStarvationScaling:
    def test_selection_follows_scaled_score(self):
        # Token 0: metric 1.0, never dropped (d=-29): score = exp(-2.9) ~= 0.0550.
        # Token 1: metric 0.9, dropped twice (d=-27): score = 0.9 * exp(-2.7) ~= 0.0605.
        # Token 2: metric 0.1, d=-29: score ~= 0.0055 (always kept).
        metric = torch.tensor([[1.0, 0.9, 0.1]])
        assert math.exp(-2.9) < 0.9 * math.exp(-2.7)
        # With starvation_scale 0.1 token 1 has the highest score and is dropped ...
        counts = torch.tensor([[-29.0, -27.0, -29.0]])
        assert select_active_tokens(metric, counts, 1, 1.0, 0.1).tolist() == [[0, 2]]
        assert counts.tolist() == [[-29.0, -26.0, -29.0]]
        # ... without the scaling the raw metric decides and token 0 is dropped ...
        counts = torch.tensor([[-29.0, -27.0, -29.0]])
        assert select_active_tokens(metric, counts, 1, 1.0, 0.0).tolist() == [[1, 2]]
        # ... and with a negative scale the often-dropped token is penalised further.
        counts = torch.tensor([[-29.0, -27.0, -29.0]])
        assert select_active_tokens(metric, counts, 1, 1.0, -0.1).tolist() == [[1, 2]]

    def test_threshold_of_the_exponential(self):
        # Token 1 has metric r < 1 and one more drop than token 0: it is dropped (high_ratio 1)
        # iff r * exp(s) > 1, i.e. s > -ln(r). With r = 0.8, -ln(0.8) ~= 0.2231.
        metric = torch.tensor([[1.0, 0.8, 0.0]])
        for s, dropped in [(0.2, 0), (0.25, 1), (1.0, 1), (0.0, 0)]:
            counts = torch.tensor([[-10.0, -9.0, -10.0]])
            active = select_active_tokens(metric, counts, 1, 1.0, s)
            assert set(range(3)) - set(active[0].tolist()) == {dropped}, s

    @SETTINGS
    @given(
        metric=hnp.arrays(np.float64, (1, 24), elements=st.floats(0.01, 10), unique=True),
        counts=hnp.arrays(np.float64, (1, 24), elements=st.integers(-60, 0).map(float)),
        scale=st.sampled_from([0.1, -0.1, 0.3]),
        d=st.integers(1, 23),
    )
    def test_order_matches_explicit_formula(self, metric, counts, scale, d):
        # Scores metric * exp(scale * d), computed independently in numpy; skip near-ties.
        score = metric[0] * np.exp(scale * counts[0])
        ranked = np.argsort(score)
        gaps = np.diff(score[ranked]) / score[ranked][1:]
        if np.any(gaps < 1e-4):
            return
        expected_dropped = set(ranked[-d:].tolist())
        active = select_active_tokens(torch.from_numpy(metric).float(), torch.from_numpy(counts).float(), d, 1.0, scale)
        assert set(range(24)) - set(active[0].tolist()) == expected_dropped

    def test_long_generation_does_not_underflow(self):
        # T = 2000: exp(0.1 * -2001) underflows float32; the ordering must still follow the metric.
        metric = torch.tensor([[3.0, 1.0, 2.0, 0.5]])
        counts = initial_drop_counts(1, 4, 2000)
        assert select_active_tokens(metric, counts, 2, 1.0, 0.1).tolist() == [[1, 3]]

    def test_repeated_drops_accumulate(self):
        # Ten rounds with a constant metric; every drop is counted.
        metric = torch.tensor([[1.0, 1.1, 1.2, 1.3]])
        counts = initial_drop_counts(1, 4, 10)
        for _ in range(10):
            select_active_tokens(metric, counts, 1, 1.0, 0.1)
        assert (counts + 11).sum().item() == 10
        # Token 3 has the highest metric and, with starvation_scale > 0, its score only grows each time it is
        # dropped: it takes every drop.
        assert (counts + 11).tolist() == [[0, 0, 0, 10]]


@pytest.mark.parametrize(
    ("d", "high", "scale", "match"),
    [
        (-1, 1.0, 0.1, "num_dropped=-1"),
        (8, 1.0, 0.1, r"num_dropped=8 .*\[0, 7\]"),
        (2.0, 1.0, 0.1, "num_dropped=2.0"),
        (2, 1.5, 0.1, "high_ratio=1.5"),
        (2, 1.0, float("nan"), "starvation_scale=nan"),
    ],
)
def test_select_validation(d, high, scale, match):
    with pytest.raises(ValueError, match=match):
        select_active_tokens(torch.rand(2, 8), torch.zeros(2, 8), d, high, scale)


def test_select_shape_validation():
    with pytest.raises(ValueError, match="must match"):
        select_active_tokens(torch.rand(2, 8), torch.zeros(2, 7), 1, 1.0, 0.1)
    with pytest.raises(ValueError, match="floating-point"):
        select_active_tokens(torch.rand(2, 8), torch.zeros(2, 8, dtype=torch.int64), 1, 1.0, 0.1)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        select_active_tokens(torch.rand(8), torch.zeros(8), 1, 1.0, 0.1)


def test_random_metric_is_an_ablation_that_ignores_the_update_magnitudes():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(3, 4, 8, 8, generator=gen)
    delta[1] = delta[0]  # a classifier-free-guidance copy
    scores = token_metric(delta, 2, "random")
    assert scores.shape == (3, 16) and scores.min() >= 0 and scores.max() < 1
    assert torch.equal(scores[0], scores[1]) and not torch.equal(scores[0], scores[2])
    assert torch.equal(scores, token_metric(delta, 2, "random"))  # reproducible
    assert not torch.equal(scores.argsort(1), token_metric(delta, 2, "std").argsort(1))


# ------------------------------------------------------------------------------------------ staleness bound


def _max_skip_run(metrics, num_dropped: int, high: float, scale: float, bound: int | None) -> int:
    """The longest run of consecutive selections a token was left out of, over ``metrics`` ([S, B, N], one
    selection per step), with deadlines ``bound - run`` as the controller passes them."""
    steps, batch, n = metrics.shape
    counts = initial_drop_counts(batch, n, steps)
    run = torch.zeros(batch, n, dtype=torch.int64)
    longest = 0
    for metric in metrics:
        deadline = None if bound is None else bound - run
        idx = select_active_tokens(metric, counts, num_dropped, high, scale, deadline)
        run = (run + 1) * torch.ones_like(run).scatter_(1, idx, 0)
        longest = max(longest, int(run.max()))
    return longest


@SETTINGS
@given(
    n=st.integers(4, 48),
    ratio=st.sampled_from([0.5, 0.34, 0.25]),
    bound=st.integers(1, 6),
    high=st.sampled_from([0.0, 0.1, 1.0]),
    scale=st.sampled_from([0.0, 0.1, -0.1]),
    seed=st.integers(0, 2**31 - 1),
)
def test_no_token_is_skipped_longer_than_the_bound_on_random_metrics(n, ratio, bound, high, scale, seed):
    num_dropped = math.floor((1 - ratio) * n)
    k = expected_k(n, num_dropped, high)
    metrics = torch.rand(12, 2, n, generator=torch.Generator().manual_seed(seed))
    longest = _max_skip_run(metrics, num_dropped, high, scale, bound)
    if k * (bound + 1) >= n:  # k tokens a step can reach every token within bound + 1 steps
        assert longest <= bound
    else:  # no choice meets every deadline: the most overdue go first, a round over all tokens
        assert longest <= math.ceil(n / k) - 1


@pytest.mark.parametrize("high", [1.0, 0.1, 0.0])
def test_a_token_whose_metric_is_always_the_largest_is_computed_within_the_bound(high):
    """The reference's selection drops the highest-scoring tokens (high_ratio 1) and starvation keeps them dropped;
    with ``high_ratio < 1`` the lowest. Token 0 always scores highest, token 1 always lowest: unbounded, one of
    them is never computed; bounded, both are within 3 steps."""
    metrics = torch.rand(16, 1, 32, generator=torch.Generator().manual_seed(0)) + 1.0
    metrics[:, :, 0], metrics[:, :, 1] = 100.0, 0.0
    assert _max_skip_run(metrics, 24, high, 0.1, None) == 16
    assert _max_skip_run(metrics, 24, high, 0.1, 3) <= 3


def test_deadlines_keep_the_step_size_and_replace_the_lowest_scoring_active_tokens():
    metric = torch.arange(1.0, 9.0).unsqueeze(0)  # token i scores i + 1
    counts = torch.zeros(1, 8)
    plain = select_active_tokens(metric, counts.clone(), 4, 0.0, 0.0)  # drops the 4 lowest: 4..7 active
    assert plain.tolist() == [[4, 5, 6, 7]]
    deadline = torch.tensor([[0, 5, 5, 5, 5, 5, 5, 5]])  # token 0 is due now
    due = select_active_tokens(metric, counts.clone(), 4, 0.0, 0.0, deadline)
    assert due.tolist() == [[0, 5, 6, 7]]  # it takes the place of token 4, the lowest-scoring active one
