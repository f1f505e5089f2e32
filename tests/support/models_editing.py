"""Tiny, seeded, download-free image-editing pipelines: FLUX.1 Kontext, Qwen-Image-Edit and FLUX.2 with a
reference image.

All three join the reference image's latents to the token axis after the latents being denoised
(``torch.cat([latents, image_latents], dim=1)``), with their own position ids, and slice the noise prediction back
to the first ``latents.size(1)`` tokens. The reference latents are the same at every step.

* FLUX.1 Kontext takes the reference as latents (``[B, 16, h, w]``, the pipeline's latent channels without a VAE)
  and packs them 2x2: a transformer of 64 input channels. 128 px, N = 64 image + 64 reference tokens. Guidance is
  distilled (one call per step).
* Qwen-Image-Edit needs a PIL image and a VAE (it reads the image's size and encodes it at about 1024x1024): a
  tiny ``AutoencoderKLQwenImage`` of 4 channels that downsamples 32x, so the reference is 32x32 latents, 256 packed
  tokens; the generated image is 256 px, 16 tokens. True CFG (one call per guidance branch).
* FLUX.2 encodes its reference images with its VAE (at least 64 px): a tiny three-block ``AutoencoderKLFlux2``
  (scale factor 4, 4 latent channels, patchified 2x2 to 16), a 64x64 reference image and output, N = 64 image +
  64 reference tokens. One call per step.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from tests.support.models import FLUX_POOLED_DIM, FLUX_TEXT_DIM, FLUX_TEXT_LEN, _reinit_
from tests.support.models_image import tiny_flux2_transformer

_STD = dict(std=0.15, qk_std=0.3)


def _image(size: int, seed: int) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


# ------------------------------------------------------------------------------------------------ FLUX.1 Kontext


def tiny_flux_kontext_transformer(seed: int = 0):
    """The FLUX.1 transformer of ``models.tiny_flux_transformer``, 64 input channels (16 latent channels 2x2)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=FLUX_TEXT_DIM,
        pooled_projection_dim=FLUX_POOLED_DIM,
        axes_dims_rope=(2, 2, 4),
    )
    return _reinit_(model, seed, **_STD).eval()


def tiny_flux_kontext_pipeline(transformer=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer if transformer is not None else tiny_flux_kontext_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_kontext_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts editing one reference (16x16 latents), 128 px output."""
    gen = torch.Generator().manual_seed(90_000 + seed)
    return dict(
        image=torch.randn(1, 16, 16, 16, generator=gen),
        prompt_embeds=torch.randn(batch, FLUX_TEXT_LEN, FLUX_TEXT_DIM, generator=gen),
        pooled_prompt_embeds=torch.randn(batch, FLUX_POOLED_DIM, generator=gen),
        height=128,
        width=128,
        max_area=128 * 128,
        _auto_resize=False,
        guidance_scale=2.5,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# ----------------------------------------------------------------------------------------------- Qwen-Image-Edit


def tiny_qwen_image_edit_transformer(seed: int = 0):
    """The Qwen-Image MMDiT of ``models.tiny_qwen_image_transformer`` with 64 input channels (16 latent channels
    2x2), as the edit pipeline packs its latents with ``in_channels // 4`` channels."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=FLUX_TEXT_DIM,
        axes_dims_rope=(2, 2, 4),
    )
    return _reinit_(model, seed, **_STD).eval()


def tiny_qwen_image_vae():
    """``AutoencoderKLQwenImage`` of 4 base channels, 16 latent channels, downsampling 32x (6 levels)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False] * 5,
        latents_mean=[0.0] * 16,
        latents_std=[1.0] * 16,
    ).eval()


def tiny_qwen_image_edit_pipeline(transformer=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    pipe = QwenImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_qwen_image_vae(),
        text_encoder=None,
        tokenizer=None,
        processor=None,
        transformer=transformer if transformer is not None else tiny_qwen_image_edit_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_image_edit_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts with negative prompts (true CFG: two calls per step), one square reference image (the
    pipeline resizes it to 1024x1024), 256 px output."""
    gen = torch.Generator().manual_seed(91_000 + seed)
    mask = torch.ones(batch, FLUX_TEXT_LEN, dtype=torch.int64)
    return dict(
        image=_image(64, seed),
        prompt_embeds=torch.randn(batch, FLUX_TEXT_LEN, FLUX_TEXT_DIM, generator=gen),
        prompt_embeds_mask=mask,
        negative_prompt_embeds=torch.randn(batch, FLUX_TEXT_LEN, FLUX_TEXT_DIM, generator=gen),
        negative_prompt_embeds_mask=mask.clone(),
        true_cfg_scale=4.0,
        height=256,
        width=256,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# ------------------------------------------------------------------------------------- FLUX.2 with a reference


def tiny_flux2_vae():
    """``AutoencoderKLFlux2`` of three blocks of 8 channels (scale factor 4), 4 latent channels (16 once
    patchified 2x2)."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    ).eval()


def tiny_flux2_edit_pipeline(transformer=None):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
        vae=tiny_flux2_vae(),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_flux2_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux2_edit_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts with one 64x64 reference image, 64 px output."""
    from tests.support.models_image import FLUX2_TEXT_DIM, FLUX2_TEXT_LEN

    gen = torch.Generator().manual_seed(92_000 + seed)
    return dict(
        image=_image(64, seed),
        prompt_embeds=torch.randn(batch, FLUX2_TEXT_LEN, FLUX2_TEXT_DIM, generator=gen),
        height=64,
        width=64,
        guidance_scale=4.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )
