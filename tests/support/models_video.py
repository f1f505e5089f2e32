"""Tiny, seeded, download-free video DiTs (and their diffusers pipelines) for the test-suite.

Same conventions as :mod:`models`: fp32, CPU, eval mode, every parameter re-initialised by
:func:`models._reinit_` (``std=0.15, qk_std=0.3``) so that no layer is zero-initialised away, and every
tensor drawn from a private ``torch.Generator``.

Three models, by key:

``ltx``
    :class:`~diffusers.LTXVideoTransformer3DModel`.  Latents are packed by the pipeline to
    ``[B, N, C]`` (patch size 1, so ``C`` = latent channels and ``N = F * H * W`` latent pixels).  RoPE
    (over the whole hidden width, not per head) is computed *inside* the model from ``num_frames``,
    ``height``, ``width`` and ``rope_interpolation_scale``; text enters through a cross-attention
    (``attn2``) whose keys are text only, with a text mask turned into an additive bias.
``cogvideox``
    :class:`~diffusers.CogVideoXTransformer3DModel`.  Latents ``[B, F, C, H, W]``; the patch embedding
    concatenates ``[text; image]`` tokens, every block runs joint self-attention over that sequence and the
    feed-forward runs on the concatenation too.  The default tiny model is CogVideoX-5B style (3-D RoPE
    tables computed by the pipeline and passed as ``image_rotary_emb``, written into the image rows of
    q and k in place); ``rope=False`` gives CogVideoX-2B style (sin-cos position table added in the patch
    embedding, no ``image_rotary_emb``).  There is no text mask.
``hunyuan_video``
    :class:`~diffusers.HunyuanVideoTransformer3DModel`.  Latents ``[B, C, F, H, W]``; the text goes through
    a token refiner (self-attention over text with a text mask), then double-stream blocks and
    single-stream blocks over the joint ``[image; text]`` sequence (image *first*), with a joint boolean
    key mask ``[B, 1, 1, N + L]`` that hides padded text.  RoPE over image rows only, computed in the model.
    Guidance-distilled: the pipeline does not batch CFG (``guidance`` is an embedded input instead).

Sizes (all defaults)
--------------------
Every model sees 2 latent frames of 8x8 (LTX: 4x4, patch 1) latent pixels, i.e. **N = 2 * 4 * 4 = 32
image tokens** per video:

========================  ==============================  ============  ==============================
model                     latents (transformer input)     text          pixels for the pipeline (no VAE)
========================  ==============================  ============  ==============================
ltx                       ``[B, 32, 8]`` packed            8 x 24        9 frames, 128 x 128
cogvideox                 ``[B, 2, 4, 8, 8]``              6 x 24        5 frames, 64 x 64
hunyuan_video             ``[B, 4, 2, 8, 8]``              6 x 24        5 frames, 64 x 64
========================  ==============================  ============  ==============================

Without a VAE the pipelines use these compression ratios (spatial / temporal): LTX 32 / 8, CogVideoX 8 / 4,
HunyuanVideo 8 / 4; latent frames = ``(num_frames - 1) // temporal + 1``.

Batches
-------
``<key>_call_kwargs(batch)`` and ``<key>_pipeline_kwargs(batch)`` both take the batch **the transformer
sees**.  LTX and CogVideoX batch classifier-free guidance (``[negative; positive]``, rows ``b`` and
``b + B // 2`` share their latents), so ``batch`` must be even there and the pipeline is given
``batch // 2`` prompts.  HunyuanVideo is guidance-distilled: ``batch`` prompts, one transformer call each
step (true CFG, not used here, would be a second call).

Pipelines
---------
All three pipelines run without text encoders, tokenizers and VAE when prompt embeddings (and, for LTX and
HunyuanVideo, their attention masks; for HunyuanVideo also the pooled CLIP embedding) are passed directly
and ``output_type="latent"``.
"""

from __future__ import annotations

import torch

from tests.support.models import _reinit_

# ------------------------------------------------------------------------------------------------- sizes

LATENT_FRAMES = 2
"""Latent frames for every model (N = 2 x 4 x 4 = 32 image tokens)."""

LTX_IN_CHANNELS = 8  # = packed token width (patch size 1)
LTX_HIDDEN = 32  # 4 heads x 8; RoPE spans the whole hidden width: 3 axes x 5 frequencies x 2 + 2 padding
LTX_TEXT_DIM = 24  # caption_channels: width of prompt_embeds
LTX_TEXT_LEN = 8
LTX_LATENT_SIZE = 4  # latent height = width; patch 1 -> 4 x 4 tokens per frame
LTX_SPATIAL_RATIO = 32  # LTXPipeline without a VAE
LTX_TEMPORAL_RATIO = 8
LTX_FRAME_RATE = 25

