"""What users stack on a transformer, each applied to the tiny Flux pipeline, and whether RAS stays on.

``tests/integration/test_stacks.py`` checks every row (RAS runs, or every generation runs dense, equals the stack
without rascompile and is warned about in the stack's own words); docs/supported.md's table of stacks is generated from
``STACKS`` (``python -m tests.support.stacks``) and a test keeps it in step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stack:
    key: str
    name: str  # what the user does, in diffusers' words
    apply: Callable  # (pipe) -> None, before compiling
    ras: bool  # RAS stays on
    note: str  # why, and what keeps RAS when it is off
    says: str = ""  # for a dense stack: what a warning must name
    needs: str | None = None  # a module the stack imports (skip the row without it)
    in_place: bool = False  # compiled with pipe.transformer.compile(...) rather than torch.compile(pipe.transformer)
    compile: Callable | None = None  # (pipe, options) -> None: how the user compiles, when not the whole transformer
    pieces: bool = False  # dense by default, RAS with graph_pieces=True (tests/integration/test_pieces_stacks.py)


def _lora(pipe) -> None:
    from peft import LoraConfig

    gen = torch.Generator().manual_seed(7)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name="style")
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def _native_attention(pipe) -> None:
    pipe.transformer.set_attention_backend("native")


def _flex_attention(pipe) -> None:
    pipe.transformer.set_attention_backend("flex")


def _model_cpu_offload(pipe) -> None:
    pipe.enable_model_cpu_offload(device="cpu")


def _group_offload(pipe) -> None:
    cpu = torch.device("cpu")
    pipe.transformer.enable_group_offload(
        onload_device=cpu, offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
    )


def _sequential_cpu_offload(pipe) -> None:
    """What ``pipe.enable_sequential_cpu_offload()`` installs on the transformer: accelerate's ``cpu_offload``.
    accelerate cannot offload from CPU to CPU (it re-wraps plain tensors of its weights map as their class, and a
    plain ``Tensor`` takes no ``requires_grad``), so the weights map holds ``Parameter``s, as it would after a move
    to an accelerator."""
    from accelerate import cpu_offload

    transformer = pipe.transformer
    weights = {
        n: torch.nn.Parameter(t.detach().clone(), requires_grad=False) for n, t in transformer.state_dict().items()
    }
    cpu_offload(transformer, torch.device("cpu"), state_dict=weights)


def _regional_compilation(pipe, options) -> None:
    pipe.transformer.compile_repeated_blocks(backend="ras", options=options)


def _torchao(config_name: str):
    def apply(pipe) -> None:
        import torchao.quantization as quantization

        quantization.quantize_(pipe.transformer, getattr(quantization, config_name)())

    return apply


def _pyramid_attention_broadcast(pipe) -> None:
    from diffusers import PyramidAttentionBroadcastConfig

    pipe.transformer.enable_cache(
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: pipe.current_timestep,
        )
    )


def _first_block_cache(pipe) -> None:
    from diffusers import FirstBlockCacheConfig

    # 0.8: on the tiny Flux the cache skips the blocks on 3 of 8 steps (0.2 would never skip)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.8))


def _taylorseer(pipe) -> None:
    from diffusers import TaylorSeerCacheConfig

    pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2))


def _mag_cache(pipe) -> None:
    from diffusers import MagCacheConfig

    pipe.transformer.enable_cache(MagCacheConfig(num_inference_steps=8, mag_ratios=[1.0] + [0.98] * 7, threshold=0.1))


def _faster_cache(pipe) -> None:
    from diffusers import FasterCacheConfig

    pipe.transformer.enable_cache(
        FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 681),
            current_timestep_callback=lambda: pipe.current_timestep,
            is_guidance_distilled=True,
        )
    )


STEP_CACHE_NOTE = "step caches and RAS both skip work; they do not combine yet: `transformer.disable_cache()` keeps RAS"

STACKS = [
    Stack(
        "lora",
        "peft LoRA adapter (`add_adapter`)",
        _lora,
        True,
        "the adapter's weights are graph inputs; a new weight (`set_adapters`) recompiles once and stays an input, "
        "a second LoRA (`load_lora_weights`) recompiles once, a hotswap (`enable_lora_hotswap`) never; `fuse_lora`, "
        "`unfuse_lora`, `disable_lora` keep RAS (tests/integration/test_lora.py, Flux and Wan)",
        needs="peft",
    ),
    Stack(
        "native_attention",
        '`set_attention_backend("native")`',
        _native_attention,
        True,
        "the same SDPA the rewrite reads",
    ),
    Stack(
        "flex_attention",
        '`set_attention_backend("flex")`',
        _flex_attention,
        False,
        'the rewrite reads SDPA, not `flex_attention`: `set_attention_backend("native")` keeps RAS',
        says='set_attention_backend("native") keeps RAS',
    ),
    Stack(
        "model_cpu_offload",
        "`enable_model_cpu_offload()`",
        _model_cpu_offload,
        True,
        'compiled in place, `pipe.transformer.compile(backend="ras", options=...)` (what `rascompile.apply` does '
        "here): the pipeline re-installs its hooks after every call, and a `torch.compile` wrapper would drop out of "
        "the call path",
        needs="accelerate",
        in_place=True,
    ),
    Stack(
        "sequential_cpu_offload",
        "`enable_sequential_cpu_offload()`",
        _sequential_cpu_offload,
        False,
        "its hooks run outside the compiled graph at every layer, which splits the transformer into a graph per "
        "layer; `enable_model_cpu_offload()` keeps RAS",
        says="accelerate's offloading hooks (enable_sequential_cpu_offload) run outside the compiled graph",
        needs="accelerate",
        in_place=True,
    ),
    Stack(
        "group_offload",
        '`enable_group_offload(offload_type="block_level")`',
        _group_offload,
        False,
        "its hooks split the transformer into one graph per block; with `graph_pieces=True` RAS runs across the "
        "blocks' graphs and equals RAS without offloading; `enable_model_cpu_offload()` keeps RAS",
        says="group offloading (enable_group_offload)",
        pieces=True,
    ),
    Stack(
        "regional_compilation",
        '`transformer.compile_repeated_blocks(backend="ras")`',
        lambda pipe: None,
        False,
        "compiles each block on its own; with `graph_pieces=True` RAS runs across the blocks and equals RAS on the "
        'whole transformer; `torch.compile(pipe.transformer, backend="ras")` or `rascompile.apply(pipe)` keeps RAS',
        says="regional compilation (compile_repeated_blocks) compiles each FluxTransformerBlock on its own",
        compile=_regional_compilation,
        pieces=True,
    ),
    *(
        Stack(
            f"torchao_{config.lower()}",
            f"torchao `quantize_(transformer, {config}())`",
            _torchao(config),
            True,
            "the quantized linears trace as ordinary ops; the rewrite gathers tokens around them",
            needs="torchao",
        )
        for config in ("Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig", "Float8WeightOnlyConfig")
    ),
    Stack(
        "pyramid_attention_broadcast",
        "PyramidAttentionBroadcast (`enable_cache`)",
        _pyramid_attention_broadcast,
        False,
        f"its hooks route some steps through other graphs; {STEP_CACHE_NOTE}",
        says="PyramidAttentionBroadcast (transformer.enable_cache)",
    ),
    Stack(
        "first_block_cache",
        "FirstBlockCache (`enable_cache`)",
        _first_block_cache,
        False,
        "with `graph_pieces=True` RAS runs across its hooks' graphs; on a step the cache skips the blocks, the "
        "active tokens take the cache's result and the others their last prediction; `transformer.disable_cache()` "
        "keeps RAS",
        says="FirstBlockCache (transformer.enable_cache)",
        pieces=True,
    ),
    Stack(
        "taylorseer",
        "TaylorSeer cache (`enable_cache`)",
        _taylorseer,
        False,
        STEP_CACHE_NOTE,
        says="TaylorSeer cache (transformer.enable_cache)",
    ),
    Stack(
        "mag_cache",
        "MagCache (`enable_cache`)",
        _mag_cache,
        False,
        STEP_CACHE_NOTE,
        says="MagCache (transformer.enable_cache)",
    ),
    Stack(
        "faster_cache",
        "FasterCache (`enable_cache`)",
        _faster_cache,
        False,
        STEP_CACHE_NOTE,
        says="FasterCache (transformer.enable_cache)",
    ),
]


def stacks_table() -> str:
    """docs/supported.md's table of stacks, from ``STACKS``."""
    lines = ["| Stack | RAS | Why |", "|---|---|---|"]
    for stack in STACKS:
        status = "RAS" if stack.ras else ("dense; RAS with `graph_pieces=True`" if stack.pieces else "dense")
        lines.append(f"| {stack.name} | {status} | {stack.note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(stacks_table())
