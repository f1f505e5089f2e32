import dataclasses
import math

import pytest

from rascompile.config import RASConfig


def test_defaults_match_reference_implementation_but_the_selection():
    """The reference's argparse defaults, except high_ratio (0.1) and the staleness bound max_skip_steps (3, not in
    the reference), both chosen by measurement (docs/quality Table 4), which reference_defaults() restores."""
    assert RASConfig().high_ratio == 0.1 and RASConfig().max_skip_steps == 3
    assert RASConfig.reference_defaults() == RASConfig().replace(high_ratio=1.0, max_skip_steps=None)
    assert RASConfig.reference_defaults(high_ratio=0.3, sample_ratio=0.25) == RASConfig(
        high_ratio=0.3, sample_ratio=0.25, max_skip_steps=None
    )
    with pytest.raises(ValueError, match=r"RASConfig\.high_ratio=2"):
        RASConfig.reference_defaults(high_ratio=2)
    config = RASConfig.reference_defaults()
    assert config.sample_ratio == 0.5
    assert config.scheduler_start_step is None and config.resolved_start_step(28) == 4
    assert config.scheduler_end_step is None
    assert config.error_reset_steps is None and config.resolved_error_reset_steps(28) == (12, 22)
    assert config.metric == "std"
    assert config.starvation_scale == 0.1
    assert config.high_ratio == 1.0
    assert config.skip_num_step == 0
    assert config.skip_num_step_length == 0
    assert config.num_inference_steps is None
    assert config.kv_cache is True
    assert config.max_skip_steps is None  # the reference bounds no token's staleness
    assert not config.dynamic


def test_valid_non_default_values_are_accepted_and_normalized():
    config = RASConfig(
        sample_ratio=1,
        scheduler_start_step=1,
        scheduler_end_step=1,
        error_reset_steps=[0, 5],
        metric="l2norm",
        starvation_scale=-0.5,
        high_ratio=0,
        skip_num_step=-64,
        skip_num_step_length=3,
        num_inference_steps=10,
        kv_cache=False,
    )
    assert config.error_reset_steps == (0, 5)
    assert isinstance(config.error_reset_steps, tuple)
    assert isinstance(config.sample_ratio, float) and config.sample_ratio == 1.0
    assert isinstance(config.high_ratio, float) and config.high_ratio == 0.0
    assert config.dynamic
    assert RASConfig(error_reset_steps=()).error_reset_steps == ()


