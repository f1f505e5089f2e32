"""What split a transformer into pieces, read from Dynamo's record of the traced frame (``runtime/origin.py``)."""

import pytest
import torch

from rascompile.runtime.origin import GraphOrigin, graph_origin, is_submodule_frame, piece_cause
from rascompile.runtime.stacks import SEQUENTIAL_OFFLOAD, hooks_on
from tests.support.models import tiny_flux_transformer

FLUX = "diffusers/models/transformers/transformer_flux.py"


def _origin(qualname, filename=FLUX, break_reason=None, break_site=None):
    return GraphOrigin(qualname, filename, break_reason, break_site)


def test_a_whole_transformer_forward_is_not_a_piece():
    tiny_flux_transformer()  # imports the Flux classes, whose _repeated_blocks name the blocks
    assert piece_cause(_origin("FluxTransformer2DModel.forward")) is None
    assert piece_cause(_origin("apply_lora_scale.<locals>.decorator.<locals>.wrapper")) is None
    assert piece_cause(None) is None
    assert not is_submodule_frame(_origin("FluxTransformer2DModel.forward"), inside_model=True)


def test_a_repeated_block_compiled_on_its_own_is_regional_compilation():
    tiny_flux_transformer()
    cause = piece_cause(_origin("FluxTransformerBlock.forward"))
    assert cause is not None and cause.named
    assert "regional compilation (compile_repeated_blocks) compiles each FluxTransformerBlock" in cause.cause
    assert "torch.compile(pipe.transformer, backend='ras')" in cause.advice


def test_a_resumed_frame_or_a_layer_frame_is_a_piece_of_a_graph_break():
    resumed = piece_cause(_origin("FluxTransformer2DModel.torch_dynamo_resume_in_forward_at_730"))
    assert resumed is not None and not resumed.named and "graph breaks" in resumed.cause
    layer_origin = _origin("AdaLayerNormContinuous.forward", "diffusers/models/normalization.py")
    layer = piece_cause(layer_origin, inside_model=True)
    assert layer is not None and "Dynamo compiled AdaLayerNormContinuous.forward on its own" in layer.cause
    assert piece_cause(layer_origin) is None, "a module compiled on its own, outside any diffusers model, is whole"
    broken = piece_cause(_origin("FluxTransformer2DModel.forward", break_reason="data-dependent", break_site="a:1"))
    assert broken is not None and "(data-dependent at a:1)" in broken.cause


def test_the_hooks_that_split_a_transformer_are_named():
    resumed = _origin("FluxAttnProcessor.torch_dynamo_resume_in___call___at_103")
    cache = piece_cause(resumed, ("MagCache (transformer.enable_cache)",))
    assert cache.named and cache.cause.startswith("MagCache (transformer.enable_cache) splits the transformer")
    assert "disable_cache()" in cache.advice
    offload = piece_cause(resumed, (SEQUENTIAL_OFFLOAD,))
    assert offload.named and "enable_sequential_cpu_offload" in offload.cause
    assert "enable_model_cpu_offload() keeps RAS" in offload.advice
    at_accelerate = piece_cause(
        _origin("AlignDevicesHook.torch_dynamo_resume_in_pre_forward_at_416", "accelerate/hooks.py")
    )
    assert at_accelerate.named and "enable_sequential_cpu_offload" in at_accelerate.cause


def test_graph_origin_reads_the_frame_dynamo_traces():
    origins = []

    def backend(gm, example_inputs):
        origins.append(graph_origin(gm))
        return gm.forward

    class Block(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            torch._dynamo.graph_break()
            return y + 1

    torch.compile(Block(), backend=backend)(torch.ones(2))
    assert origins[0].qualname.endswith("Block.forward") and origins[0].break_reason is not None
    assert origins[0].break_site.startswith("test_origin.py:")
    assert origins[1].resumes_after_break
    assert graph_origin(None) is None  # outside Dynamo's call


def test_hooks_on_tells_sequential_offloading_from_model_offloading():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_flux_transformer()
    accelerate.hooks.add_hook_to_module(model.proj_out, accelerate.hooks.ModelHook())
    assert SEQUENTIAL_OFFLOAD in hooks_on(model)
    whole = tiny_flux_transformer()
    accelerate.hooks.add_hook_to_module(whole, accelerate.hooks.ModelHook())
    assert SEQUENTIAL_OFFLOAD not in hooks_on(whole) and hooks_on(whole)
