"""The RAS graphs compiled by inductor (C++ on CPU; slow, so only these few tests use it)."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import rascompile
from rascompile import RASConfig
from rascompile.passes.snapshot import rewrite_records
from tests.support.models import lumina_call_kwargs, sd3_call_kwargs, tiny_lumina_pipeline, tiny_sd3_pipeline
from tests.support.oracle import RASOracle

STEPS = 6
SETTINGS = dict(num_inference_steps=STEPS, scheduler_start_step=2, error_reset_steps=(4,), sample_ratio=0.5)
MODELS = {  # name: (pipeline, call kwargs, fused K/V projections); Lumina-Next's chain has a norm and RoPE
    "sd3": (tiny_sd3_pipeline, sd3_call_kwargs, False),
    "lumina_fused_kv": (tiny_lumina_pipeline, lumina_call_kwargs, True),
}


@pytest.mark.inductor
@pytest.mark.parametrize("model", sorted(MODELS))
def test_inductor_ras_equals_oracle(model):
    build, kwargs_fn, fused = MODELS[model]
    oracle = RASOracle(**SETTINGS)
    pipe = build()
    with oracle.install(pipe), torch.no_grad():
        expected = pipe(**kwargs_fn(num_prompts=1, num_images_per_prompt=2, steps=STEPS))[0]
    pipe = build()
    backend = rascompile.apply(
        pipe, RASConfig.reference_defaults(**SETTINGS), inner_backend="inductor", fused_kv_projection=fused
    )
    got = pipe(**kwargs_fn(num_prompts=1, num_images_per_prompt=2, steps=STEPS))[0]
    assert backend.graphs[0].fallback_reason is None
    assert any(r.kind == "fused" for r in rewrite_records(backend.graphs[0].ras_gm)) is fused
    assert [d.kind for d in backend.graphs[0].controller.history].count("ras") == 3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.inductor
def test_inductor_keeps_linear_scatter_as_one_opaque_node():
    from rascompile.kernels.linear_scatter import linear_scatter_
    from tests.support.kernel_cases import make_case, run_op

    case = make_case(norm="layer_norm", rope=True, bias=True, layout="bhtd", row_offset=2)
    expected = run_op(case)

    def step(kw):
        linear_scatter_(**kw)
        return kw["cache"] * 1.0

    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    got, (code,) = run_and_get_code(compiled, dict(case, cache=case["cache"].clone()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert code.count("torch.ops.rascompile.linear_scatter_.default(") == 1
