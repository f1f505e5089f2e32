"""Tiny, seeded, download-free configs for seven "classic" image DiTs, and how their pipelines call them.

Models (key in parentheses): PixArt-Sigma (``pixart``), HunyuanDiT (``hunyuan_dit``), DiT (``dit``,
class-conditional), SD3.5 (``sd35``: q/k RMSNorm and dual attention layers), Lumina-Image-2.0 (``lumina2``),
HiDream-I1 (``hidream``, a tiny MoE) and Sana (``sana``).

For every key there is

* ``tiny_<key>_transformer(seed=0)``: the smallest sensible config (1-4 blocks, hidden 16-32, a few heads of
  width 8-16) with every parameter re-drawn by :func:`models._reinit_` (``std=0.15, qk_std=0.3``) so that every
  layer matters (diffusers zero-initialises adaLN modulations, final projections, ...); fp32, CPU, eval mode;
* ``<key>_call_kwargs(batch=2, seed=0)``: the keyword arguments the diffusers pipeline passes to
  ``transformer(...)`` at one denoising step (same names, dtypes, shapes and layouts; arguments the pipeline
  passes positionally are given by their parameter name), drawn from a private ``torch.Generator``.  Where the
  pipeline batches classifier-free guidance, ``batch=2`` is one image's two guidance rows, in the pipeline's order
  (rows ``b`` and ``b + batch // 2`` share their latents, as in the pipeline); where a pipeline passes a text
  mask, prompts are padded so that the mask matters (the padded slots hold random values too);
* where the pipeline can be built without downloads: ``tiny_<key>_pipeline(transformer=None)`` (scheduler built
  in code, no text encoders/tokenizers, no VAE except DiT's tiny one) and ``<key>_pipeline_kwargs(batch=1,
  steps=8, seed=0)``, with ``batch`` = the number of images: the transformer sees ``2 * batch`` rows per call
  where the pipeline batches CFG.

All models produce N = 64 image tokens (an 8 x 8 token grid) by default.

How each pipeline calls its transformer (one call per denoising step unless noted)
---------------------------------------------------------------------------------
* pixart (PixArtSigmaPipeline): CFG batched ``[neg; pos]``; timestep int64 ``[B]``; ``encoder_attention_mask``.
* hunyuan_dit (HunyuanDiTPipeline): CFG batched ``[neg; pos]``; timestep float32 ``[B]``; two text streams with
  masks, ``image_meta_size``, ``style`` and a RoPE table ``(cos, sin)`` computed by the pipeline.
* dit (DiTPipeline): CFG batched ``[cond; null]`` (class 1000 = null); needs a VAE (it always decodes); calls the
  transformer without ``return_dict`` (gets a ``Transformer2DModelOutput``).
* sd35 (StableDiffusion3Pipeline): CFG batched ``[neg; pos]``; no text mask (skip-layer guidance, off by default,
  would add a third call per step).
* lumina2 (Lumina2Pipeline): ONE CALL PER GUIDANCE BRANCH: the prompts, then the negative prompts, each call with
  the ``P`` images' rows and its own text mask.
* hidream (HiDreamImagePipeline): CFG batched ``[neg; pos]`` (Llama-3 states ``[layers, B, L, D]`` joined on dim
  1); no text mask.
* sana (SanaPipeline): CFG batched ``[neg; pos]``; patch 1; linear self-attention and a conv feed-forward.

Schedulers are built in code with the published models' scheduler classes; their settings follow the published
configs as far as the survey needs them (step count and timestep dtype), not necessarily in every field.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    HiDreamImagePipeline,
    HiDreamImageTransformer2DModel,
    HunyuanDiT2DModel,
    HunyuanDiTPipeline,
    Lumina2Pipeline,
    Lumina2Transformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
)

from tests.support.models import _reinit_

IN_CHANNELS = 4
LATENT = 16  # latent side for patch-2 models: 16 x 16 latents -> 8 x 8 = 64 tokens
GRID = 8  # token grid side
NUM_TOKENS = GRID * GRID  # N = 64 image tokens for every model
VAE_SCALE_FACTOR = 8  # pixel / latent side for every pipeline built here except Sana (32) and DiT (no pixels)


def _seeded(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(salt + seed)


def _padded_mask(batch: int, length: int, valid: list[int], dtype=torch.int64) -> torch.Tensor:
    """``[batch, length]`` 1/0 mask; row ``b`` keeps its first ``valid[b % len(valid)]`` tokens."""
    mask = torch.zeros(batch, length, dtype=dtype)
    for b in range(batch):
        mask[b, : valid[b % len(valid)]] = 1
    return mask


def _cfg_valid(batch: int, uncond: int, cond: list[int]) -> list[int]:
    """Valid text lengths per row: with CFG (even ``batch``) the first half (negative prompts) keeps ``uncond``
    tokens and the second half cycles through ``cond``; an odd ``batch`` (no CFG) cycles through ``cond``."""
    if batch % 2:
        return [cond[b % len(cond)] for b in range(batch)]
    return [uncond] * (batch // 2) + [cond[b % len(cond)] for b in range(batch // 2)]


def _cfg_latents(gen: torch.Generator, batch: int, channels: int, side: int) -> torch.Tensor:
    """Latents for a CFG-batched call: ``batch // 2`` images, each repeated in both halves (``torch.cat([x] * 2)``);
    an odd ``batch`` (no CFG) gets independent rows."""
    if batch % 2:
        return torch.randn(batch, channels, side, side, generator=gen)
    half = torch.randn(batch // 2, channels, side, side, generator=gen)
    return torch.cat([half, half])


# ============================================================================================ PixArt-Sigma

PIXART_HIDDEN = 32  # 4 heads x 8
PIXART_CAPTION_DIM = 24  # caption_channels (T5 width, 4096 in the real model)
PIXART_TEXT_LEN = 6  # max_sequence_length (300 in the real pipeline), padded


def tiny_pixart_transformer(seed: int = 0) -> PixArtTransformer2DModel:
    """PixArt-Sigma: 2 blocks (self-attn, cross-attn to T5 text, MLP; adaLN-single), hidden 32 = 4 heads x 8,
    patch 2, 4 latent channels in, 8 out (learned sigma), sincos position table for a 16 x 16 latent (N = 64),
    caption width 24, no micro-conditions (``use_additional_conditions=False`` as in Sigma)."""
    model = PixArtTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=IN_CHANNELS,
        out_channels=2 * IN_CHANNELS,
        num_layers=2,
        cross_attention_dim=PIXART_HIDDEN,
        sample_size=LATENT,
        patch_size=2,
        caption_channels=PIXART_CAPTION_DIM,
        use_additional_conditions=False,
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def pixart_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """As ``PixArtSigmaPipeline`` calls the transformer: latents ``[B, 4, 16, 16]`` (N = 64), T5 embeddings
    ``[B, 6, 24]`` with an int64 ``encoder_attention_mask [B, 6]`` (uncond rows keep 2 tokens, cond rows 6 and 4),
    timestep int64 ``[B]`` (DPM-Solver's ``t[None].expand(B)``), ``added_cond_kwargs`` with ``None``
    resolution/aspect ratio, ``return_dict=False``."""
    gen = _seeded(seed, 40_000)
    hidden = _cfg_latents(gen, batch, IN_CHANNELS, LATENT)
    text = torch.randn(batch, PIXART_TEXT_LEN, PIXART_CAPTION_DIM, generator=gen)
    mask = _padded_mask(batch, PIXART_TEXT_LEN, _cfg_valid(batch, 2, [6, 4]))
    return dict(
        hidden_states=hidden,
        encoder_hidden_states=text,
        encoder_attention_mask=mask,
        timestep=torch.tensor([801], dtype=torch.int64).expand(batch),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


def tiny_pixart_pipeline(transformer: PixArtTransformer2DModel | None = None) -> PixArtSigmaPipeline:
    """PixArtSigmaPipeline with a DPM-Solver++ scheduler (PixArt-Sigma's class), no VAE, no T5."""
    pipe = PixArtSigmaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer if transformer is not None else tiny_pixart_transformer(),
        scheduler=DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` images at 128 x 128 pixels (latents 16 x 16, N = 64); transformer batch ``2 * batch``
    (``[negative; positive]``).  Resolution binning is off (it only knows the real sample sizes)."""
    gen = _seeded(seed, 41_000)
    return dict(
        prompt_embeds=torch.randn(batch, PIXART_TEXT_LEN, PIXART_CAPTION_DIM, generator=gen),
        prompt_attention_mask=_padded_mask(batch, PIXART_TEXT_LEN, [6, 4]),
        negative_prompt_embeds=torch.randn(batch, PIXART_TEXT_LEN, PIXART_CAPTION_DIM, generator=gen),
        negative_prompt_attention_mask=_padded_mask(batch, PIXART_TEXT_LEN, [2]),
        negative_prompt=None,  # the default "" would clash with negative_prompt_embeds
        height=LATENT * VAE_SCALE_FACTOR,
        width=LATENT * VAE_SCALE_FACTOR,
        num_inference_steps=steps,
        guidance_scale=4.5,
        generator=torch.Generator().manual_seed(seed),
        use_resolution_binning=False,
        clean_caption=False,
        output_type="latent",
        return_dict=False,
    )


# ============================================================================================ HunyuanDiT

HUNYUAN_HIDDEN = 32  # 4 heads x 8 (RoPE needs head_dim % 4 == 0)
HUNYUAN_CLIP_DIM = 24  # cross_attention_dim: width of the (Bert-)CLIP embeddings
HUNYUAN_T5_DIM = 16  # cross_attention_dim_t5 (the attention pool has 8 heads: must divide by 8)
HUNYUAN_POOLED_DIM = 16
HUNYUAN_CLIP_LEN = 5  # text_len (77 in the real model)
HUNYUAN_T5_LEN = 6  # text_len_t5 (256)


def tiny_hunyuan_dit_transformer(seed: int = 0) -> HunyuanDiT2DModel:
    """HunyuanDiT: 4 blocks (the fewest with a U-Net long skip: block 0's output is concatenated into block 3),
    hidden 32 = 4 heads x 8, q/k LayerNorm, 2-D RoPE on self- and cross-attention queries, patch 2, 4 latent
    channels in, 8 out (learned sigma), two text streams (CLIP 5 x 24, T5 6 x 16 projected to 24 and joined),
    pooled T5 + image-meta-size + style conditioning (``use_style_cond_and_image_meta_size=True``, v1.0/1.1)."""
    model = HunyuanDiT2DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=IN_CHANNELS,
        patch_size=2,
        sample_size=LATENT,
        hidden_size=HUNYUAN_HIDDEN,
        num_layers=4,
        mlp_ratio=2.0,
        learn_sigma=True,
        cross_attention_dim=HUNYUAN_CLIP_DIM,
        cross_attention_dim_t5=HUNYUAN_T5_DIM,
        pooled_projection_dim=HUNYUAN_POOLED_DIM,
        text_len=HUNYUAN_CLIP_LEN,
        text_len_t5=HUNYUAN_T5_LEN,
        use_style_cond_and_image_meta_size=True,
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def hunyuan_dit_rotary_emb(grid: int = GRID, head_dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's RoPE table: ``get_2d_rotary_pos_embed(head_dim, crop region of the grid in a 32-token base
    grid, (grid, grid))`` -> ``(cos, sin)``, each ``[grid * grid, head_dim]`` float32."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    base_size = 512 // 8 // 2
    crops = get_resize_crop_region_for_grid((grid, grid), base_size)
    return get_2d_rotary_pos_embed(head_dim, crops, (grid, grid), output_type="pt")


def hunyuan_dit_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """As ``HunyuanDiTPipeline`` calls the transformer: latents ``[B, 4, 16, 16]`` (N = 64), timestep float32
    ``[B]`` (``torch.tensor([t] * B).to(latents.dtype)``), CLIP embeddings ``[B, 5, 24]`` + int64 mask, T5
    embeddings ``[B, 6, 16]`` + int64 mask (uncond rows keep 2 tokens of each, cond rows all / all but one or
    two; masked slots are replaced by the learned padding embedding in the model), ``image_meta_size`` float32
    ``[B, 6]`` = (orig h, orig w, target h, target w, crop top, crop left) = (1024, 1024, 128, 128, 0, 0),
    ``style`` int64 ``[B]`` zeros, ``image_rotary_emb`` = (cos, sin) ``[64, 8]`` each, ``return_dict=False``."""
    gen = _seeded(seed, 42_000)
    clip_valid = _cfg_valid(batch, 2, [5, 4])
    t5_valid = _cfg_valid(batch, 2, [6, 4])
    return dict(
        hidden_states=_cfg_latents(gen, batch, IN_CHANNELS, LATENT),
        timestep=torch.full((batch,), 881.0),
        encoder_hidden_states=torch.randn(batch, HUNYUAN_CLIP_LEN, HUNYUAN_CLIP_DIM, generator=gen),
        text_embedding_mask=_padded_mask(batch, HUNYUAN_CLIP_LEN, clip_valid),
        encoder_hidden_states_t5=torch.randn(batch, HUNYUAN_T5_LEN, HUNYUAN_T5_DIM, generator=gen),
        text_embedding_mask_t5=_padded_mask(batch, HUNYUAN_T5_LEN, t5_valid),
        image_meta_size=torch.tensor([[1024.0, 1024.0, 128.0, 128.0, 0.0, 0.0]]).repeat(batch, 1),
        style=torch.zeros(batch, dtype=torch.int64),
        image_rotary_emb=hunyuan_dit_rotary_emb(),
        return_dict=False,
    )


def tiny_hunyuan_dit_pipeline(transformer: HunyuanDiT2DModel | None = None) -> HunyuanDiTPipeline:
    """HunyuanDiTPipeline with a DDPM v-prediction scheduler (HunyuanDiT's), no VAE, no text encoders, no safety
    checker."""
    pipe = HunyuanDiTPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_hunyuan_dit_transformer(),
        scheduler=DDPMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.03,
            clip_sample=False,
            prediction_type="v_prediction",
            steps_offset=1,
            timestep_spacing="leading",
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_dit_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` images at 128 x 128 pixels (latents 16 x 16, N = 64); transformer batch ``2 * batch``.
    Resolution binning is off (it would snap to 1024-class shapes)."""
    gen = _seeded(seed, 43_000)
    return dict(
        prompt_embeds=torch.randn(batch, HUNYUAN_CLIP_LEN, HUNYUAN_CLIP_DIM, generator=gen),
        prompt_attention_mask=_padded_mask(batch, HUNYUAN_CLIP_LEN, [5, 4]),
        negative_prompt_embeds=torch.randn(batch, HUNYUAN_CLIP_LEN, HUNYUAN_CLIP_DIM, generator=gen),
        negative_prompt_attention_mask=_padded_mask(batch, HUNYUAN_CLIP_LEN, [2]),
        prompt_embeds_2=torch.randn(batch, HUNYUAN_T5_LEN, HUNYUAN_T5_DIM, generator=gen),
        prompt_attention_mask_2=_padded_mask(batch, HUNYUAN_T5_LEN, [6, 4]),
        negative_prompt_embeds_2=torch.randn(batch, HUNYUAN_T5_LEN, HUNYUAN_T5_DIM, generator=gen),
        negative_prompt_attention_mask_2=_padded_mask(batch, HUNYUAN_T5_LEN, [2]),
        height=LATENT * VAE_SCALE_FACTOR,
        width=LATENT * VAE_SCALE_FACTOR,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        use_resolution_binning=False,
        output_type="latent",
        return_dict=False,
    )


# ============================================================================================ DiT

DIT_NUM_CLASSES = 1000  # label 1000 is the pipeline's "null" class for CFG


def tiny_dit_transformer(seed: int = 0) -> DiTTransformer2DModel:
    """DiT (class-conditional): 2 blocks with adaLN-Zero from timestep + class label, hidden 32 = 4 heads x 8,
    patch 2, sincos position table for a 16 x 16 latent (N = 64), 4 latent channels in, 8 out (learned sigma),
    1000 classes + the null class."""
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=IN_CHANNELS,
        out_channels=2 * IN_CHANNELS,
        num_layers=2,
        sample_size=LATENT,
        patch_size=2,
        num_embeds_ada_norm=DIT_NUM_CLASSES,
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def dit_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """As ``DiTPipeline`` calls the transformer: latents ``[B, 4, 16, 16]`` (N = 64; the pipeline passes them
    positionally), timestep int64 ``[B]``, class labels int64 ``[B]`` = ``[labels; 1000 (null) ...]`` (conditional
    half first).  The pipeline does not pass ``return_dict``: the model returns a ``Transformer2DModelOutput``."""
    gen = _seeded(seed, 44_000)
    if batch % 2 == 0:
        labels = torch.randint(0, DIT_NUM_CLASSES, (batch // 2,), generator=gen)
        class_labels = torch.cat([labels, torch.full((batch // 2,), DIT_NUM_CLASSES)])
    else:
        class_labels = torch.randint(0, DIT_NUM_CLASSES, (batch,), generator=gen)
    return dict(
        hidden_states=_cfg_latents(gen, batch, IN_CHANNELS, LATENT),
        timestep=torch.tensor([751], dtype=torch.int64).expand(batch),
        class_labels=class_labels,
    )


def tiny_dit_vae(seed: int = 0) -> AutoencoderKL:
    """A one-level AutoencoderKL (8 channels, no down-sampling; 16 x 16 latents decode to 16 x 16 pixels):
    DiTPipeline always decodes."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=IN_CHANNELS,
        norm_num_groups=4,
        sample_size=LATENT,
    )
    _reinit_(vae, seed + 1, std=0.1)
    return vae.eval()


def tiny_dit_pipeline(transformer: DiTTransformer2DModel | None = None) -> DiTPipeline:
    """DiTPipeline with a DDIM scheduler and :func:`tiny_dit_vae` (the pipeline cannot skip decoding, so
    ``vae=None`` is impossible)."""
    pipe = DiTPipeline(
        transformer=transformer if transformer is not None else tiny_dit_transformer(),
        vae=tiny_dit_vae(),
        scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` class labels; latents 16 x 16 (the transformer's sample_size), N = 64; transformer batch
    ``2 * batch`` ``[cond; null]``.  Returns decoded pixels ``[batch, 3, 16, 16]`` (``output_type="pt"``)."""
    gen = _seeded(seed, 45_000)
    return dict(
        class_labels=torch.randint(0, DIT_NUM_CLASSES, (batch,), generator=gen).tolist(),
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=steps,
        output_type="pt",
        return_dict=False,
    )


# ============================================================================================ SD3.5

SD35_HIDDEN = 32  # 4 heads x 8
SD35_TEXT_DIM = 32  # joint_attention_dim
SD35_POOLED_DIM = 16
SD35_TEXT_LEN = 7


def tiny_sd35_transformer(seed: int = 0) -> SD3Transformer2DModel:
    """SD3.5 MMDiT: 2 joint blocks, hidden 32 = 4 heads x 8, per-head RMSNorm on q/k (``qk_norm="rms_norm"``,
    both streams), block 0 a dual-attention block (SD3.5-Medium's extra image-only self-attention ``attn2``),
    patch 2, 4 latent channels, cropped sincos position table (max 64), text width 32, pooled 16.  Same sizes as
    ``models.tiny_sd3_transformer`` so ``models.tiny_sd3_pipeline`` / ``models.sd3_call_kwargs`` work with it."""
    model = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=IN_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=SD35_TEXT_DIM,
        caption_projection_dim=SD35_HIDDEN,
        pooled_projection_dim=SD35_POOLED_DIM,
        out_channels=IN_CHANNELS,
        pos_embed_max_size=64,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def sd35_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """As ``StableDiffusion3Pipeline`` calls the transformer: latents ``[B, 4, 16, 16]`` (N = 64), timestep
    float32 ``[B]`` (flow-matching ``t.expand(B)``), joint text ``[B, 7, 32]`` (no mask: SD3 passes none), pooled
    ``[B, 16]``, ``joint_attention_kwargs=None``, ``return_dict=False``."""
    gen = _seeded(seed, 46_000)
    return dict(
        hidden_states=_cfg_latents(gen, batch, IN_CHANNELS, LATENT),
        timestep=torch.full((batch,), 882.5),
        encoder_hidden_states=torch.randn(batch, SD35_TEXT_LEN, SD35_TEXT_DIM, generator=gen),
        pooled_projections=torch.randn(batch, SD35_POOLED_DIM, generator=gen),
        joint_attention_kwargs=None,
        return_dict=False,
    )


def tiny_sd35_pipeline(transformer: SD3Transformer2DModel | None = None):
    """``models.tiny_sd3_pipeline`` (shift-3 flow-matching Euler, no VAE, no text encoders) with the SD3.5 model."""
    from tests.support.models import tiny_sd3_pipeline

    return tiny_sd3_pipeline(transformer if transformer is not None else tiny_sd35_transformer())


def sd35_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``models.sd3_call_kwargs`` for ``batch`` prompts (128 x 128 pixels, N = 64; transformer batch 2 * batch)."""
    from tests.support.models import sd3_call_kwargs

    return sd3_call_kwargs(num_prompts=batch, steps=steps, seed=seed)


# ============================================================================================ Lumina-Image-2.0

LUMINA2_HIDDEN = 24  # 2 query heads x 12, 1 KV head (GQA)
LUMINA2_CAP_DIM = 20  # cap_feat_dim (Gemma-2 width, 2304 in the real model)
LUMINA2_TEXT_LEN = 6


def tiny_lumina2_transformer(seed: int = 0) -> Lumina2Transformer2DModel:
    """Lumina-Image-2.0: 1 context-refiner block (text only), 1 noise-refiner block (image only), 2 joint blocks
    over ``[text; image]`` (per-row text length from the mask: image rows start at each prompt's own offset),
    hidden 24 = 2 query heads x 12 with 1 KV head, q/k RMSNorm, 3-axis RoPE (4, 4, 4) over (text position,
    row, col), patch 2, 4 latent channels, caption width 20."""
    model = Lumina2Transformer2DModel(
        sample_size=LATENT,
        patch_size=2,
        in_channels=IN_CHANNELS,
        hidden_size=LUMINA2_HIDDEN,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        norm_eps=1e-5,
        axes_dim_rope=(4, 4, 4),
        axes_lens=(64, 32, 32),
        cap_feat_dim=LUMINA2_CAP_DIM,
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def lumina2_call_kwargs(batch: int = 2, seed: int = 0, valid: tuple[int, ...] = (5,)) -> dict:
    """As ``Lumina2Pipeline`` calls the transformer for ONE guidance branch (it calls once with the prompts and
    once with the negative prompts; CFG is not batched): latents ``[B, 4, 16, 16]`` (N = 64; ``batch`` = number
    of images, independent latents), timestep float32 ``[B]`` = ``1 - t / 1000`` (0 = noise), Gemma embeddings
    ``[B, 6, 20]`` with an int64 mask: row ``b`` keeps ``valid[b % len(valid)]`` tokens (by default one prompt
    of 5 tokens for every image, padded to 6; ``valid=(6, 4)``: prompts of different lengths, whose image rows
    start at a different offset in each row), ``attention_kwargs=None``, ``return_dict=False``."""
    gen = _seeded(seed, 47_000)
    return dict(
        hidden_states=torch.randn(batch, IN_CHANNELS, LATENT, LATENT, generator=gen),
        timestep=torch.full((batch,), 0.125),
        encoder_hidden_states=torch.randn(batch, LUMINA2_TEXT_LEN, LUMINA2_CAP_DIM, generator=gen),
        encoder_attention_mask=_padded_mask(batch, LUMINA2_TEXT_LEN, list(valid)),
        attention_kwargs=None,
        return_dict=False,
    )


def tiny_lumina2_pipeline(transformer: Lumina2Transformer2DModel | None = None) -> Lumina2Pipeline:
    """Lumina2Pipeline with a flow-matching Euler scheduler, no VAE, no Gemma.  Calls the transformer twice per
    step (positive, then negative prompts), each with ``batch`` rows."""
    pipe = Lumina2Pipeline(
        transformer=transformer if transformer is not None else tiny_lumina2_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lumina2_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts at 128 x 128 pixels (latents 16 x 16, N = 64).  Positive prompts keep 6 / 4 tokens
    (alternating), the negative prompt 3: the two branch calls have different masks."""
    gen = _seeded(seed, 48_000)
    return dict(
        prompt_embeds=torch.randn(batch, LUMINA2_TEXT_LEN, LUMINA2_CAP_DIM, generator=gen),
        prompt_attention_mask=_padded_mask(batch, LUMINA2_TEXT_LEN, [6, 4]),
        negative_prompt_embeds=torch.randn(batch, LUMINA2_TEXT_LEN, LUMINA2_CAP_DIM, generator=gen),
        negative_prompt_attention_mask=_padded_mask(batch, LUMINA2_TEXT_LEN, [3]),
        height=LATENT * VAE_SCALE_FACTOR,
        width=LATENT * VAE_SCALE_FACTOR,
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# ============================================================================================ HiDream-I1

HIDREAM_HIDDEN = 32  # 2 heads x 16
HIDREAM_T5_DIM = 20
HIDREAM_LLAMA_DIM = 24
HIDREAM_POOLED_DIM = 12  # text_emb_dim (CLIP-L + CLIP-G pooled, 2048 in the real model)
HIDREAM_T5_LEN = 5
HIDREAM_LLAMA_LEN = 4
HIDREAM_LLAMA_LAYERS = 3  # hidden states the pipeline stacks (32 for Llama-3.1-8B)


def tiny_hidream_transformer(seed: int = 0) -> HiDreamImageTransformer2DModel:
    """HiDream-I1: 1 double-stream block and 1 single-stream block, hidden 32 = 2 heads x 16, q/k RMSNorm,
    3-axis RoPE (8, 4, 4) over ``[image; text]`` (image first; text ids are zero), MoE feed-forward on image
    tokens (4 routed SwiGLU experts, top-2, plus a shared expert; expert width rounds up to 256), patch 2,
    4 latent channels, max resolution 16 x 16 latents (max_seq 64).  Text: T5 ``[B, 5, 20]`` and Llama-3 hidden
    states ``[3, B, 4, 24]`` of which layers (0, 2) feed the two blocks; block inputs are ``[T5; llama[-1]]`` +
    the block's own Llama layer."""
    model = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=IN_CHANNELS,
        out_channels=IN_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        caption_channels=[HIDREAM_T5_DIM, HIDREAM_LLAMA_DIM],
        text_emb_dim=HIDREAM_POOLED_DIM,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(8, 4, 4),
        max_resolution=(LATENT, LATENT),
        llama_layers=[0, 2],
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def hidream_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """As ``HiDreamImagePipeline`` calls the transformer: latents ``[B, 4, 16, 16]`` (square: no
    ``hidden_states_masks``; N = 64), ``timesteps`` float32 ``[B]``, T5 ``[B, 5, 20]``, Llama-3 ``[3, B, 4, 24]``
    (CFG joins these on dim 1), pooled ``[B, 12]``, no text masks, ``attention_kwargs=None``,
    ``return_dict=False``."""
    gen = _seeded(seed, 49_000)
    return dict(
        hidden_states=_cfg_latents(gen, batch, IN_CHANNELS, LATENT),
        timesteps=torch.full((batch,), 875.0),
        encoder_hidden_states_t5=torch.randn(batch, HIDREAM_T5_LEN, HIDREAM_T5_DIM, generator=gen),
        encoder_hidden_states_llama3=torch.randn(
            HIDREAM_LLAMA_LAYERS, batch, HIDREAM_LLAMA_LEN, HIDREAM_LLAMA_DIM, generator=gen
        ),
        pooled_embeds=torch.randn(batch, HIDREAM_POOLED_DIM, generator=gen),
        attention_kwargs=None,
        return_dict=False,
    )


def tiny_hidream_pipeline(transformer: HiDreamImageTransformer2DModel | None = None) -> HiDreamImagePipeline:
    """HiDreamImagePipeline with a shift-3 flow-matching Euler scheduler, no VAE, no text encoders.

    The pipeline rescales every request to ``(default_sample_size * 8) ** 2`` pixels (128 -> 1024 x 1024, 4096
    tokens); ``default_sample_size`` is set to 16 here so requests land on 128 x 128 pixels (N = 64)."""
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        text_encoder_4=None,
        tokenizer_4=None,
        transformer=transformer if transformer is not None else tiny_hidream_transformer(),
    )
    pipe.default_sample_size = LATENT
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hidream_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts at 128 x 128 pixels (N = 64); transformer batch ``2 * batch`` (``[negative; positive]``)."""
    gen = _seeded(seed, 50_000)

    def llama():
        return torch.randn(HIDREAM_LLAMA_LAYERS, batch, HIDREAM_LLAMA_LEN, HIDREAM_LLAMA_DIM, generator=gen)

    return dict(
        prompt_embeds_t5=torch.randn(batch, HIDREAM_T5_LEN, HIDREAM_T5_DIM, generator=gen),
        prompt_embeds_llama3=llama(),
        pooled_prompt_embeds=torch.randn(batch, HIDREAM_POOLED_DIM, generator=gen),
        negative_prompt_embeds_t5=torch.randn(batch, HIDREAM_T5_LEN, HIDREAM_T5_DIM, generator=gen),
        negative_prompt_embeds_llama3=llama(),
        negative_pooled_prompt_embeds=torch.randn(batch, HIDREAM_POOLED_DIM, generator=gen),
        height=LATENT * VAE_SCALE_FACTOR,
        width=LATENT * VAE_SCALE_FACTOR,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# ============================================================================================ Sana

SANA_HIDDEN = 32  # 4 linear-attention heads x 8; cross-attention 4 heads x 8
SANA_CAPTION_DIM = 24  # caption_channels (Gemma-2 width)
SANA_TEXT_LEN = 6
SANA_VAE_SCALE_FACTOR = 32  # the pipeline's default without a VAE (DC-AE f32)


def tiny_sana_transformer(seed: int = 0) -> SanaTransformer2DModel:
    """Sana: 2 blocks of ReLU linear self-attention (no softmax), softmax cross-attention to the text, and a
    GLUMBConv feed-forward (1x1 conv, 3x3 depthwise conv over the token grid, 1x1 conv); hidden 32, patch 1,
    8 x 8 latents (N = 64), no position embedding (``interpolation_scale=None``), 4 latent channels."""
    model = SanaTransformer2DModel(
        in_channels=IN_CHANNELS,
        out_channels=IN_CHANNELS,
        num_attention_heads=4,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=4,
        cross_attention_head_dim=8,
        cross_attention_dim=SANA_HIDDEN,
        caption_channels=SANA_CAPTION_DIM,
        mlp_ratio=2.5,
        sample_size=GRID,
        patch_size=1,
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def sana_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """As ``SanaPipeline`` calls the transformer: latents ``[B, 4, 8, 8]`` (patch 1, N = 64), Gemma embeddings
    ``[B, 6, 24]`` with an int64 ``encoder_attention_mask`` (uncond rows keep 2 tokens, cond rows 6 / 4),
    timestep ``[B]`` (DPM-Solver flow timesteps ``t.expand(B) * timestep_scale``: int64 times 1.0 -> float32),
    ``attention_kwargs=None``, ``return_dict=False``."""
    gen = _seeded(seed, 51_000)
    valid = _cfg_valid(batch, 2, [6, 4])
    return dict(
        hidden_states=_cfg_latents(gen, batch, IN_CHANNELS, GRID),
        encoder_hidden_states=torch.randn(batch, SANA_TEXT_LEN, SANA_CAPTION_DIM, generator=gen),
        encoder_attention_mask=_padded_mask(batch, SANA_TEXT_LEN, valid),
        timestep=torch.full((batch,), 937.0),
        return_dict=False,
        attention_kwargs=None,
    )


def tiny_sana_pipeline(transformer: SanaTransformer2DModel | None = None) -> SanaPipeline:
    """SanaPipeline with Sana's flow DPM-Solver++ scheduler (flow shift 3), no VAE (scale factor 32), no Gemma."""
    pipe = SanaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer if transformer is not None else tiny_sana_transformer(),
        scheduler=DPMSolverMultistepScheduler(
            flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++"
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sana_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts at 256 x 256 pixels (latents 8 x 8, N = 64); transformer batch ``2 * batch``.
    Resolution binning is off; the complex-human-instruction only applies to text prompts (not embeddings)."""
    gen = _seeded(seed, 52_000)
    return dict(
        prompt_embeds=torch.randn(batch, SANA_TEXT_LEN, SANA_CAPTION_DIM, generator=gen),
        prompt_attention_mask=_padded_mask(batch, SANA_TEXT_LEN, [6, 4]),
        negative_prompt_embeds=torch.randn(batch, SANA_TEXT_LEN, SANA_CAPTION_DIM, generator=gen),
        negative_prompt_attention_mask=_padded_mask(batch, SANA_TEXT_LEN, [2]),
        negative_prompt=None,  # the default "" would clash with negative_prompt_embeds
        height=GRID * SANA_VAE_SCALE_FACTOR,
        width=GRID * SANA_VAE_SCALE_FACTOR,
        num_inference_steps=steps,
        guidance_scale=4.5,
        generator=torch.Generator().manual_seed(seed),
        use_resolution_binning=False,
        output_type="latent",
        return_dict=False,
    )


MODELS = {
    key: (globals()[f"tiny_{key}_transformer"], globals()[f"{key}_call_kwargs"])
    for key in ("pixart", "hunyuan_dit", "dit", "sd35", "lumina2", "hidream", "sana")
}
"""key -> (tiny transformer factory, call-kwargs factory)."""

PIPELINES = {
    key: (globals()[f"tiny_{key}_pipeline"], globals()[f"{key}_pipeline_kwargs"])
    for key in ("pixart", "hunyuan_dit", "dit", "sd35", "lumina2", "hidream", "sana")
}
"""key -> (tiny pipeline factory, pipeline-kwargs factory)."""