# (field, bad value, fragment of the allowed range in the message)
INVALID = [
    ("sample_ratio", 1.5, "(0, 1]"),
    ("sample_ratio", 0.0, "(0, 1]"),
    ("sample_ratio", -0.2, "(0, 1]"),
    ("sample_ratio", float("nan"), "finite"),
    ("sample_ratio", float("inf"), "finite"),
    ("sample_ratio", "0.5", "real number"),
    ("sample_ratio", True, "real number"),
    ("sample_ratio", None, "real number"),
    ("scheduler_start_step", 0, ">= 1"),
    ("scheduler_start_step", -3, ">= 1"),
    ("scheduler_start_step", 4.0, "int"),
    ("scheduler_start_step", True, "int"),
    ("scheduler_start_step", "4", "int"),
    ("scheduler_end_step", 0, ">= 1"),
    ("scheduler_end_step", 10.5, "int"),
    ("scheduler_end_step", False, "int"),
    ("error_reset_steps", (12, 12), "distinct"),
    ("error_reset_steps", (12, -1), ">= 0"),
    ("error_reset_steps", (12, 2.0), "ints"),
    ("error_reset_steps", (True,), "ints"),
    ("error_reset_steps", "12,22", "tuple or list"),
    ("error_reset_steps", 12, "tuple or list"),
    ("error_reset_steps", {12: 1}, "tuple or list"),
    ("metric", "l1", "'std', 'l2norm'"),
    ("metric", "STD", "'std', 'l2norm'"),
    ("metric", None, "'std', 'l2norm'"),
    ("starvation_scale", float("nan"), "finite"),
    ("starvation_scale", float("-inf"), "finite"),
    ("starvation_scale", "0.1", "real number"),
    ("high_ratio", 1.01, "[0, 1]"),
    ("high_ratio", -0.01, "[0, 1]"),
    ("high_ratio", float("nan"), "finite"),
    ("high_ratio", "1", "real number"),
    ("skip_num_step", 1.5, "int"),
    ("skip_num_step", True, "int"),
    ("skip_num_step_length", -1, ">= 0"),
    ("skip_num_step_length", 2.0, "int"),
    ("dynamic_round_to", 0, ">= 1"),
    ("dynamic_round_to", 8.0, "int"),
    ("num_inference_steps", 0, ">= 1"),
    ("num_inference_steps", -28, ">= 1"),
    ("num_inference_steps", 28.0, "int"),
    ("num_inference_steps", True, "int"),
    ("kv_cache", 1, "bool"),
    ("kv_cache", "yes", "bool"),
    ("kv_cache", None, "bool"),
    ("graph_pieces", 1, "bool"),
    ("graph_pieces", None, "bool"),
    ("keep_caches", 1, "bool"),
    ("keep_caches", None, "bool"),
    ("kv_cache_dtype", "fp8", "None or one of fp8_e4m3"),
    ("kv_cache_dtype", "float8_e4m3fn", "None or one of fp8_e4m3"),
    ("max_skip_steps", 0, ">= 1"),
    ("max_skip_steps", -2, ">= 1"),
    ("max_skip_steps", 2.5, "int"),
    ("max_skip_steps", True, "int"),
    ("max_skip_steps", "4", "int"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), INVALID, ids=[f"{f}={v!r}" for f, v, _ in INVALID])
def test_invalid_values_are_rejected_with_field_value_and_range(field, value, allowed):
    with pytest.raises(ValueError) as info:
        RASConfig(**{field: value})
    message = str(info.value)
    assert f"RASConfig.{field}=" in message
    assert repr(value) in message or (isinstance(value, float) and math.isnan(value) and "nan" in message)
    assert allowed in message


def test_end_step_before_an_explicit_start_step_is_refused():
    with pytest.raises(ValueError, match=r"RASConfig\.scheduler_end_step=3 .*>= scheduler_start_step \(4\)"):
        RASConfig(scheduler_start_step=4, scheduler_end_step=3)


@pytest.mark.parametrize("num_steps", [1, 2, 3, 5, 8, 10, 12, 20, 22, 28, 50, 1000])
def test_default_config_works_for_every_step_count(num_steps):
    """Unset step-indexed fields follow T: the reference's positions at 28 steps, scaled; never an error."""
    config = RASConfig(num_inference_steps=num_steps)
    schedule = [config.is_dense_step(s, num_steps) for s in range(num_steps)]
    assert schedule[0], "step 0 is always dense"
    resets = config.resolved_error_reset_steps(num_steps)
    assert all(0 <= s < num_steps for s in resets) and len(set(resets)) == len(resets)
    start = config.resolved_start_step(num_steps)
    assert start >= 1 and start == max(1, round(4 * num_steps / 28 + 1e-9))
    if num_steps >= 4:
        assert not all(schedule), "a default generation of 4 or more steps has RAS steps"


def test_reset_and_start_defaults_scale_the_reference_schedule():
    config = RASConfig()
    assert (config.resolved_start_step(28), config.resolved_error_reset_steps(28)) == (4, (12, 22))
    assert (config.resolved_start_step(20), config.resolved_error_reset_steps(20)) == (3, (9, 16))
    assert (config.resolved_start_step(10), config.resolved_error_reset_steps(10)) == (1, (4, 8))
    # explicit values are kept as given and validated strictly
    assert RASConfig(error_reset_steps=()).resolved_error_reset_steps(10) == ()
    with pytest.raises(ValueError, match=r"error_reset_steps=\(12, 22\)"):
        RASConfig(error_reset_steps=(12, 22)).validate_for(10, 64)


