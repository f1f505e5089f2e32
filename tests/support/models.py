"""Tiny, seeded, download-free diffusers models and pipelines for the test-suite.

Everything here is fp32, CPU, eval mode and deterministic:

* every parameter is re-initialised from a private ``torch.Generator`` (diffusers zero-initialises
  several layers -- adaLN modulation, final projections, Lumina's cross-attention gate -- which would
  make whole blocks irrelevant), so every layer contributes to the output;
* the call-kwargs helpers draw their prompt embeddings from a private generator too, and hand the
  pipeline a fresh ``torch.Generator`` for its initial latents.

Sizes
-----
The ``*_call_kwargs`` helpers take **latent-space** sizes (``latent_height``, ``latent_width``).  Both
pipelines are built without a VAE, in which case both use a VAE scale factor of 8
(:data:`VAE_SCALE_FACTOR`), so the pixel ``height``/``width`` handed to the pipeline are the latent
sizes times 8.  Latent sides must be multiples of the patch size (2).  Default latent 16x16 gives
N = 8 * 8 = 64 image tokens; 16x24 gives N = 8 * 12 = 96.

Batches
-------
When prompt embeddings are passed in directly, neither pipeline repeats them for
``num_images_per_prompt`` (only the latents are), so the helpers repeat each prompt's embeddings
themselves (``repeat_interleave``: prompt 0's images first) and pass ``num_images_per_prompt=1``.
The batch the transformer sees is ``2 * num_prompts * num_images_per_prompt`` with guidance on
(CFG): SD3 concatenates ``[negative; positive]``, Lumina ``[positive; negative]``; in both, rows
``b`` and ``b + B // 2`` are the two CFG halves of the same image and receive identical latents.
"""

from __future__ import annotations

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    LuminaNextDiT2DModel,
    LuminaPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

VAE_SCALE_FACTOR = 8
"""Pixel size / latent size for both pipelines when built without a VAE."""

# Model sizes (kept in one place so tests can refer to them).
SD3_IN_CHANNELS = 4
SD3_HIDDEN = 32
SD3_TEXT_DIM = 32  # joint_attention_dim: width of prompt_embeds
SD3_POOLED_DIM = 16  # pooled_projection_dim: width of pooled_prompt_embeds
SD3_TEXT_LEN = 7

LUMINA_IN_CHANNELS = 4
LUMINA_HIDDEN = 32
LUMINA_TEXT_DIM = 24  # cross_attention_dim: width of prompt_embeds
LUMINA_TEXT_LEN = 6

PATCH_SIZE = 2


_QK_PROJECTIONS = ("to_q.weight", "to_k.weight", "add_q_proj.weight", "add_k_proj.weight")


def _reinit_(model: torch.nn.Module, seed: int, std: float = 0.1, qk_std: float | None = None) -> torch.nn.Module:
    """Re-initialise every parameter with seeded random normals.

    1-D ``*weight`` parameters are normalisation scales: they get ``1 + 0.1 * n`` so norms stay
    near identity.  Query/key projections get ``qk_std * n`` (default ``std``): SD3 has no q/k norm,
    and with small q/k weights its attention is nearly uniform, which would make text and the RAS
    key/value cache almost irrelevant.  Lumina's cross-attention gates get ``0.5 + 0.5 * n`` so that
    ``tanh(gate)`` is far from 0 and the text branch matters.  Everything else (linear/conv weights,
    biases, Lumina's pad token, ...) gets ``std * n``.
    """
    qk_std = std if qk_std is None else qk_std
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("weight") and param.dim() == 1:
                value = 1.0 + 0.1 * noise
            elif name.endswith(".gate"):
                value = 0.5 + 0.5 * noise
            elif name.endswith(_QK_PROJECTIONS):
                value = qk_std * noise
            else:
                value = std * noise
            param.copy_(value.to(param.dtype))
    return model


def tiny_sd3_transformer(seed: int = 0, qk_norm: str | None = None) -> SD3Transformer2DModel:
    """A 2-layer SD3 MMDiT: hidden 32 (4 heads x 8), patch 2, 4 latent channels, text width 32.

    ``qk_norm="rms_norm"`` gives SD3.5's per-head RMSNorm on queries and keys."""
    model = SD3Transformer2DModel(
        sample_size=32,
        patch_size=PATCH_SIZE,
        in_channels=SD3_IN_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=SD3_TEXT_DIM,
        caption_projection_dim=SD3_HIDDEN,
        pooled_projection_dim=SD3_POOLED_DIM,
        out_channels=SD3_IN_CHANNELS,
        pos_embed_max_size=64,
        qk_norm=qk_norm,
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def tiny_lumina_transformer(seed: int = 0) -> LuminaNextDiT2DModel:
    """A 2-layer Lumina-Next DiT: hidden 32, 4 query heads / 2 KV heads (GQA), head dim 8, qk-norm,
    patch 2, 4 latent channels (8 output channels: learn_sigma), text width 24."""
    model = LuminaNextDiT2DModel(
        sample_size=16,
        patch_size=PATCH_SIZE,
        in_channels=LUMINA_IN_CHANNELS,
        hidden_size=LUMINA_HIDDEN,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        learn_sigma=True,
        qk_norm=True,
        cross_attention_dim=LUMINA_TEXT_DIM,
        scaling_factor=1.0,
    )
    _reinit_(model, seed, std=0.1)
    return model.eval()


def tiny_sd3_pipeline(transformer: SD3Transformer2DModel | None = None) -> StableDiffusion3Pipeline:
    """SD3 pipeline with the tiny transformer, a shift-3 flow-matching Euler scheduler, no VAE and no
    text encoders/tokenizers.  Only usable with ``output_type="latent"`` and prompt embeddings."""
    if transformer is None:
        transformer = tiny_sd3_transformer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    assert pipe.vae_scale_factor == VAE_SCALE_FACTOR
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_lumina_pipeline(transformer: LuminaNextDiT2DModel | None = None) -> LuminaPipeline:
    """Lumina pipeline with the tiny transformer, a default flow-matching Euler scheduler, no VAE
    and no text encoder/tokenizer.  Only usable with ``output_type="latent"`` and prompt
    embeddings + attention masks.

    Note: the pipeline itself computes the RoPE table (``get_2d_rotary_pos_embed_lumina`` with the
    transformer's ``head_dim``) and passes ``base_sequence_length = (sample_size * 8 // 16) ** 2``
    (= 64 here) for proportional attention, so a 16x16 latent (N = 64) has softmax scale exactly
    ``attn.scale`` while other sizes get ``sqrt(log_64 N) * attn.scale``.
    """
    if transformer is None:
        transformer = tiny_lumina_transformer()
    pipe = LuminaPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
    )
    assert pipe.vae_scale_factor == VAE_SCALE_FACTOR
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_latent_size(latent_height: int, latent_width: int) -> None:
    # Both pipelines require pixel sizes divisible by vae_scale_factor * 2.
    if latent_height % PATCH_SIZE or latent_width % PATCH_SIZE:
        raise ValueError(f"latent sizes must be multiples of {PATCH_SIZE}, got {latent_height}x{latent_width}")


