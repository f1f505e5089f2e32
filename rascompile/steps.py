"""Where a compiled transformer learns which denoising step it is running.

The compiled graph sees one transformer call at a time. A step source turns each call into
``(step, num_steps, new_generation)``:

- ``SchedulerSteps`` (used by ``rascompile.apply``) reads the pipeline's scheduler: its
  ``timesteps`` give T for every pipeline call and its ``step_index`` is ``None`` until the
  first ``scheduler.step`` of a generation, which marks step 0 exactly.
- ``TimestepSteps`` (the ``torch.compile(..., backend="ras")`` path) counts calls and watches
  the timestep: within a generation it moves strictly in one direction (SD3 passes decreasing
  timesteps, LuminaPipeline increasing ones); a repeat or a reversal starts a new generation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass
class StepInfo:
    step: int
    num_steps: int
    new_generation: bool


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

    def reset(self) -> None:
        """Nothing to forget: the scheduler marks every generation's first step itself."""

    def advance(self, latents: torch.Tensor, timestep: torch.Tensor | None) -> StepInfo:
        num_steps = len(self.scheduler.timesteps)
        if self.expected is not None and num_steps != self.expected:
            raise ValueError(
                f"the pipeline runs {num_steps} steps but RASConfig.num_inference_steps={self.expected}; "
                "leave num_inference_steps unset with rascompile.apply, or make them match"
            )
        index = self.scheduler.step_index
        if index is None:
            return StepInfo(0, num_steps, True)
        return StepInfo(int(index), num_steps, False)


class TimestepSteps:
    """Steps counted from the calls themselves, with generation boundaries found from the timestep."""

    def __init__(self, num_inference_steps: int):
        self.num_steps = num_inference_steps
        self.reset()

    def reset(self) -> None:
        """The next call starts a new generation."""
        self.step, self.timesteps = -1, []

    def advance(self, latents: torch.Tensor, timestep: torch.Tensor | None) -> StepInfo:
        t = float(timestep.reshape(-1)[0]) if timestep is not None else None
        # Without a timestep input (a graph that baked it in), generations are counted every T calls.
        if self.step < 0:
            restart = True
        elif t is None:
            restart = self.step + 1 >= self.num_steps
        else:
            restart = self._restarts(t)
        if restart:
            if 0 <= self.step < self.num_steps - 1:
                warnings.warn(
                    f"a generation ended after {self.step + 1} of num_inference_steps={self.num_steps} steps; "
                    "fine if it was interrupted, otherwise set num_inference_steps to the pipeline's step count",
                    stacklevel=3,
                )
            self.step, self.timesteps = 0, [t]
            return StepInfo(0, self.num_steps, True)
        if self.step + 1 >= self.num_steps:
            raise ValueError(
                f"the pipeline runs more than num_inference_steps={self.num_steps} steps in one generation; "
                "set num_inference_steps in the backend options to the pipeline's step count"
            )
        self.step += 1
        self.timesteps.append(t)
        return StepInfo(self.step, self.num_steps, False)

    def _restarts(self, t: float) -> bool:
        previous = self.timesteps[-1]
        if previous is None or t == previous:
            return True
        if len(self.timesteps) < 2:
            return False
        direction = self.timesteps[-1] - self.timesteps[-2]
        return (t - previous) * direction < 0
