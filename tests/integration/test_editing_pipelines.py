"""Image-editing pipelines (FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2 with a reference image) under RAS, and
Ideogram 4, which packs zero latent rows for its text before the image tokens.

The editing pipelines join the reference image's latents to the token axis after the latents being denoised. Those
tokens' latents never change (nor do Ideogram 4's text rows), so the controller finds them at the first RAS step and
never selects them: their outputs (which the pipeline slices off) and their K/V come from the dense steps, and the
ratio counts the image being generated.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rascompile.runtime.registry import controllers_of, status
from rascompile.runtime.schedule import build_schedule
from tests.support import models_editing as editing
from tests.support import models_layouts as layouts

OPTIONS = dict(
    num_inference_steps=8,
    scheduler_start_step=2,
    error_reset_steps=(5,),
    sample_ratio=0.5,
    inner_backend="aot_eager",
)
# (pipeline builder, its call kwargs, tokens generated, the held tokens' rows, calls per step)
EDITING = {
    "flux-kontext": (editing.tiny_flux_kontext_pipeline, editing.flux_kontext_pipeline_kwargs, 64, range(64, 128), 1),
    "qwen-image-edit": (
        editing.tiny_qwen_image_edit_pipeline,
        editing.qwen_image_edit_pipeline_kwargs,
        16,
        range(16, 272),
        2,
    ),
    "flux2-edit": (editing.tiny_flux2_edit_pipeline, editing.flux2_edit_pipeline_kwargs, 64, range(64, 128), 1),
    "ideogram4": (layouts.tiny_ideogram4_pipeline, layouts.ideogram4_pipeline_kwargs, 64, range(0, 5), 1),
}


@pytest.mark.parametrize("name", EDITING)
def test_reference_tokens_are_never_selected(name):
    build, kwargs, generated, held, branches = EDITING[name]
    pipe = build()
    with torch.no_grad():
        dense = pipe(**kwargs())[0]
    pipe = build()
    pipe.transformer = torch.compile(pipe.transformer, backend="ras", options=OPTIONS)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = pipe(**kwargs())[0]
    assert not [str(w.message) for w in caught if "rascompile" in str(w.message)]
    (control,) = controllers_of(pipe.transformer)
    assert control.layout.num_tokens == generated + len(held)
    assert torch.equal(control.held_tokens, torch.tensor(held))
    schedule = build_schedule(control.config, 8, generated)
    ras = [d for d in control.history + control.branch_history if d.kind == "ras"]
    assert [d.kind for d in control.history] == ["capture", "capture", "ras", "ras", "ras", "capture", "ras", "ras"]
    assert len(ras) == 5 * branches
    for decision in ras:
        assert decision.num_active == schedule[decision.step].num_active < generated
        assert not torch.isin(decision.active_idx, control.held_tokens).any()
    assert control.cache_peak_branches == branches
    assert f"{len(held)} tokens whose latents never changed" in status(pipe.transformer)
    assert torch.isfinite(got).all()
    assert 0 < (got - dense).abs().max() < dense.abs().max()
