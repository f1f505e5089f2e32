"""Where a compiled transformer learns which denoising step it is running.

The compiled graph sees one transformer call at a time. A step source turns each call into
``(step, num_steps, new_generation)``:

- ``SchedulerSteps`` (used by ``rascompile.apply``) reads the pipeline's scheduler: its
  ``timesteps`` give T for every pipeline call and its ``step_index`` is ``None`` until the
  first ``scheduler.step`` of a generation, which marks step 0 exactly.
- ``TimestepSteps`` (the ``torch.compile(..., backend="ras")`` path) counts calls and watches
  the timestep: within a generation it moves strictly in one direction (SD3 passes decreasing
  timesteps, LuminaPipeline increasing ones); a repeat or a reversal starts a new generation.

Both mark a call that repeats the previous call's latents and timestep as ``repeat``: another call
for the same step, as pipelines that run one transformer call per guidance branch make (Wan,
Lumina2, CogView4, Chroma; true CFG in Flux and Qwen-Image). Such a call neither starts a
generation nor advances the step.

A call at the previous call's timestep with other latents is a second-order scheduler's second model
evaluation (FlowMatchHeunDiscreteScheduler: timesteps t0, t1, t1, t2, t2, ...).
``TimestepSteps`` cannot map those calls onto the RAS schedule's steps (``rascompile.apply`` refuses such
schedulers up front), so from that call on the generation runs dense (``StepInfo.dense_reason``), and the
generations after it too, until one shows one call per timestep again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class StepInfo:
    step: int
    num_steps: int
    new_generation: bool
    repeat: bool = False  # same latents and timestep as the previous call: another call for the same step
    generation: int = 0  # the step source's count of generations begun, so a graph can tell one it missed
    dense_reason: str | None = None  # set when this call must run dense whatever the schedule says, and why


SECOND_ORDER = (
    "the pipeline calls the transformer twice per timestep with different latents, as second-order schedulers "
    "such as FlowMatchHeunDiscreteScheduler do: RAS plans one transformer call per step, so this generation runs "
    "dense. Use a first-order scheduler (FlowMatchEulerDiscreteScheduler) to keep RAS"
)


class _LastCall:
    """The previous call's latents and timestep, to tell a second call for the same step from a new step."""

    def __init__(self):
        self.latents: torch.Tensor | None = None
        self.timestep: float | None = None

    def forget(self) -> None:
        self.latents, self.timestep = None, None

    def repeats(self, latents: torch.Tensor, timestep: float | None) -> bool:
        last = self.latents
        return (
            last is not None
            and timestep == self.timestep
            and last.shape == latents.shape
            and last.dtype == latents.dtype
            and last.device == latents.device
            and torch.equal(last, latents)
        )

    def remember(self, latents: torch.Tensor, timestep: float | None) -> None:
        self.latents, self.timestep = latents.detach().clone(), timestep


def _timestep_value(timestep: torch.Tensor | None) -> float | None:
    return float(timestep.reshape(-1)[0]) if timestep is not None else None


MISSED = object()  # the timestep of a call a step source was told of but did not see


class SchedulerSteps:
    """Steps read from a diffusers scheduler (first-order schedulers: one model call per step)."""

    def __init__(self, scheduler, num_inference_steps: int | None = None):
        order = getattr(scheduler, "order", 1)
        if order != 1:
            raise ValueError(
                f"scheduler {type(scheduler).__name__} has order={order}; RAS needs one transformer call per step "
                "(order=1), e.g. FlowMatchEulerDiscreteScheduler"
            )
        self.scheduler = scheduler
        self.expected = num_inference_steps
        self.last = _LastCall()
        self.generation = 0

    def reset(self) -> None:
        """The scheduler marks every generation's first step itself; only the last call is forgotten."""
        self.last.forget()

    def starts_generation(self, latents: torch.Tensor, timestep: torch.Tensor | None) -> bool:
        """Whether ``advance`` would start a new generation for this call (without advancing)."""
        return self.scheduler.step_index is None and not self.last.repeats(latents, _timestep_value(timestep))

    def advance_missed(self) -> StepInfo:
        """Count a call this source did not see (the scheduler still says which step it was)."""
        self.last.forget()
        index = self.scheduler.step_index
        if index is None:
            self.generation += 1
            return StepInfo(0, len(self.scheduler.timesteps), True, generation=self.generation)
        return StepInfo(int(index), len(self.scheduler.timesteps), False, generation=self.generation)

    def advance(self, latents: torch.Tensor, timestep: torch.Tensor | None) -> StepInfo:
        num_steps = len(self.scheduler.timesteps)
        if self.expected is not None and num_steps != self.expected:
            raise ValueError(
                f"the pipeline runs {num_steps} steps but RASConfig.num_inference_steps={self.expected}; "
                "leave num_inference_steps unset with rascompile.apply, or make them match"
            )
        index = self.scheduler.step_index
        t = _timestep_value(timestep)
        if self.last.repeats(latents, t):
            return StepInfo(0 if index is None else int(index), num_steps, False, True, self.generation)
        self.last.remember(latents, t)
        if index is None:
            self.generation += 1
            return StepInfo(0, num_steps, True, generation=self.generation)
        return StepInfo(int(index), num_steps, False, generation=self.generation)