def sd3_call_kwargs(
    num_prompts: int = 1,
    num_images_per_prompt: int = 1,
    latent_height: int = 16,
    latent_width: int = 16,
    steps: int = 8,
    seed: int = 0,
    guidance_scale: float = 4.0,
) -> dict:
    """Keyword arguments for ``tiny_sd3_pipeline()(**kwargs)``.

    Prompt embeddings ``[P*I, 7, 32]`` / pooled ``[P*I, 16]`` (and negatives of the same shapes) are
    seeded random; the latent generator is ``torch.Generator().manual_seed(seed)``.  With
    ``guidance_scale > 1`` the transformer batch is ``B = 2 * P * I`` (``[negative; positive]``).
    The pipeline returns latents ``[P*I, 4, latent_height, latent_width]``.
    """
    _check_latent_size(latent_height, latent_width)
    gen = torch.Generator().manual_seed(10_000 + seed)

    def embeds(*shape: int) -> torch.Tensor:
        per_prompt = torch.randn(num_prompts, *shape, generator=gen)
        return per_prompt.repeat_interleave(num_images_per_prompt, dim=0)

    return dict(
        prompt_embeds=embeds(SD3_TEXT_LEN, SD3_TEXT_DIM),
        pooled_prompt_embeds=embeds(SD3_POOLED_DIM),
        negative_prompt_embeds=embeds(SD3_TEXT_LEN, SD3_TEXT_DIM),
        negative_pooled_prompt_embeds=embeds(SD3_POOLED_DIM),
        num_images_per_prompt=1,  # embeddings are already repeated per image (see module docstring)
        height=latent_height * VAE_SCALE_FACTOR,
        width=latent_width * VAE_SCALE_FACTOR,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def lumina_call_kwargs(
    num_prompts: int = 1,
    num_images_per_prompt: int = 1,
    latent_height: int = 16,
    latent_width: int = 16,
    steps: int = 8,
    seed: int = 0,
    guidance_scale: float = 4.0,
) -> dict:
    """Keyword arguments for ``tiny_lumina_pipeline()(**kwargs)``.

    Prompt embeddings ``[P*I, 6, 24]`` with int64 attention masks ``[P*I, 6]``; prompt ``j`` has
    ``6 - (j % 3)`` valid tokens (so the first prompt is full and the second has one padded slot),
    the negative prompt has 3 valid tokens: masking always matters.  The masked-out embedding slots
    hold random values too, so a broken mask changes results.  With ``guidance_scale > 1`` the
    transformer batch is ``B = 2 * P * I`` (``[positive; negative]``).  The pipeline returns latents
    ``[P*I, 4, latent_height, latent_width]``.
    """
    _check_latent_size(latent_height, latent_width)
    gen = torch.Generator().manual_seed(20_000 + seed)

    def repeat(x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(num_images_per_prompt, dim=0)

    prompt_embeds = torch.randn(num_prompts, LUMINA_TEXT_LEN, LUMINA_TEXT_DIM, generator=gen)
    negative_embeds = torch.randn(num_prompts, LUMINA_TEXT_LEN, LUMINA_TEXT_DIM, generator=gen)
    prompt_mask = torch.zeros(num_prompts, LUMINA_TEXT_LEN, dtype=torch.int64)
    for j in range(num_prompts):
        prompt_mask[j, : LUMINA_TEXT_LEN - (j % 3)] = 1
    negative_mask = torch.zeros(num_prompts, LUMINA_TEXT_LEN, dtype=torch.int64)
    negative_mask[:, :3] = 1

    return dict(
        prompt_embeds=repeat(prompt_embeds),
        prompt_attention_mask=repeat(prompt_mask),
        negative_prompt_embeds=repeat(negative_embeds),
        negative_prompt_attention_mask=repeat(negative_mask),
        num_images_per_prompt=1,  # embeddings are already repeated per image (see module docstring)
        height=latent_height * VAE_SCALE_FACTOR,
        width=latent_width * VAE_SCALE_FACTOR,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
        clean_caption=False,
    )


# ---------------------------------------------------------------------------------------------- Flux (packed)

FLUX_TEXT_DIM = 24
FLUX_POOLED_DIM = 12
FLUX_TEXT_LEN = 5


def tiny_flux_transformer(seed: int = 0):
    """A Flux.1 transformer: one double-stream and one single-stream block, hidden 16 (2 heads x 8), RoPE over
    the joint [text; image] sequence, packed latents of 16 elements per token (the pipeline's 2x2 packing of 4
    latent channels)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=FLUX_TEXT_DIM,
        pooled_projection_dim=FLUX_POOLED_DIM,
        axes_dims_rope=(2, 2, 4),
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def tiny_flux_pipeline(transformer=None):
    """FluxPipeline with the tiny transformer, no VAE and no text encoders (prompt embeddings passed in)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer if transformer is not None else tiny_flux_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_call_kwargs(
    batch: int = 2,
    size: int = 128,
    steps: int = 8,
    seed: int = 0,
    true_cfg: bool = False,
    text_len: int = FLUX_TEXT_LEN,
) -> dict:
    """``size`` pixels square: latents size/8 (no VAE), packed 2x2, so N = (size / 16)^2 tokens (64 at 128)."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    kwargs = dict(
        prompt_embeds=torch.randn(batch, text_len, FLUX_TEXT_DIM, generator=gen),
        pooled_prompt_embeds=torch.randn(batch, FLUX_POOLED_DIM, generator=gen),
        height=size,
        width=size,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )
    if true_cfg:
        kwargs.update(
            negative_prompt_embeds=torch.randn(batch, text_len, FLUX_TEXT_DIM, generator=gen),
            negative_pooled_prompt_embeds=torch.randn(batch, FLUX_POOLED_DIM, generator=gen),
            true_cfg_scale=4.0,
        )
    return kwargs


# ---------------------------------------------------------------------------------------------- Qwen-Image


def tiny_qwen_image_transformer(seed: int = 0):
    """A Qwen-Image MMDiT: one block, hidden 16 (2 heads x 8), per-stream RoPE, packed latents of 16 elements."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=FLUX_TEXT_DIM,
        axes_dims_rope=(2, 2, 4),
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def qwen_image_call_kwargs(batch: int = 2, grid: int = 8, seed: int = 0, padded_text: bool = True) -> dict:
    """Transformer call arguments as QwenImagePipeline passes them: packed latents [B, grid^2, 16], a text mask
    (the first image's last two text tokens padded when ``padded_text``)."""
    gen = torch.Generator().manual_seed(30_000 + seed)
    mask = torch.ones(batch, FLUX_TEXT_LEN)
    if padded_text:
        mask[0, -2:] = 0
    return dict(
        hidden_states=torch.randn(batch, grid * grid, 16, generator=gen),
        encoder_hidden_states=torch.randn(batch, FLUX_TEXT_LEN, FLUX_TEXT_DIM, generator=gen),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((batch,), 0.5),
        img_shapes=[(1, grid, grid)] * batch,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- Wan (video)

WAN_TEXT_DIM = 24
WAN_TEXT_LEN = 6


#: The tiny Wan 2.1 sizes, shared by the classes built on its blocks (SkyReels-V2: ``models_wan_family``).
TINY_WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    text_dim=WAN_TEXT_DIM,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=64,
)


def tiny_wan_transformer(seed: int = 0):
    """A Wan 2.1 transformer: two blocks, hidden 16 (2 heads x 8), patch (1, 2, 2), 4 latent channels, RoPE over
    (frame, row, column) written in place into an ``empty_like`` buffer, RMS q/k norm across heads."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**TINY_WAN_CONFIG)
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def wan_call_kwargs(batch: int = 2, frames: int = 2, latent_size: int = 8, seed: int = 0) -> dict:
    """Transformer call arguments as WanPipeline passes them for one guidance branch: latents [B, 4, F, H, W]
    (N = F * (H / 2) * (W / 2) tokens: 32 by default), a float timestep per row and the text embeddings."""
    gen = torch.Generator().manual_seed(40_000 + seed)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, latent_size, latent_size, generator=gen),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, WAN_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        return_dict=False,
    )


def tiny_wan_pipeline(transformer=None):
    """WanPipeline with the tiny transformer, no VAE (temporal factor 4, spatial 8) and no text encoder."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=transformer if transformer is not None else tiny_wan_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0, guidance: bool = True) -> dict:
    """5 frames (2 latent frames) of 64x64 pixels (8x8 latents): N = 2 * 4 * 4 = 32 tokens. With guidance the
    pipeline calls the transformer twice per step, once per branch."""
    gen = torch.Generator().manual_seed(41_000 + seed)
    kwargs = dict(
        prompt_embeds=torch.randn(batch, WAN_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        height=64,
        width=64,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=5.0 if guidance else 1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )
    if guidance:
        kwargs["negative_prompt_embeds"] = torch.randn(batch, WAN_TEXT_LEN, WAN_TEXT_DIM, generator=gen)
    return kwargs


def tiny_qwen_image_pipeline(transformer=None):
    """QwenImagePipeline with the tiny transformer, no VAE (scale factor 8) and no Qwen2.5-VL text encoder."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_qwen_image_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen_image_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0, text_len: int = FLUX_TEXT_LEN) -> dict:
    """128x128 pixels (16x16 latents packed 2x2: N = 64), true CFG (one transformer call per branch), text masks
    with padding in the prompt (last two tokens) and the negative prompt (three valid tokens)."""
    gen = torch.Generator().manual_seed(31_000 + seed)
    mask = torch.ones(batch, text_len, dtype=torch.int64)
    mask[:, -2:] = 0
    negative_mask = torch.zeros(batch, text_len, dtype=torch.int64)
    negative_mask[:, :3] = 1
    return dict(
        prompt_embeds=torch.randn(batch, text_len, FLUX_TEXT_DIM, generator=gen),
        prompt_embeds_mask=mask,
        negative_prompt_embeds=torch.randn(batch, text_len, FLUX_TEXT_DIM, generator=gen),
        negative_prompt_embeds_mask=negative_mask,
        true_cfg_scale=4.0,
        height=128,
        width=128,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )
