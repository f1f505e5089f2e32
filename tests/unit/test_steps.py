"""Generation boundaries of the backend="ras" path, found from the timestep alone."""

import warnings

import pytest
import torch

from rascompile.runtime.steps import TimestepSteps

LATENTS = torch.zeros(1)


def _run(steps, timesteps):
    return [(i.step, i.new_generation) for i in (steps.advance(LATENTS, torch.tensor([t])) for t in timesteps)]


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["increasing", "decreasing"])
def test_a_reversal_or_repeat_starts_a_new_generation(sign):
    steps = TimestepSteps(4)
    ts = [sign * t for t in (1.0, 2.0, 3.0, 4.0)]
    assert _run(steps, ts) == [(0, True), (1, False), (2, False), (3, False)]
    assert _run(steps, ts[:2]) == [(0, True), (1, False)]
    with pytest.warns(UserWarning, match="ended after 2 of num_inference_steps=4"):
        assert _run(steps, ts[:1]) == [(0, True)]  # reversal after an interrupted generation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a repeated timestep with other latents right after step 0: another generation's first step
        info = steps.advance(torch.ones(1), torch.tensor([ts[0]]))
        assert (info.step, info.new_generation, info.repeat) == (0, True, False)


@pytest.mark.parametrize("source", ["timestep", "no-timestep"])
def test_same_latents_and_timestep_is_another_call_for_the_same_step(source):
    """One transformer call per guidance branch: the second call neither advances nor restarts."""
    steps = TimestepSteps(4)
    t = (lambda v: torch.tensor([v])) if source == "timestep" else (lambda v: None)
    first = steps.advance(torch.zeros(2), t(1.0))
    again = steps.advance(torch.zeros(2), t(1.0))
    following = steps.advance(torch.ones(2), t(0.5))
    assert (first.step, first.new_generation, first.repeat) == (0, True, False)
    assert (again.step, again.new_generation, again.repeat) == (0, False, True)
    assert (following.step, following.new_generation, following.repeat) == (1, False, False)
    assert first.generation == again.generation == following.generation


def test_more_steps_than_configured_is_an_error():
    steps = TimestepSteps(3)
    _run(steps, [3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="more than num_inference_steps=3"):
        _run(steps, [0.5])


def test_without_a_timestep_generations_are_counted():
    steps = TimestepSteps(3)
    infos = [steps.advance(torch.full((1,), float(i)), None) for i in range(7)]  # the latents move every step
    assert [(i.step, i.new_generation) for i in infos] == [
        (0, True),
        (1, False),
        (2, False),
        (0, True),
        (1, False),
        (2, False),
        (0, True),
    ]


def test_reset_starts_a_new_generation_at_the_next_call():
    steps = TimestepSteps(4)
    _run(steps, [4.0, 3.0])
    steps.reset()
    assert _run(steps, [2.0, 1.0]) == [(0, True), (1, False)]  # would continue the old one without reset


def _heun_timesteps(n):
    """FlowMatchHeunDiscreteScheduler's calls for n steps: t0, t1, t1, ..., t(n-1), t(n-1)."""
    ts = [1000.0 - 100.0 * i for i in range(n)]
    return ts[:1] + [t for t in ts[1:] for _ in range(2)]


def _advance_all(steps, timesteps, start=0.0):
    infos = []
    for i, t in enumerate(timesteps):  # every call brings new latents, as a second evaluation does
        infos.append(steps.advance(torch.full((1,), start + i), torch.tensor([t])))
    return infos


def test_a_second_evaluation_at_the_same_timestep_turns_the_generation_dense():
    """Second-order schedulers: never the restart pattern (every repeated timestep a new generation); from the
    second evaluation on the generation runs dense, and the next second-order generation from its first call."""
    steps = TimestepSteps(6)
    first = _advance_all(steps, _heun_timesteps(6))
    assert [i.new_generation for i in first] == [True] + [False] * 10
    assert [i.dense_reason is not None for i in first] == [False, False] + [True] * 9
    assert "second-order schedulers" in first[2].dense_reason
    second = _advance_all(steps, _heun_timesteps(6), start=100.0)
    assert [i.new_generation for i in second] == [True] + [False] * 10
    assert all(i.dense_reason is not None for i in second)
    assert steps.generation == 2


def test_a_first_order_generation_after_a_second_order_one_gets_ras_back():
    steps = TimestepSteps(4)
    _advance_all(steps, _heun_timesteps(4))
    dense_again = _advance_all(steps, [1000.0, 900.0, 800.0, 700.0], start=50.0)  # expected second order: dense
    assert dense_again[0].new_generation and all(i.dense_reason for i in dense_again)
    back = _advance_all(steps, [1000.0, 900.0, 800.0, 700.0], start=80.0)
    assert [(i.step, i.new_generation, i.dense_reason) for i in back] == [
        (0, True, None),
        (1, False, None),
        (2, False, None),
        (3, False, None),
    ]