def test_a_long_reset_list_validates_quickly():
    import time

    start = time.perf_counter()
    RASConfig(error_reset_steps=tuple(range(20000)))
    assert time.perf_counter() - start < 2.0  # quadratic duplicate checks took about 5 s


def test_every_field_has_an_invalid_case():
    assert {f.name for f in dataclasses.fields(RASConfig)} == {f for f, _, _ in INVALID}


def test_message_format_example():
    with pytest.raises(ValueError, match=r"^RASConfig\.sample_ratio=1\.5 is invalid: must be in \(0, 1\]$"):
        RASConfig(sample_ratio=1.5)


def test_dynamic_mode_needs_a_group_length():
    with pytest.raises(ValueError, match=r"RASConfig\.skip_num_step_length=0 is invalid: must be > 0"):
        RASConfig(skip_num_step=64)
    # A group length without a step is allowed (and has no effect).
    assert not RASConfig(skip_num_step_length=4).dynamic


def test_num_inference_steps_triggers_step_checks_at_construction():
    with pytest.raises(ValueError, match=r"RASConfig\.error_reset_steps=\(12, 22\).*\[22\]"):
        RASConfig(num_inference_steps=20, error_reset_steps=(12, 22))
    with pytest.raises(ValueError, match=r"RASConfig\.scheduler_start_step=4 .*< num_inference_steps \(4\)"):
        RASConfig(num_inference_steps=4, scheduler_start_step=4, error_reset_steps=())
    assert RASConfig(num_inference_steps=23).num_inference_steps == 23


def test_config_is_immutable_and_hashable():
    config = RASConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sample_ratio = 0.3  # type: ignore[misc]
    assert hash(config) == hash(RASConfig())
    assert RASConfig(error_reset_steps=(12, 22)) == RASConfig(error_reset_steps=[12, 22])


def test_replace_returns_validated_copy():
    config = RASConfig()
    changed = config.replace(sample_ratio=0.25, num_inference_steps=28)
    assert changed.sample_ratio == 0.25 and changed.num_inference_steps == 28
    assert config.sample_ratio == 0.5 and config.num_inference_steps is None
    with pytest.raises(ValueError, match=r"RASConfig\.high_ratio=2"):
        config.replace(high_ratio=2)
    with pytest.raises(ValueError, match="Unknown RASConfig field.*'ratio'"):
        config.replace(ratio=0.3)


def test_from_options():
    assert RASConfig.from_options(None) == RASConfig()
    assert RASConfig.from_options({}) == RASConfig()
    config = RASConfig.from_options({"sample_ratio": 0.3, "error_reset_steps": [5], "kv_cache": False})
    assert config == RASConfig(sample_ratio=0.3, error_reset_steps=(5,), kv_cache=False)
    with pytest.raises(ValueError) as info:
        RASConfig.from_options({"sample_ratio": 0.3, "inner_backend": "inductor", "foo": 1})
    message = str(info.value)
    assert "'foo'" in message and "'inner_backend'" in message
    for name in RASConfig.field_names():
        assert name in message
    with pytest.raises(ValueError, match=r"RASConfig\.metric='cos'"):
        RASConfig.from_options({"metric": "cos"})
    with pytest.raises(ValueError, match="must be a dict"):
        RASConfig.from_options([("sample_ratio", 0.3)])


def test_resolved_end_step():
    assert RASConfig().resolved_end_step(28) == 28
    assert RASConfig(scheduler_end_step=20).resolved_end_step(28) == 20
    with pytest.raises(ValueError, match="num_steps=0"):
        RASConfig().resolved_end_step(0)


