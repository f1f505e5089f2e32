import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rascompile.config import RASConfig
from rascompile.runtime.schedule import (
    StepPlan,
    active_token_counts,
    build_schedule,
    num_active_tokens,
    split_num_dropped,
)


def dropped(schedule):
    return [plan.num_dropped for plan in schedule]


def test_reference_defaults_t28():
    n = 4096  # 1024x1024 image, 128x128 latent, patch 2
    schedule = build_schedule(RASConfig.reference_defaults(), 28, n)
    assert len(schedule) == 28
    assert [plan.step for plan in schedule] == list(range(28))
    dense_steps = {plan.step for plan in schedule if plan.dense}
    assert dense_steps == {0, 1, 2, 3, 12, 22}
    for plan in schedule:
        if plan.dense:
            assert plan == StepPlan(step=plan.step, dense=True, num_dropped=0, num_active=n)
        else:
            assert plan == StepPlan(step=plan.step, dense=False, num_dropped=2048, num_active=2048)
    assert active_token_counts(schedule) == [2048]


def test_default_high_ratio_splits_the_dropped_tokens_with_floors():
    # D = 2048; high_ratio 0.1 drops floor(2048 * 0.9) = 1843 low and floor(2048 * 0.1) = 204 high tokens,
    # so k = 4096 - 2047 (num_dropped keeps the scheduled D).
    schedule = build_schedule(RASConfig(), 28, 4096)
    assert {(p.num_dropped, p.num_active) for p in schedule if not p.dense} == {(2048, 2049)}


def test_odd_token_count_rounds_dropped_down():
    # N = 15: D = floor(0.5 * 15) = 7, k = 8.
    schedule = build_schedule(RASConfig.reference_defaults(scheduler_start_step=4, error_reset_steps=()), 6, 15)
    assert [(p.dense, p.num_dropped, p.num_active) for p in schedule] == [(True, 0, 15)] * 4 + [(False, 7, 8)] * 2


def test_end_step():
    schedule = build_schedule(RASConfig(scheduler_end_step=20), 28, 1024)
    assert {p.step for p in schedule if p.dense} == {0, 1, 2, 3, 12, 21, 22, 23, 24, 25, 26, 27}
    assert not schedule[20].dense  # s > end is dense, s == end is not


def test_sample_ratio_one_is_all_dense():
    schedule = build_schedule(RASConfig(sample_ratio=1.0), 28, 4096)
    assert all(p.dense and p.num_dropped == 0 and p.num_active == 4096 for p in schedule)
    assert active_token_counts(schedule) == []
    # ... also in dynamic mode.
    schedule = build_schedule(RASConfig(sample_ratio=1.0, skip_num_step=64, skip_num_step_length=4), 28, 1024)
    assert all(p.dense for p in schedule)


def test_step_dropping_nothing_is_dense():
    # N = 4, sample_ratio 0.9: D = floor(0.1 * 4) = 0.
    schedule = build_schedule(RASConfig(sample_ratio=0.9), 28, 4)
    assert all(p.dense and p.num_active == 4 for p in schedule)


def test_dynamic_mode_hand_computed():
    # N=1024, T=28, start=4, L=4, skip_num_step=64, sample_ratio=0.5:
    #   avg = floor(0.5 * 1024) = 512, center = ((28 + 4) // 4) // 2 = 8 // 2 = 4,
    #   D(group i) = 512 + 64 * (i - 4), already multiples of 64:
    #   i=1 (steps 4-7): 320, i=2 (8-11): 384, i=3 (12-15): 448, i=4 (16-19): 512,
    #   i=5 (20-23): 576, i=6 (24-27): 640. Steps 0-3 (i=0 -> 256), 12 and 22 are dense: 0.
    config = RASConfig.reference_defaults(skip_num_step=64, skip_num_step_length=4)
    schedule = build_schedule(config, 28, 1024)
    expected = [0, 0, 0, 0] + [320] * 4 + [384] * 4 + [0, 448, 448, 448] + [512] * 4 + [576, 576, 0, 576] + [640] * 4
    assert dropped(schedule) == expected
    assert [p.num_active for p in schedule] == [1024 - d for d in expected]
    assert active_token_counts(schedule) == [384, 448, 512, 576, 640, 704]


def test_dynamic_mode_rounds_down_to_multiple_of_64():
    # N=1024, T=28, start=4, L=4, skip_num_step=-100, sample_ratio=0.4:
    #   avg = floor(0.6 * 1024) = floor(614.4) = 614, center = 4,
    #   raw D(i) = 614 - 100 * (i - 4), then (raw // 64) * 64:
    #   i=1: 914 -> 896, i=2: 814 -> 768, i=3: 714 -> 704, i=4: 614 -> 576,
    #   i=5: 514 -> 512, i=6: 414 -> 384.
    config = RASConfig(sample_ratio=0.4, skip_num_step=-100, skip_num_step_length=4)
    schedule = build_schedule(config, 28, 1024)
    expected = [0, 0, 0, 0] + [896] * 4 + [768] * 4 + [0, 704, 704, 704] + [576] * 4 + [512, 512, 0, 512] + [384] * 4
    assert dropped(schedule) == expected


