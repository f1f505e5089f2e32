"""Compiled RAS equals the independent eager oracle (tests/support/oracle.py) over whole generations."""

import pytest
import torch

import rascompile
from rascompile import RASConfig
from tests.support.models import lumina_call_kwargs, sd3_call_kwargs, tiny_lumina_pipeline, tiny_sd3_pipeline
from tests.support.oracle import RASOracle

STEPS = 8
BASE = dict(num_inference_steps=STEPS, scheduler_start_step=2, error_reset_steps=(5,))
CASES = {
    "static": dict(sample_ratio=0.5),
    "l2norm_high0.3_starve1": dict(sample_ratio=0.5, metric="l2norm", high_ratio=0.3, starvation_scale=1.0),
    "quarter_nonsquare_tail": dict(sample_ratio=0.25, scheduler_end_step=6, latent_width=24),
    "negative_starvation_no_reset": dict(sample_ratio=0.375, starvation_scale=-0.5, error_reset_steps=()),
    "dynamic": dict(sample_ratio=0.5, skip_num_step=64, skip_num_step_length=2, latent_height=32, latent_width=32),
    "dynamic_round_to_4": dict(sample_ratio=0.5, skip_num_step=6, skip_num_step_length=2, dynamic_round_to=4),
}
MODELS = {
    "sd3": (tiny_sd3_pipeline, sd3_call_kwargs),
    "lumina": (tiny_lumina_pipeline, lumina_call_kwargs),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_compiled_ras_equals_oracle(model, case):
    build, kwargs_fn = MODELS[model]
    settings = {**BASE, **CASES[case]}
    size = {k: settings.pop(k) for k in ("latent_height", "latent_width") if k in settings}
    call = kwargs_fn(num_prompts=2, num_images_per_prompt=2, steps=STEPS, **size)

    oracle = RASOracle(**settings)
    pipe = build()
    with oracle.install(pipe), torch.no_grad():
        expected = pipe(**call)[0]

    pipe = build()
    backend = rascompile.apply(pipe, RASConfig.reference_defaults(**settings), inner_backend="aot_eager")
    call = kwargs_fn(num_prompts=2, num_images_per_prompt=2, steps=STEPS, **size)
    got = pipe(**call)[0]

    decisions = backend.graphs[0].controller.history
    assert len(decisions) == STEPS
    for step, (decision, selected) in enumerate(zip(decisions, oracle.history)):
        if selected is None:
            assert decision.kind != "ras", f"step {step} should be dense"
        else:
            assert decision.kind == "ras", f"step {step} should be a RAS step"
            assert torch.equal(decision.active_idx, selected), f"step {step}: different active tokens"
    assert any(d.kind == "ras" for d in decisions)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_bfloat16_ras_step_equals_oracle(model):
    """Caches and merges keep the model's dtype. One RAS step, so the selection does not depend on how
    the latent update is rounded (the controller takes it in fp32)."""
    build, kwargs_fn = MODELS[model]
    settings = dict(num_inference_steps=6, scheduler_start_step=2, scheduler_end_step=2, error_reset_steps=())

    def bf16_pipeline():
        pipe = build()
        pipe.transformer.to(torch.bfloat16)
        return pipe

    def call():
        kwargs = kwargs_fn(num_prompts=1, num_images_per_prompt=2, steps=6)
        floating = {k for k, v in kwargs.items() if torch.is_tensor(v) and v.is_floating_point()}
        return {k: v.to(torch.bfloat16) if k in floating else v for k, v in kwargs.items()}

    oracle = RASOracle(**settings)
    pipe = bf16_pipeline()
    with oracle.install(pipe), torch.no_grad():
        expected = pipe(**call())[0]
    pipe = bf16_pipeline()
    backend = rascompile.apply(pipe, RASConfig.reference_defaults(**settings), inner_backend="aot_eager")
    got = pipe(**call())[0]
    assert got.dtype == torch.bfloat16
    assert [d.kind for d in backend.graphs[0].controller.history].count("ras") == 1
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