class TestValidateFor:
    def test_defaults_valid_for_typical_generation(self):
        RASConfig().validate_for(28, 4096)
        RASConfig(scheduler_end_step=28).validate_for(28, 4096)  # end step = T is the default, valid
        RASConfig(scheduler_end_step=27).validate_for(28, 4096)

    def test_end_step_beyond_t(self):
        with pytest.raises(ValueError, match=r"RASConfig\.scheduler_end_step=29 is invalid: .*\[4, 28\]"):
            RASConfig(scheduler_end_step=29).validate_for(28, 4096)

    def test_reset_step_beyond_t(self):
        with pytest.raises(ValueError) as info:
            RASConfig(error_reset_steps=(12, 28)).validate_for(28, 4096)
        message = str(info.value)
        assert "RASConfig.error_reset_steps=(12, 28)" in message
        assert "[28]" in message and "[0, 27]" in message
        RASConfig(error_reset_steps=(12, 27)).validate_for(28, 4096)

    @pytest.mark.parametrize("num_steps", [1, 3, 4])
    def test_start_at_or_beyond_t(self, num_steps):
        with pytest.raises(ValueError, match=rf"RASConfig\.scheduler_start_step=4 .*\({num_steps}\)"):
            RASConfig(scheduler_start_step=4, error_reset_steps=()).validate_for(num_steps, 64)
        RASConfig(scheduler_start_step=4, error_reset_steps=()).validate_for(5, 64)

    def test_num_inference_steps_mismatch(self):
        config = RASConfig(num_inference_steps=28)
        config.validate_for(28, 1024)
        with pytest.raises(ValueError, match=r"RASConfig\.num_inference_steps=28 .*\(30\)"):
            config.validate_for(30, 1024)

    def test_dynamic_d_below_zero(self):
        # N=1024, T=28, start=4, L=4: avg=512, center=((28+4)//4)//2=4. With skip=200,
        # group 1 (steps 4-7): 512 + 200 * (1 - 4) = -88 -> floor to a multiple of 64 -> -128 < 0.
        # Group 0 (steps 0-3: 512 - 800 = -288) is dense, so it is not what triggers the error.
        config = RASConfig(skip_num_step=200, skip_num_step_length=4)
        with pytest.raises(ValueError) as info:
            config.validate_for(28, 1024)
        message = str(info.value)
        assert "RASConfig.skip_num_step=200" in message
        assert "D=-128" in message and "step 4" in message and "[0, 1023]" in message

    def test_dynamic_d_above_n_minus_one(self):
        # group 6 (steps 24-27): 512 + 130 * (6 - 4) = 772 -> 768 is fine with N=1024 ...
        RASConfig(skip_num_step=130, skip_num_step_length=4).validate_for(28, 1024)
        # ... but with -260: group 1 = 512 + 780 = 1292 -> 1280 > 1023.
        with pytest.raises(ValueError, match=r"skip_num_step=-260 .*D=1280 .*step 4.*\[0, 1023\]"):
            RASConfig(skip_num_step=-260, skip_num_step_length=4).validate_for(28, 1024)

    def test_dynamic_out_of_range_only_on_dense_steps_is_fine(self):
        # Group 0 would be -288 (see above) but steps 0-3 are dense; make group 1 valid by starting later.
        # With start=8: center=((28+8)//4)//2=4; groups 2.. : 512 + 200*(2-4) = 112 -> 64 >= 0. Valid.
        RASConfig(skip_num_step=200, skip_num_step_length=4, scheduler_start_step=8).validate_for(28, 1024)

    def test_dynamic_checks_skipped_when_everything_dense(self):
        RASConfig(sample_ratio=1.0, skip_num_step=-10_000, skip_num_step_length=4).validate_for(28, 1024)

    def test_static_leaves_at_least_one_token(self):
        # 1 - 1e-17 == 1.0 in floating point: D would be N, leaving nothing to compute.
        with pytest.raises(ValueError, match=r"RASConfig\.sample_ratio=1e-17 .*\[0, 63\]"):
            RASConfig(sample_ratio=1e-17).validate_for(28, 64)
        RASConfig(sample_ratio=0.01).validate_for(28, 64)

    @pytest.mark.parametrize(("num_steps", "num_tokens"), [(0, 64), (28, 0), (28.0, 64), (28, True)])
    def test_bad_arguments(self, num_steps, num_tokens):
        with pytest.raises(ValueError):
            RASConfig().validate_for(num_steps, num_tokens)