def test_dynamic_mode_round_to_suits_small_images():
    # N=64, T=20, start=4, L=4, skip_num_step=6, sample_ratio=0.5, no reset steps:
    #   avg = 32, center = ((20 + 4) // 4) // 2 = 3, raw D(i) = 32 + 6 * (i - 3):
    #   i=1 (steps 4-7): 20, i=2: 26, i=3: 32, i=4 (16-19): 38.
    #   Rounded down to multiples of 4: 20, 24, 32, 36. With the default 64 every step rounds to 0 (dense).
    config = RASConfig(
        skip_num_step=6, skip_num_step_length=4, scheduler_start_step=4, error_reset_steps=(), dynamic_round_to=4
    )
    expected = [0, 0, 0, 0] + [20] * 4 + [24] * 4 + [32] * 4 + [36] * 4
    assert dropped(build_schedule(config, 20, 64)) == expected
    coarse = build_schedule(config.replace(dynamic_round_to=64), 20, 64)
    assert all(plan.dense for plan in coarse)


def test_dynamic_mode_group_length_3_t30():
    # N=4096, T=30, start=4, L=3, skip=128: avg=2048, center = ((30 + 4) // 3) // 2 = 11 // 2 = 5.
    # D(i) = 2048 + 128 * (i - 5): step 4 is in group 1 -> 1536; step 29 in group 9 -> 2560;
    # step 15 in group 5 -> 2048.
    config = RASConfig(skip_num_step=128, skip_num_step_length=3, error_reset_steps=())
    schedule = build_schedule(config, 30, 4096)
    assert schedule[4].num_dropped == 1536
    assert schedule[15].num_dropped == 2048
    assert schedule[29].num_dropped == 2560
    assert schedule[5].num_dropped == 1536 and schedule[6].num_dropped == 1664


def test_dynamic_mode_zero_dropped_at_ras_step_is_dense():
    # avg=512 with N=1024, center=4, skip=128, L=4: group 1 -> 512 - 384 = 128, fine; with skip=170:
    # group 1 -> 512 - 510 = 2 -> 0. Steps 4-7 drop nothing and are therefore dense.
    schedule = build_schedule(RASConfig(skip_num_step=170, skip_num_step_length=4), 28, 1024)
    assert [p.dense for p in schedule[4:8]] == [True] * 4
    assert schedule[8].num_dropped == (512 - 340) // 64 * 64 == 128


def test_high_ratio_split_floors():
    # N=10, sample_ratio=0.5: D=5. high_ratio=0.3: low=floor(5*0.7)=3, high=floor(5*0.3)=1 -> k = 10-4 = 6.
    assert split_num_dropped(5, 0.3) == (3, 1)
    assert num_active_tokens(10, 5, 0.3) == 6
    schedule = build_schedule(RASConfig(high_ratio=0.3, error_reset_steps=()), 6, 10)
    assert [(p.num_dropped, p.num_active) for p in schedule[4:]] == [(5, 6), (5, 6)]
    # N=4096: D=2048, low=floor(2048*0.7)=1433, high=floor(2048*0.3)=614 -> k = 4096 - 2047 = 2049.
    schedule = build_schedule(RASConfig(high_ratio=0.3), 28, 4096)
    assert active_token_counts(schedule) == [2049]
    # high_ratio 0 and 1 drop exactly D.
    assert num_active_tokens(4096, 2048, 0.0) == 2048
    assert num_active_tokens(4096, 2048, 1.0) == 2048


def test_build_schedule_validates_first():
    with pytest.raises(ValueError, match=r"RASConfig\.error_reset_steps"):
        build_schedule(RASConfig(error_reset_steps=(12, 22)), 20, 1024)
    with pytest.raises(ValueError, match=r"RASConfig\.skip_num_step=200"):
        build_schedule(RASConfig(skip_num_step=200, skip_num_step_length=4), 28, 1024)


@settings(max_examples=150, deadline=None)
@given(
    num_steps=st.integers(2, 60),
    num_tokens=st.integers(1, 5000),
    sample_ratio=st.floats(0.01, 1.0),
    high_ratio=st.floats(0.0, 1.0),
    start=st.integers(1, 10),
    end_offset=st.integers(0, 60),
    resets=st.sets(st.integers(0, 59), max_size=4),
)
def test_static_schedule_invariants(num_steps, num_tokens, sample_ratio, high_ratio, start, end_offset, resets):
    start = min(start, num_steps - 1)
    end = min(start + end_offset, num_steps)
    resets = tuple(sorted(r for r in resets if r < num_steps))
    config = RASConfig(
        sample_ratio=sample_ratio,
        high_ratio=high_ratio,
        scheduler_start_step=start,
        scheduler_end_step=end,
        error_reset_steps=resets,
    )
    schedule = build_schedule(config, num_steps, num_tokens)
    d = int((1 - sample_ratio) * num_tokens)
    k = num_tokens - int(d * (1 - high_ratio)) - int(d * high_ratio)
    for plan in schedule:
        scheduled_dense = plan.step < start or plan.step > end or plan.step in resets
        if scheduled_dense or k == num_tokens:
            assert plan == StepPlan(plan.step, True, 0, num_tokens)
        else:
            assert plan == StepPlan(plan.step, False, d, k)
            assert 1 <= plan.num_active < num_tokens
