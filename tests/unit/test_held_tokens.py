"""Tokens whose latents never change (the reference images editing pipelines join to the token axis): RAS steps
never select them, and the schedule's ratio counts the other tokens."""

import torch

from rascompile.config import RASConfig
from rascompile.runtime.controller import GraphLayout, RASController
from rascompile.runtime.schedule import build_schedule
from rascompile.runtime.selector import select_active_tokens, select_active_tokens_among
from rascompile.runtime.steps import TimestepSteps

STEPS, BATCH, TOKENS, HELD, CHANNELS = 8, 2, 16, 4, 6
CONFIG = RASConfig(
    sample_ratio=0.5, scheduler_start_step=2, error_reset_steps=(5,), num_inference_steps=STEPS, dynamic_round_to=1
)


def _controller() -> RASController:
    layout = GraphLayout(
        batch_size=BATCH,
        num_tokens=TOKENS,
        patch_size=1,
        output_cache=((BATCH, TOKENS, CHANNELS), torch.float32),
        kv_caches=(),
        latent_layout="packed",
    )
    return RASController(CONFIG, layout, TimestepSteps(STEPS), torch.device("cpu"))


def _generation(control: RASController, change_held_at: int | None = None) -> list:
    """Latents whose last ``HELD`` tokens never change (unless at step ``change_held_at``), the others moving."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(BATCH, TOKENS, CHANNELS, generator=gen)
    decisions = []
    for step in range(STEPS):
        decisions.append(control.decide(latents, torch.tensor([1000.0 - 100 * step] * BATCH)))
        update = torch.randn(BATCH, TOKENS, CHANNELS, generator=gen)
        if step + 1 != change_held_at:
            update[:, TOKENS - HELD :] = 0
        latents = latents + update
    return decisions


def test_tokens_held_still_are_never_selected_and_the_ratio_counts_the_others():
    control = _controller()
    decisions = _generation(control)
    moving = build_schedule(CONFIG, STEPS, TOKENS - HELD)
    assert [d.kind for d in decisions] == ["capture", "capture", "ras", "ras", "ras", "capture", "ras", "ras"]
    assert torch.equal(control.held_tokens, torch.arange(TOKENS - HELD, TOKENS))
    for decision in decisions:
        if decision.kind == "ras":
            assert decision.num_active == moving[decision.step].num_active < TOKENS - HELD
            assert int(decision.active_idx.max()) < TOKENS - HELD
    # a new generation finds them again, from nothing
    control.reset()
    assert [d.kind for d in _generation(control)] == [d.kind for d in decisions]


def test_a_held_token_that_begins_to_change_refills_the_caches_and_is_selectable_again():
    control = _controller()
    decisions = _generation(control, change_held_at=4)
    # step 4's latents moved the held tokens: that step refills the caches; step 6 finds them held again
    assert [d.kind for d in decisions] == ["capture", "capture", "ras", "ras", "capture", "capture", "ras", "ras"]
    assert control.held_tokens.numel() == HELD


def test_without_held_tokens_the_selection_is_unchanged():
    control = _controller()
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, TOKENS, CHANNELS, generator=gen)
    schedule = build_schedule(CONFIG, STEPS, TOKENS)
    for step in range(STEPS):
        decision = control.decide(latents, torch.tensor([1000.0 - 100 * step] * BATCH))
        if decision.kind == "ras":
            assert decision.num_active == schedule[step].num_active
        latents = latents + torch.randn(BATCH, TOKENS, CHANNELS, generator=gen)
    assert control.held_tokens.numel() == 0


def test_selection_among_candidates_equals_selection_on_their_columns():
    gen = torch.Generator().manual_seed(2)
    metric = torch.rand(3, 10, generator=gen)
    candidates = torch.tensor([0, 2, 3, 5, 8, 9])
    counts = torch.randn(3, 10, generator=gen)
    expected_counts = counts[:, candidates].clone()
    expected = candidates[select_active_tokens(metric[:, candidates], expected_counts, 3, 0.1, 0.1)]
    others = counts[:, [1, 4, 6, 7]].clone()
    got = select_active_tokens_among(metric, counts, candidates, 3, 0.1, 0.1)
    assert torch.equal(got, expected)
    assert torch.equal(counts[:, candidates], expected_counts)
    assert torch.equal(counts[:, [1, 4, 6, 7]], others)