class TimestepSteps:
    """Steps counted from the calls themselves, with generation boundaries found from the timestep."""

    def __init__(self, num_inference_steps: int):
        self.num_steps = num_inference_steps
        self.last = _LastCall()
        self.generation = 0
        self.second_order = False  # the current generation evaluates the model twice per timestep: dense
        self.expect_second_order = False  # the last generation did: the next one runs dense from its first call
        self.saw_second_evaluation = False  # a second evaluation seen in the current generation
        self.reset()

    def reset(self) -> None:
        """The next call starts a new generation."""
        self.step, self.timesteps = -1, []
        self.second_order = False  # a second-order generation under way is forgotten; expect_second_order stays
        self.last.forget()

    def starts_generation(self, latents: torch.Tensor, timestep: torch.Tensor | None) -> bool:
        """Whether ``advance`` would start a new generation for this call (without advancing)."""
        t = _timestep_value(timestep)
        return not self.last.repeats(latents, t) and self._would_restart(t)

    def _would_restart(self, t: float | None) -> bool:
        # Without a timestep input (a graph that baked it in), generations are counted every T calls.
        if self.step < 0:
            return True
        if t is None:
            return self.step + 1 >= self.num_steps
        return self._restarts(t)

    def advance(self, latents: torch.Tensor, timestep: torch.Tensor | None) -> StepInfo:
        t = _timestep_value(timestep)
        if self.last.repeats(latents, t):
            return StepInfo(max(self.step, 0), self.num_steps, False, True, self.generation, self._dense_reason())
        self.last.remember(latents, t)
        if not self.second_order and self._second_evaluation(t):
            self.second_order = self.expect_second_order = True
        if self.second_order:
            return self._advance_second_order(t)
        if self._would_restart(t):
            if 0 <= self.step < self.num_steps - 1:
                warnings.warn(
                    f"a generation ended after {self.step + 1} of num_inference_steps={self.num_steps} steps; "
                    "fine if it was interrupted, otherwise set num_inference_steps to the pipeline's step count",
                    stacklevel=3,
                )
            self._start_generation(t)
            if self.expect_second_order:
                self.second_order = True  # until this generation shows one call per timestep
                return StepInfo(0, self.num_steps, True, generation=self.generation, dense_reason=SECOND_ORDER)
            return StepInfo(0, self.num_steps, True, generation=self.generation)
        if self.step + 1 >= self.num_steps:
            raise ValueError(
                f"the pipeline runs more than num_inference_steps={self.num_steps} steps in one generation; "
                "set num_inference_steps in the backend options to the pipeline's step count"
            )
        self.step += 1
        self.timesteps.append(t)
        return StepInfo(self.step, self.num_steps, False, generation=self.generation)

    def advance_missed(self) -> StepInfo:
        """Count a call this source did not see as the first step of a new generation (it is the call during
        which Dynamo compiled the transformer, the first of its first generation)."""
        self.last.forget()
        self._start_generation(MISSED)
        return StepInfo(0, self.num_steps, True, generation=self.generation)

    def _start_generation(self, t: float | None) -> None:
        self.step, self.timesteps = 0, [t]
        self.generation += 1
        self.saw_second_evaluation = False

    def _dense_reason(self) -> str | None:
        return SECOND_ORDER if self.second_order else None

    def _second_evaluation(self, t: float | None) -> bool:
        """A call (not a repeat) at the previous call's timestep in the middle of a generation. Not after step 0:
        second-order schedulers evaluate the first timestep once, and a call at step 0's timestep with other
        latents is the next generation's first step (the last one was interrupted)."""
        return 1 <= self.step < self.num_steps - 1 and t is not None and t == self.timesteps[-1]

    def _advance_second_order(self, t: float | None) -> StepInfo:
        """A call of a generation that runs dense because it evaluates the model twice per timestep. A timestep
        that moves against the generation's direction starts the next generation, which runs dense too if this
        one made a second evaluation."""
        distinct = [x for i, x in enumerate(self.timesteps) if i == 0 or x != self.timesteps[i - 1]]
        if t is not None and len(distinct) >= 2 and (t - distinct[-1]) * (distinct[-1] - distinct[-2]) < 0:
            self.expect_second_order = self.saw_second_evaluation
            self._start_generation(t)
            self.second_order = self.expect_second_order
            return StepInfo(0, self.num_steps, True, generation=self.generation, dense_reason=self._dense_reason())
        if t is not None and t == self.timesteps[-1]:
            self.saw_second_evaluation = True
        else:
            self.step += 1
        self.timesteps.append(t)
        return StepInfo(
            min(self.step, self.num_steps - 1),
            self.num_steps,
            False,
            generation=self.generation,
            dense_reason=SECOND_ORDER,
        )

    def _restarts(self, t: float) -> bool:
        previous = self.timesteps[-1]
        if previous is MISSED:
            return False  # the generation's first call, unseen: this call is its second
        if previous is None or t == previous:
            return True
        if len(self.timesteps) < 2 or self.timesteps[-2] is MISSED:
            return False
        direction = self.timesteps[-1] - self.timesteps[-2]
        return (t - previous) * direction < 0


def scheduler_steps(scheduler, num_inference_steps: int | None = None) -> Callable[[], SchedulerSteps]:
    """A factory of ``SchedulerSteps`` over ``scheduler`` (``rascompile.apply``'s step source)."""
    return lambda: SchedulerSteps(scheduler, num_inference_steps)
