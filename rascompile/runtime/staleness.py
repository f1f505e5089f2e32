"""Staleness: how many RAS steps in a row a token goes uncomputed.

The controller keeps, per token, the RAS steps it has been skipped in a row (``advance_skip_runs``) and passes
``max_skip_steps`` minus that as each token's deadline to the selector; ``simulated_staleness`` runs the same
selection over a schedule with random update metrics, for reports that have no generation to look at
(``rascompile check``).
"""

from __future__ import annotations

import torch

from ..config import RASConfig
from .schedule import build_schedule
from .selector import initial_drop_counts, select_active_tokens


def advance_skip_runs(skip_run: torch.Tensor, active_idx: torch.Tensor | None) -> torch.Tensor:
    """``skip_run`` [B, N] after one step: 0 at the tokens it computed (all of them when ``active_idx`` is None,
    a dense or capture step), one more at the others."""
    if active_idx is None:
        return torch.zeros_like(skip_run)
    skipped = torch.ones_like(skip_run).scatter_(1, active_idx, 0)
    return (skip_run + 1) * skipped


def deadlines(config: RASConfig, skip_run: torch.Tensor) -> torch.Tensor | None:
    """The RAS steps each token may still be skipped before ``config.max_skip_steps`` requires it (None: no bound)."""
    return None if config.max_skip_steps is None else config.max_skip_steps - skip_run


def simulated_staleness(config: RASConfig, num_tokens: int, num_steps: int, seed: int = 0) -> dict:
    """Each token's longest run of skipped RAS steps in one generation of ``num_steps`` under ``config``'s
    schedule and selection, with uniformly random update metrics: ``{"max": ..., "p99": ...}``."""
    schedule = build_schedule(config, num_steps, num_tokens)
    generator = torch.Generator().manual_seed(seed)
    counts = initial_drop_counts(1, num_tokens, num_steps)
    run = torch.zeros(1, num_tokens, dtype=torch.int64)
    longest = torch.zeros_like(run)
    for plan in schedule:
        idx = None
        if not plan.dense:
            metric = torch.rand(1, num_tokens, generator=generator)
            rules = (plan.num_dropped, config.high_ratio, config.starvation_scale, deadlines(config, run))
            idx = select_active_tokens(metric, counts, *rules)
        run = advance_skip_runs(run, idx)
        longest = torch.maximum(longest, run)
    values = longest.flatten().float()
    return {"max": int(values.max().item()), "p99": float(torch.quantile(values, 0.99).item())}
