"""Tiny, seeded, download-free image DiTs of diffusers' newer classes: Ovis-Image and Bria 3.2 (the FLUX.1 family),
PRX.

Conventions as :mod:`models_image`: one block of each kind, 2 heads x 8 (hidden 16), N = 64 image tokens (packed
latents of 16 elements per token for the FLUX.1 family), parameters re-drawn with ``_reinit_``. The call kwargs are
read from the real pipeline's first transformer call (``capture.transformer_call_kwargs``).

Ovis-Image calls its transformer once per guidance branch (positive, then negative prompts), with
``timestep / 1000``, float ``txt_ids`` ``[L, 3]`` and ``img_ids`` ``[N, 3]``, no text mask. Bria 3.2 batches
guidance (``[negative; positive]`` rows, one call per step) and needs a VAE to build (it reads its config): a tiny
``AutoencoderKL`` of one block, scale factor 2, so 16 px give 8x8 packed tokens. PRX batches guidance too, with a
boolean text mask, latents ``[B, 4, 16, 16]`` (128 px, no VAE) and patch 2.
"""

from __future__ import annotations

import torch

from tests.support.capture import transformer_call_kwargs
from tests.support.models import _reinit_

HIDDEN_HEADS, HEAD_DIM, TEXT_DIM, TEXT_LEN, IN_CHANNELS = 2, 8, 24, 5, 16
#: One double-stream and one single-stream block of the FLUX.1 family's sizes here (Ovis-Image, Bria 3.2).
_FLUX1_BLOCKS = dict(
    patch_size=1,
    in_channels=IN_CHANNELS,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=HEAD_DIM,
    num_attention_heads=HIDDEN_HEADS,
    joint_attention_dim=TEXT_DIM,
)


def tiny_ovis_image_transformer(seed: int = 0):
    """Ovis-Image: one double-stream and one single-stream block, 3-axis RoPE (2, 2, 4)."""
    from diffusers import OvisImageTransformer2DModel

    model = OvisImageTransformer2DModel(**_FLUX1_BLOCKS, out_channels=IN_CHANNELS, axes_dims_rope=(2, 2, 4))
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_ovis_image_pipeline(transformer=None):
    """OvisImagePipeline with a flow-matching scheduler, no VAE, no Qwen3 text encoder or tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline

    pipe = OvisImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_ovis_image_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ovis_image_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens and their negative prompts (guidance 4: two calls per step), 128 px."""
    gen = torch.Generator().manual_seed(70_000 + seed)
    return dict(
        negative_prompt=None,
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        guidance_scale=4.0,
        height=128,
        width=128,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def ovis_image_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``OvisImagePipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_ovis_image_pipeline(), ovis_image_pipeline_kwargs(batch, steps=4, seed=seed))


def tiny_bria_transformer(seed: int = 0):
    """Bria 3.2: one double-stream and one single-stream block, 3-axis RoPE (2, 2, 4), no pooled projection."""
    from diffusers import BriaTransformer2DModel

    model = BriaTransformer2DModel(**_FLUX1_BLOCKS, axes_dims_rope=[2, 2, 4])
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_bria_pipeline(transformer=None):
    """BriaPipeline with a flow-matching scheduler, a tiny one-block VAE (never run: latent output), no T5."""
    from diffusers import AutoencoderKL, BriaPipeline, FlowMatchEulerDiscreteScheduler

    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    pipe = BriaPipeline(
        transformer=transformer if transformer is not None else tiny_bria_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bria_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens and their negative prompts (guidance 4, batched), 16 px: N = 64."""
    gen = torch.Generator().manual_seed(71_000 + seed)
    return dict(
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        guidance_scale=4.0,
        height=16,
        width=16,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def bria_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``BriaPipeline``: ``batch`` rows, the negative and positive halves of
    ``batch // 2`` prompts."""
    return transformer_call_kwargs(tiny_bria_pipeline(), bria_pipeline_kwargs(max(1, batch // 2), steps=4, seed=seed))


def tiny_prx_transformer(seed: int = 0):
    """PRX: two blocks, hidden 16 (2 heads x 8), patch 2, 4 latent channels, 2-axis RoPE (4, 4)."""
    from diffusers import PRXTransformer2DModel

    model = PRXTransformer2DModel(
        in_channels=4,
        patch_size=2,
        context_in_dim=TEXT_DIM,
        hidden_size=HIDDEN_HEADS * HEAD_DIM,
        mlp_ratio=2.0,
        num_heads=HIDDEN_HEADS,
        depth=2,
        axes_dim=[4, 4],
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_prx_pipeline(transformer=None):
    """PRXPipeline with a flow-matching scheduler, no VAE (scale 8), no T5Gemma text encoder or tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline

    pipe = PRXPipeline(
        transformer=transformer if transformer is not None else tiny_prx_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=None,
        tokenizer=None,
        vae=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prx_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens (all valid) and negative prompts of 3 valid tokens (guidance 4, batched),
    128 px without resolution binning: N = 64."""
    gen = torch.Generator().manual_seed(72_000 + seed)
    negative_mask = torch.zeros(batch, TEXT_LEN, dtype=torch.bool)
    negative_mask[:, :3] = True
    return dict(
        negative_prompt=None,
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        prompt_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.bool),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_attention_mask=negative_mask,
        guidance_scale=4.0,
        height=128,
        width=128,
        use_resolution_binning=False,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def prx_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``PRXPipeline``: ``batch`` rows, the negative and positive halves of
    ``batch // 2`` prompts."""
    return transformer_call_kwargs(tiny_prx_pipeline(), prx_pipeline_kwargs(max(1, batch // 2), steps=4, seed=seed))
