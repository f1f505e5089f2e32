"""LoRA through the pipeline's own API on a RAS-compiled transformer (tiny Flux and Wan): loading a second LoRA,
switching and disabling adapters, and hotswapping keep RAS, recompile at most once per structural change and equal
a fresh compile of the same LoRA state."""

import warnings

import pytest
import torch

import rascompile
from rascompile import RASConfig
from tests.support.models import flux_call_kwargs, tiny_flux_pipeline, tiny_wan_pipeline, wan_pipeline_kwargs

pytest.importorskip("peft")

STEPS = 8
FAMILIES = {
    "flux": (tiny_flux_pipeline, lambda: flux_call_kwargs(batch=1, steps=STEPS)),
    "wan": (tiny_wan_pipeline, lambda: wan_pipeline_kwargs(steps=STEPS)),
}


def _save_lora(family: str, path, seed: int, alpha: int) -> str:
    """A rank-4 LoRA on the attention projections with seeded random weights, saved as the pipeline saves one."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    make, _ = FAMILIES[family]
    pipe = make()
    config = LoraConfig(
        r=4, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    pipe.transformer.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    layers = get_peft_model_state_dict(pipe.transformer)
    type(pipe).save_lora_weights(str(path), transformer_lora_layers=layers, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def loras(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"lora_{family}")
    return family, _save_lora(family, root / "a", seed=1, alpha=4), _save_lora(family, root / "b", seed=2, alpha=8)


def _pipeline(family, setup):
    make, _ = FAMILIES[family]
    pipe = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers: no text-encoder keys in these LoRAs
        setup(pipe)
    return pipe


def _apply(pipe):
    return rascompile.apply(pipe, RASConfig(sample_ratio=0.5), inner_backend="aot_eager")


def _generate(family, pipe, backend):
    """One generation; asserts every controller it ran took RAS steps."""
    _, kwargs = FAMILIES[family]
    before = {id(c): c.generations for c in backend.controllers_of(pipe.transformer)}
    with torch.no_grad():
        out = pipe(**kwargs())[0]
    ran = [c for c in backend.controllers_of(pipe.transformer) if c.generations > before.get(id(c), 0)]
    assert ran and all(any(d.kind == "ras" for d in c.history) for c in ran), "the generation must run RAS"
    return out


def _rascompile_warnings(caught):
    return [str(w.message) for w in caught if "rascompile" in str(w.message)]


def test_a_second_lora_and_adapter_changes_keep_ras_and_equal_a_fresh_compile(loras):
    family, lora_a, lora_b = loras

    def both(pipe):
        pipe.load_lora_weights(lora_a, adapter_name="a")
        pipe.load_lora_weights(lora_b, adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])

    pipe = _pipeline(family, lambda p: p.load_lora_weights(lora_a, adapter_name="a"))
    backend = _apply(pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _generate(family, pipe, backend)
        pipe.load_lora_weights(lora_b, adapter_name="b")
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
        mixed = _generate(family, pipe, backend)
        assert len(backend.graphs) == 2, "a second adapter is one structural change: one recompile"
        pipe.disable_lora()
        _generate(family, pipe, backend)
        pipe.enable_lora()
        torch.testing.assert_close(_generate(family, pipe, backend), mixed, rtol=0, atol=0)
    assert not _rascompile_warnings(caught), _rascompile_warnings(caught)
    fresh = _pipeline(family, both)
    torch.testing.assert_close(mixed, _generate(family, fresh, _apply(fresh)), rtol=1e-5, atol=1e-5)


def test_lora_hotswap_keeps_ras_without_recompiling(loras):
    """``enable_lora_hotswap`` pads every adapter to one rank and keeps the scales as tensors, so
    ``load_lora_weights(..., hotswap=True)`` swaps weights in place: no recompile, RAS on, equal to a fresh compile
    of the swapped-in LoRA."""
    family, lora_a, lora_b = loras

    def hotswappable(pipe):
        pipe.enable_lora_hotswap(target_rank=8)
        pipe.load_lora_weights(lora_a, adapter_name="style")

    pipe = _pipeline(family, hotswappable)
    backend = _apply(pipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _generate(family, pipe, backend)
        pipe.load_lora_weights(lora_b, adapter_name="style", hotswap=True)
        swapped = _generate(family, pipe, backend)
    assert not _rascompile_warnings(caught), _rascompile_warnings(caught)
    assert len(backend.graphs) == 1, "a hotswap changes values, not the graph"
    assert not torch.equal(first, swapped)
    fresh = _pipeline(family, lambda p: p.load_lora_weights(lora_b, adapter_name="style"))
    torch.testing.assert_close(swapped, _generate(family, fresh, _apply(fresh)), rtol=1e-5, atol=1e-5)
