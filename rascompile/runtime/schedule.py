"""The per-step plan of a RAS generation: which steps are dense and how many tokens a RAS step computes.

Everything here is a pure function of (config, T, N).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import RASConfig

__all__ = ["StepPlan", "build_schedule", "active_token_counts", "split_num_dropped", "num_active_tokens"]


@dataclass(frozen=True)
class StepPlan:
    """
    The plan of one denoising step.

    Attributes:
        step (`int`):
            0-based step index.
        dense (`bool`):
            Whether the transformer computes every token on this step.
        num_dropped (`int`):
            `D`, the number of tokens the step drops as the RAS rules define it (0 when dense). Pass it to
            [`~rascompile.runtime.selector.select_active_tokens`] together with the config's `high_ratio`. With
            `high_ratio` not in `{0, 1}` the tokens actually dropped, `num_tokens - num_active`, can be fewer
            than `D`.
        num_active (`int`):
            `k`, the number of tokens the step computes (`N` when dense).
    """

    step: int
    dense: bool
    num_dropped: int
    num_active: int


def split_num_dropped(num_dropped: int, high_ratio: float) -> tuple[int, int]:
    """
    Split `D` dropped tokens into `(num_low, num_high)`: the `floor(D * (1 - high_ratio))` lowest-scoring and
    the `floor(D * high_ratio)` highest-scoring tokens. The two can sum to less than `D`.
    """
    return math.floor(num_dropped * (1.0 - high_ratio)), math.floor(num_dropped * high_ratio)


def num_active_tokens(num_tokens: int, num_dropped: int, high_ratio: float) -> int:
    """`k = N - floor(D * (1 - high_ratio)) - floor(D * high_ratio)`: the tokens computed when `D` drop."""
    low, high = split_num_dropped(num_dropped, high_ratio)
    return num_tokens - low - high


def build_schedule(config: RASConfig, num_steps: int, num_tokens: int) -> tuple[StepPlan, ...]:
    """
    Plan the `num_steps` steps (`T`) of a generation over `num_tokens` image tokens per image (`N`).

    Calls `config.validate_for(num_steps, num_tokens)` first, so an invalid combination raises a `ValueError`
    before anything runs. A step is dense when it is before `scheduler_start_step`, after the (resolved)
    `scheduler_end_step`, or an error-reset step. Every step is dense when `sample_ratio == 1.0`; a scheduled
    RAS step that would drop no token at all is planned as dense too, since it computes every token.
    """
    config.validate_for(num_steps, num_tokens)
    plans = []
    for step in range(num_steps):
        num_dropped = 0
        if config.sample_ratio < 1.0 and not config.is_dense_step(step, num_steps):
            if config.dynamic:
                num_dropped = config.dynamic_num_dropped(step, num_steps, num_tokens)
            else:
                num_dropped = config.static_num_dropped(num_tokens)
        num_active = num_active_tokens(num_tokens, num_dropped, config.high_ratio)
        if num_active == num_tokens:
            plans.append(StepPlan(step=step, dense=True, num_dropped=0, num_active=num_tokens))
        else:
            plans.append(StepPlan(step=step, dense=False, num_dropped=num_dropped, num_active=num_active))
    return tuple(plans)


def active_token_counts(schedule: Iterable[StepPlan]) -> list[int]:
    """The distinct `num_active` values of the RAS (non-dense) steps, sorted ascending."""
    return sorted({plan.num_active for plan in schedule if not plan.dense})
