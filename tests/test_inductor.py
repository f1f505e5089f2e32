"""The RAS graphs compiled by inductor (C++ on CPU; slow, so only these few tests use it)."""

import pytest
import torch
from models import lumina_call_kwargs, sd3_call_kwargs, tiny_lumina_pipeline, tiny_sd3_pipeline
from oracle import RASOracle

import rascompile
from rascompile import RASConfig

STEPS = 6
SETTINGS = dict(num_inference_steps=STEPS, scheduler_start_step=2, error_reset_steps=(4,), sample_ratio=0.5)
MODELS = {
    "sd3": (tiny_sd3_pipeline, sd3_call_kwargs),
    "lumina": (tiny_lumina_pipeline, lumina_call_kwargs),
}


@pytest.mark.inductor
@pytest.mark.parametrize("model", sorted(MODELS))
def test_inductor_ras_equals_oracle(model):
    build, kwargs_fn = MODELS[model]
    oracle = RASOracle(**SETTINGS)
    pipe = build()
    with oracle.install(pipe), torch.no_grad():
        expected = pipe(**kwargs_fn(num_prompts=1, num_images_per_prompt=2, steps=STEPS))[0]
    pipe = build()
    backend = rascompile.apply(pipe, RASConfig(**SETTINGS), inner_backend="inductor")
    got = pipe(**kwargs_fn(num_prompts=1, num_images_per_prompt=2, steps=STEPS))[0]
    assert backend.graphs[0].fallback_reason is None
    assert [d.kind for d in backend.graphs[0].controller.history].count("ras") == 3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