COGVIDEOX_IN_CHANNELS = 4
COGVIDEOX_HEAD_DIM = 16  # 3-D RoPE splits a head into t/h/w = dim/4, 3dim/8, 3dim/8: 16 is the smallest that works
COGVIDEOX_HIDDEN = 32  # 2 heads x 16
COGVIDEOX_TEXT_DIM = 24
COGVIDEOX_TEXT_LEN = 6  # = max_text_seq_length (the 2B sin-cos table has exactly this many text rows)
COGVIDEOX_LATENT_SIZE = 8  # latent height = width; patch 2 -> 4 x 4 tokens per frame
COGVIDEOX_SPATIAL_RATIO = 8  # CogVideoXPipeline without a VAE
COGVIDEOX_TEMPORAL_RATIO = 4

HUNYUAN_IN_CHANNELS = 4
HUNYUAN_HIDDEN = 16  # 2 heads x 8; rope_axes_dim (2, 2, 4) sums to the head dim
HUNYUAN_TEXT_DIM = 24  # text_embed_dim (LLaMA hidden states)
HUNYUAN_POOLED_DIM = 12  # pooled_projection_dim (CLIP pooled output)
HUNYUAN_TEXT_LEN = 6
HUNYUAN_LATENT_SIZE = 8  # patch 2 -> 4 x 4 tokens per frame
HUNYUAN_SPATIAL_RATIO = 8  # HunyuanVideoPipeline without a VAE
HUNYUAN_TEMPORAL_RATIO = 4

NUM_IMAGE_TOKENS = 32
"""N for every model at the default sizes."""


def _pixel_frames(temporal_ratio: int) -> int:
    return (LATENT_FRAMES - 1) * temporal_ratio + 1


def _cfg_rows(batch: int) -> int:
    if batch < 2 or batch % 2:
        raise ValueError(f"batch is the CFG-batched transformer batch ([negative; positive]): even, >= 2; got {batch}")
    return batch // 2


# --------------------------------------------------------------------------------------------------- LTX


def tiny_ltx_transformer(seed: int = 0):
    """LTX-Video: 2 blocks (self-attention with RoPE, cross-attention to text, feed-forward), hidden 32
    (4 heads x 8), per-hidden RMSNorm on q/k, 8 latent channels (patch 1), text width 24.

    Input ``[B, N, 8]`` packed latents, N = 32 at the default 2 x 4 x 4 latent grid; output ``[B, N, 8]``."""
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(
        in_channels=LTX_IN_CHANNELS,
        out_channels=LTX_IN_CHANNELS,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=LTX_HIDDEN,
        num_layers=2,
        caption_channels=LTX_TEXT_DIM,
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def _ltx_text(gen: torch.Generator, videos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positive and negative T5-like embeddings ``[videos, 8, 24]`` with bool masks (right padding, as the
    T5 tokenizer pads): positive prompt ``j`` has ``8 - 2 * (j % 2)`` valid tokens, the negative prompt 3.
    Padded slots hold random values too, so a mask that is ignored changes results."""
    prompt = torch.randn(videos, LTX_TEXT_LEN, LTX_TEXT_DIM, generator=gen)
    negative = torch.randn(videos, LTX_TEXT_LEN, LTX_TEXT_DIM, generator=gen)
    prompt_mask = torch.zeros(videos, LTX_TEXT_LEN, dtype=torch.bool)
    for j in range(videos):
        prompt_mask[j, : LTX_TEXT_LEN - 2 * (j % 2)] = True
    negative_mask = torch.zeros(videos, LTX_TEXT_LEN, dtype=torch.bool)
    negative_mask[:, :3] = True
    return prompt, prompt_mask, negative, negative_mask


def ltx_call_kwargs(batch: int = 2, seed: int = 0, timestep: float = 500.0) -> dict:
    """``transformer(**kwargs)`` as :class:`~diffusers.LTXPipeline` calls it at one step with CFG.

    * ``hidden_states`` ``[B, 32, 8]``: packed latents of ``B/2`` videos, ``cat([latents] * 2)``;
    * ``encoder_hidden_states`` ``[B, 8, 24]`` = ``[negative; positive]``, ``encoder_attention_mask``
      ``[B, 8]`` bool (negative: 3 valid tokens; positive prompt ``j``: 8 or 6);
    * ``timestep`` float32 ``[B]`` (flow-matching ``t = 1000 * sigma``, ``t.expand(B)``);
    * ``num_frames=2, height=4, width=4`` (latent grid) and ``rope_interpolation_scale = (8 / 25, 32, 32)``
      (temporal ratio / frame rate, spatial ratios: the VAE-less defaults).
    """
    videos = _cfg_rows(batch)
    gen = torch.Generator().manual_seed(40_000 + seed)
    latents = torch.randn(videos, NUM_IMAGE_TOKENS, LTX_IN_CHANNELS, generator=gen)
    prompt, prompt_mask, negative, negative_mask = _ltx_text(gen, videos)
    return dict(
        hidden_states=torch.cat([latents] * 2),
        encoder_hidden_states=torch.cat([negative, prompt]),
        timestep=torch.tensor(float(timestep)).expand(batch),
        encoder_attention_mask=torch.cat([negative_mask, prompt_mask]),
        num_frames=LATENT_FRAMES,
        height=LTX_LATENT_SIZE,
        width=LTX_LATENT_SIZE,
        rope_interpolation_scale=(
            LTX_TEMPORAL_RATIO / LTX_FRAME_RATE,
            LTX_SPATIAL_RATIO,
            LTX_SPATIAL_RATIO,
        ),
        attention_kwargs=None,
        return_dict=False,
    )


def tiny_ltx_pipeline(transformer=None):
    """:class:`~diffusers.LTXPipeline` with the tiny transformer, LTX-Video's flow-matching scheduler
    (dynamic shift, terminal shift 0.1), no VAE (spatial / temporal ratios 32 / 8), no text encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    pipe = LTXPipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_ltx_transformer(),
    )
    assert pipe.vae_spatial_compression_ratio == LTX_SPATIAL_RATIO
    assert pipe.vae_temporal_compression_ratio == LTX_TEMPORAL_RATIO
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ltx_pipeline_kwargs(batch: int = 2, steps: int = 8, seed: int = 0) -> dict:
    """``tiny_ltx_pipeline()(**kwargs)``: ``batch // 2`` prompts with CFG (guidance 3), 9 frames of
    128 x 128 pixels -> latents 2 x 4 x 4 (N = 32), text 8 x 24 with masks as in :func:`ltx_call_kwargs`.
    Returns packed latents ``[batch // 2, 32, 8]``."""
    videos = _cfg_rows(batch)
    gen = torch.Generator().manual_seed(40_000 + seed)
    prompt, prompt_mask, negative, negative_mask = _ltx_text(gen, videos)
    return dict(
        prompt_embeds=prompt,
        prompt_attention_mask=prompt_mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
        height=LTX_LATENT_SIZE * LTX_SPATIAL_RATIO,
        width=LTX_LATENT_SIZE * LTX_SPATIAL_RATIO,
        num_frames=_pixel_frames(LTX_TEMPORAL_RATIO),
        frame_rate=LTX_FRAME_RATE,
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# --------------------------------------------------------------------------------------------- CogVideoX


def tiny_cogvideox_transformer(seed: int = 0, rope: bool = True):
    """CogVideoX: 2 blocks of joint [text; image] self-attention (LayerNorm q/k) + feed-forward, hidden 32
    (2 heads x 16), patch 2, 4 latent channels, text width 24, time embedding 32.

    ``rope=True`` (default): CogVideoX-5B style, 3-D RoPE from the pipeline (``image_rotary_emb``, two
    ``[N, 16]`` tables).  ``rope=False``: CogVideoX-2B style, a sin-cos table ``[1, 6 + N, 32]`` added after
    the patch embedding (its text rows are zero).  Input ``[B, 2, 4, 8, 8]``, N = 2 x 4 x 4 = 32 tokens,
    text length must be 6 (``max_text_seq_length``); output ``[B, 2, 4, 8, 8]``."""
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=COGVIDEOX_HEAD_DIM,
        in_channels=COGVIDEOX_IN_CHANNELS,
        out_channels=COGVIDEOX_IN_CHANNELS,
        time_embed_dim=32,
        text_embed_dim=COGVIDEOX_TEXT_DIM,
        num_layers=2,
        sample_width=COGVIDEOX_LATENT_SIZE,
        sample_height=COGVIDEOX_LATENT_SIZE,
        sample_frames=_pixel_frames(COGVIDEOX_TEMPORAL_RATIO),
        patch_size=2,
        temporal_compression_ratio=COGVIDEOX_TEMPORAL_RATIO,
        max_text_seq_length=COGVIDEOX_TEXT_LEN,
        use_rotary_positional_embeddings=rope,
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def cogvideox_rotary_emb() -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables ``(cos, sin)``, each ``[32, 16]``, exactly as
    ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` builds them for the tiny model (CogVideoX 1.0
    path: crop region of the 4 x 4 grid in the 4 x 4 base grid, 2 latent frames)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    grid = COGVIDEOX_LATENT_SIZE // 2
    crops = get_resize_crop_region_for_grid((grid, grid), grid, grid)
    return get_3d_rotary_pos_embed(
        embed_dim=COGVIDEOX_HEAD_DIM,
        crops_coords=crops,
        grid_size=(grid, grid),
        temporal_size=LATENT_FRAMES,
        device=torch.device("cpu"),
    )


def cogvideox_call_kwargs(batch: int = 2, seed: int = 0, timestep: int = 500, rope: bool = True) -> dict:
    """``transformer(**kwargs)`` as :class:`~diffusers.CogVideoXPipeline` calls it at one step with CFG.

    * ``hidden_states`` ``[B, 2, 4, 8, 8]`` (frames before channels), ``cat([latents] * 2)``;
    * ``encoder_hidden_states`` ``[B, 6, 24]`` = ``[negative; positive]`` (no text mask: CogVideoX attends
      to T5's padding);
    * ``timestep`` int64 ``[B]`` (DDIM timesteps, ``t.expand(B)``);
    * ``image_rotary_emb`` = :func:`cogvideox_rotary_emb` with ``rope`` (must match the model), else None.
    """
    videos = _cfg_rows(batch)
    gen = torch.Generator().manual_seed(50_000 + seed)
    latents = torch.randn(
        videos, LATENT_FRAMES, COGVIDEOX_IN_CHANNELS, COGVIDEOX_LATENT_SIZE, COGVIDEOX_LATENT_SIZE, generator=gen
    )
    prompt = torch.randn(videos, COGVIDEOX_TEXT_LEN, COGVIDEOX_TEXT_DIM, generator=gen)
    negative = torch.randn(videos, COGVIDEOX_TEXT_LEN, COGVIDEOX_TEXT_DIM, generator=gen)
    return dict(
        hidden_states=torch.cat([latents] * 2),
        encoder_hidden_states=torch.cat([negative, prompt]),
        timestep=torch.tensor(int(timestep)).expand(batch),
        image_rotary_emb=cogvideox_rotary_emb() if rope else None,
        attention_kwargs=None,
        return_dict=False,
    )


def tiny_cogvideox_pipeline(transformer=None):
    """:class:`~diffusers.CogVideoXPipeline` with the tiny transformer, CogVideoX's DDIM scheduler
    (v-prediction, zero-terminal-SNR, trailing spacing), no VAE (ratios 8 / 4), no text encoder.  The
    pipeline builds ``image_rotary_emb`` itself when the transformer uses RoPE."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )
    pipe = CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer if transformer is not None else tiny_cogvideox_transformer(),
        scheduler=scheduler,
    )
    assert pipe.vae_scale_factor_spatial == COGVIDEOX_SPATIAL_RATIO
    assert pipe.vae_scale_factor_temporal == COGVIDEOX_TEMPORAL_RATIO
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cogvideox_pipeline_kwargs(batch: int = 2, steps: int = 8, seed: int = 0) -> dict:
    """``tiny_cogvideox_pipeline()(**kwargs)``: ``batch // 2`` prompts with CFG (guidance 6), 5 frames of
    64 x 64 pixels -> latents ``[*, 2, 4, 8, 8]`` (N = 32), text 6 x 24.  Returns latents
    ``[batch // 2, 2, 4, 8, 8]``."""
    videos = _cfg_rows(batch)
    gen = torch.Generator().manual_seed(50_000 + seed)
    return dict(
        prompt_embeds=torch.randn(videos, COGVIDEOX_TEXT_LEN, COGVIDEOX_TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(videos, COGVIDEOX_TEXT_LEN, COGVIDEOX_TEXT_DIM, generator=gen),
        height=COGVIDEOX_LATENT_SIZE * COGVIDEOX_SPATIAL_RATIO,
        width=COGVIDEOX_LATENT_SIZE * COGVIDEOX_SPATIAL_RATIO,
        num_frames=_pixel_frames(COGVIDEOX_TEMPORAL_RATIO),
        num_inference_steps=steps,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# ------------------------------------------------------------------------------------------ HunyuanVideo


def tiny_hunyuan_video_transformer(seed: int = 0):
    """HunyuanVideo: 1 token-refiner block, 1 double-stream and 1 single-stream block, hidden 16 (2 heads x
    8), RMSNorm q/k, RoPE axes (2, 2, 4) over (frame, height, width), patch 2 x 2 (temporal 1), 4 latent
    channels, LLaMA text width 24, pooled CLIP width 12, guidance embedding.

    Input ``[B, 4, 2, 8, 8]``, N = 2 x 4 x 4 = 32 image tokens; output ``[B, 4, 2, 8, 8]``."""
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=HUNYUAN_IN_CHANNELS,
        out_channels=HUNYUAN_IN_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=HUNYUAN_TEXT_DIM,
        pooled_projection_dim=HUNYUAN_POOLED_DIM,
        rope_axes_dim=(2, 2, 4),
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    return model.eval()


def _hunyuan_text(gen: torch.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLaMA-like embeddings ``[B, 6, 24]``, float32 masks ``[B, 6]`` (right padding: prompt ``j`` has
    ``6 - 2 * (j % 2)`` valid tokens; the model's joint mask assumes valid tokens come first) and pooled
    CLIP-like embeddings ``[B, 12]``."""
    embeds = torch.randn(batch, HUNYUAN_TEXT_LEN, HUNYUAN_TEXT_DIM, generator=gen)
    mask = torch.zeros(batch, HUNYUAN_TEXT_LEN)
    for j in range(batch):
        mask[j, : HUNYUAN_TEXT_LEN - 2 * (j % 2)] = 1.0
    pooled = torch.randn(batch, HUNYUAN_POOLED_DIM, generator=gen)
    return embeds, mask, pooled


def hunyuan_video_call_kwargs(batch: int = 2, seed: int = 0, timestep: float = 500.0) -> dict:
    """``transformer(**kwargs)`` as :class:`~diffusers.HunyuanVideoPipeline` calls it at one step.

    No batched CFG (guidance-distilled): ``batch`` different prompts, each with its own latents.

    * ``hidden_states`` ``[B, 4, 2, 8, 8]`` (channels before frames);
    * ``timestep`` float32 ``[B]`` (``t.expand(B).to(latents.dtype)``, flow matching ``t = 1000 * sigma``);
    * ``encoder_hidden_states`` ``[B, 6, 24]``, ``encoder_attention_mask`` float32 ``[B, 6]`` (the pipeline
      casts the tokenizer's mask to the transformer dtype; prompt 1 has 2 padded tokens),
      ``pooled_projections`` ``[B, 12]``;
    * ``guidance`` float32 ``[B]`` = 6.0 * 1000 (the pipeline's default ``guidance_scale``).
    """
    gen = torch.Generator().manual_seed(60_000 + seed)
    latents = torch.randn(
        batch, HUNYUAN_IN_CHANNELS, LATENT_FRAMES, HUNYUAN_LATENT_SIZE, HUNYUAN_LATENT_SIZE, generator=gen
    )
    embeds, mask, pooled = _hunyuan_text(gen, batch)
    return dict(
        hidden_states=latents,
        timestep=torch.tensor(float(timestep)).expand(batch),
        encoder_hidden_states=embeds,
        encoder_attention_mask=mask,
        pooled_projections=pooled,
        guidance=torch.tensor([6.0] * batch) * 1000.0,
        attention_kwargs=None,
        return_dict=False,
    )


def tiny_hunyuan_video_pipeline(transformer=None):
    """:class:`~diffusers.HunyuanVideoPipeline` with the tiny transformer, a shift-7 flow-matching Euler
    scheduler (HunyuanVideo's), no VAE (ratios 8 / 4), no LLaMA/CLIP encoders or tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_hunyuan_video_transformer(),
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
    )
    assert pipe.vae_scale_factor_spatial == HUNYUAN_SPATIAL_RATIO
    assert pipe.vae_scale_factor_temporal == HUNYUAN_TEMPORAL_RATIO
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_video_pipeline_kwargs(batch: int = 2, steps: int = 8, seed: int = 0) -> dict:
    """``tiny_hunyuan_video_pipeline()(**kwargs)``: ``batch`` prompts (no CFG batch; embedded guidance 6),
    5 frames of 64 x 64 pixels -> latents ``[B, 4, 2, 8, 8]`` (N = 32), text 6 x 24 with masks and pooled
    embeddings as in :func:`hunyuan_video_call_kwargs`.  Returns latents ``[batch, 4, 2, 8, 8]``."""
    gen = torch.Generator().manual_seed(60_000 + seed)
    embeds, mask, pooled = _hunyuan_text(gen, batch)
    return dict(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        pooled_prompt_embeds=pooled,
        height=HUNYUAN_LATENT_SIZE * HUNYUAN_SPATIAL_RATIO,
        width=HUNYUAN_LATENT_SIZE * HUNYUAN_SPATIAL_RATIO,
        num_frames=_pixel_frames(HUNYUAN_TEMPORAL_RATIO),
        num_inference_steps=steps,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )
