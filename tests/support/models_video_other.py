"""Tiny, seeded, download-free video DiTs of diffusers' other video classes: Allegro, EasyAnimate, ConsisID,
Motif-Video, HunyuanVideo Framepack, LTX-2, MiniMax-H3, Kandinsky 6 and its super-resolution model.

Conventions as :mod:`models_video`: one or two blocks, 2 heads x 8 where the class allows (Allegro 2 x 12: its
RoPE splits a head in three; EasyAnimate and ConsisID 2 x 16: CogVideoX's 3-D RoPE), N = 32 video tokens (2 latent
frames of 4 x 4 patches), parameters re-drawn with ``_reinit_``. Where the real pipeline builds download-free its
first transformer call is read from it (``capture.transformer_call_kwargs``); elsewhere the call is written by hand
after the pipeline's ``__call__``, as each function says.

* Allegro batches guidance (``[negative; positive]``), int mask over T5 tokens turned into a bias, float timesteps
  of the Euler-ancestral scheduler (1000 scale), 3-axis RoPE tables and positions from the pipeline, text
  ``[B, 1, L, D]``. No VAE (ratios 8 / 4).
* EasyAnimate batches guidance, float timesteps (1000 scale), no text mask reaches the transformer (it takes
  latents and timestep positionally); the denoising loop reads ``vae.config.latent_channels``, so a one-level
  ``AutoencoderKLMagvit`` (ratios 2 / 1) is built, never run.
* ConsisID batches guidance, int64 DDIM-style timesteps (1000 scale), latents ``[B, F, C, H, W]`` with the image
  latents concatenated on channels, RoPE tables from the pipeline, face inputs written by hand (one face for all
  rows); it VAE-encodes the face image, so a one-level ``AutoencoderKLCogVideoX`` (spatial ratio 1) is built.
* Motif-Video's guider (classifier-free guidance) calls the transformer once per branch, bool text mask, float
  timesteps (1000 scale), 9 input channels (latents, condition latents, mask), 4 output; a tiny Wan VAE gives the
  latent channels and factors (8 / 4).
* HunyuanVideo Framepack (hand-written call: the pipeline needs SigLIP and a VAE) is guidance-distilled, one call
  per step; history latents (clean, 2x, 4x) are packed before the noisy tokens.
* LTX-2 (hand-written call: text connectors, two VAEs and a vocoder) batches guidance, packed video ``[B, N, C]``
  and audio tokens, two outputs (video, audio).
* MiniMax-H3 (modular pipeline only; hand-written call) packs ``[text; audio; video]`` rows by index, timesteps in
  ``[0, 1]``.
* Kandinsky 6 (TI2VA) calls the transformer once per guidance branch (positive, then negative), float timesteps
  (1000 scale), channels-last video latents ``[B, T, H, W, 2C + 1]`` (noisy latents, conditioning latents, mask:
  zeros for text to video), audio latents ``[B, L, C_a]``, text embeddings and CLIP pooled embeddings (no text mask
  when handed embeddings), two outputs (video, audio). No video VAE (ratios 8 / 4); it asks for an audio VAE and a
  vocoder to sample audio, so a tiny ``MMAudioVAE`` and ``MMAudioVocoder`` are built, never run.
* Kandinsky 6 SR (hand-written call: the pipeline needs its K-VAE) is text-free and unguided, one call per step on
  a batch of tiles, channels-last ``[B, T, H, W, 2C + 1]`` latents (noisy, anchor, anchor mask), 1000-scale
  timesteps; NABLA sparse self-attention (a block mask from the queries' and keys' block means, flex attention).
"""

from __future__ import annotations

import torch

from tests.support.capture import transformer_call_kwargs
from tests.support.models import _reinit_
from tests.support.models_video_more import tiny_wan_vae

TEXT_DIM, TEXT_LEN = 24, 6


# ------------------------------------------------------------------------------------------------------- Allegro


def tiny_allegro_transformer(seed: int = 0):
    """Allegro: two blocks (self-attention with 3-axis RoPE, cross-attention to text, feed-forward), 2 heads x 12
    (the RoPE splits a head into three parts of 4), patch 2, 4 latent channels, text width 24."""
    from diffusers import AllegroTransformer3DModel

    model = AllegroTransformer3DModel(
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=24,
        sample_height=8,
        sample_width=8,
        sample_frames=2,
        caption_channels=TEXT_DIM,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_allegro_pipeline(transformer=None):
    """AllegroPipeline with an Euler-ancestral scheduler, no VAE (spatial 8, temporal 4), no T5."""
    from diffusers import AllegroPipeline, EulerAncestralDiscreteScheduler

    pipe = AllegroPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer if transformer is not None else tiny_allegro_transformer(),
        scheduler=EulerAncestralDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _masked_text(gen: torch.Generator, batch: int, valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    embeds = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.long)
    mask[:, :valid] = 1
    return embeds, mask


def allegro_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 6 tokens (all valid) and negative prompts of 3 valid tokens (guidance 7.5, batched),
    5 frames of 64 px: latents ``[B, 4, 2, 8, 8]``, N = 32."""
    gen = torch.Generator().manual_seed(80_000 + seed)
    prompt, prompt_mask = _masked_text(gen, batch, TEXT_LEN)
    negative, negative_mask = _masked_text(gen, batch, 3)
    return dict(
        negative_prompt=None,
        prompt_embeds=prompt,
        prompt_attention_mask=prompt_mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
        guidance_scale=7.5,
        num_frames=5,
        height=64,
        width=64,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def allegro_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``AllegroPipeline``: ``batch`` rows, the negative and positive halves of
    ``batch // 2`` prompts."""
    return transformer_call_kwargs(
        tiny_allegro_pipeline(), allegro_pipeline_kwargs(max(1, batch // 2), steps=4, seed=seed)
    )


# --------------------------------------------------------------------------------------------------- EasyAnimate


def tiny_easyanimate_transformer(seed: int = 0):
    """EasyAnimate: one MMDiT block (text with its own q/k/v and feed-forward) and one block over the joined
    ``[text; image]`` sequence, 2 heads x 16 (CogVideoX's 3-D RoPE splits a head 4/8/8), patch 2, 4 latent
    channels, text width 24."""
    from diffusers import EasyAnimateTransformer3DModel

    model = EasyAnimateTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        sample_width=8,
        sample_height=8,
        num_layers=2,
        mmdit_layers=1,
        time_embed_dim=32,
        text_embed_dim=TEXT_DIM,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def _tiny_magvit_vae():
    """A one-level ``AutoencoderKLMagvit`` (never run: latent output): spatial ratio 2, temporal ratio 1."""
    from diffusers import AutoencoderKLMagvit

    return AutoencoderKLMagvit(
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("SpatialDownBlock3D", "SpatialTemporalDownBlock3D"),
        up_block_types=("SpatialUpBlock3D", "SpatialTemporalUpBlock3D"),
        layers_per_block=1,
        norm_num_groups=8,
    )


def tiny_easyanimate_pipeline(transformer=None):
    """EasyAnimatePipeline with a flow-matching scheduler, a tiny Magvit VAE (the denoising loop reads its
    ``latent_channels``), no Qwen2-VL text encoder or tokenizer."""
    from diffusers import EasyAnimatePipeline, FlowMatchEulerDiscreteScheduler

    pipe = EasyAnimatePipeline(
        vae=_tiny_magvit_vae(),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_easyanimate_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def easyanimate_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 6 tokens and negative prompts of 3 valid tokens (guidance 5, batched; the transformer
    takes no text mask), 2 frames of 16 px: latents ``[B, 4, 2, 8, 8]``, N = 32."""
    gen = torch.Generator().manual_seed(81_000 + seed)
    prompt, prompt_mask = _masked_text(gen, batch, TEXT_LEN)
    negative, negative_mask = _masked_text(gen, batch, 3)
    return dict(
        prompt_embeds=prompt,
        prompt_attention_mask=prompt_mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
        guidance_scale=5.0,
        num_frames=2,
        height=16,
        width=16,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def easyanimate_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``EasyAnimatePipeline``: ``batch`` rows, the negative and positive halves of
    ``batch // 2`` prompts."""
    return transformer_call_kwargs(
        tiny_easyanimate_pipeline(), easyanimate_pipeline_kwargs(max(1, batch // 2), steps=4, seed=seed)
    )


# ------------------------------------------------------------------------------------------------------ ConsisID

#: ConsisID's face inputs: the ArcFace-like identity embedding ``id_cond`` [faces, 12] and the face ViT's hidden
#: states ``id_vit_hidden`` (one [faces, 5, 16] tensor per scale, 2 scales), which the local facial extractor turns
#: into 4 face tokens of width ``int(32 / 3 * 2) = 21`` that the image tokens cross-attend to.
CONSISID_ID_DIM, CONSISID_VIT_DIM, CONSISID_VIT_LEN, CONSISID_SCALES = 12, 16, 5, 2


def tiny_consisid_transformer(seed: int = 0):
    """ConsisID: CogVideoX-5B-style blocks (joint ``[text; image]`` attention, 3-D RoPE from the pipeline), 2 blocks
    of 2 heads x 16, patch 2, 8 input channels (4 noisy + 4 image latents), 4 output; the face branch on (a local
    facial extractor of 2 perceiver layers, a perceiver cross-attention of the image tokens to the face tokens after
    block 0)."""
    from diffusers import ConsisIDTransformer3DModel

    model = ConsisIDTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=8,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=TEXT_DIM,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=5,
        patch_size=2,
        max_text_seq_length=TEXT_LEN,
        use_rotary_positional_embeddings=True,
        is_train_face=True,
        cross_attn_interval=2,
        cross_attn_dim_head=8,
        cross_attn_num_heads=2,
        LFE_id_dim=CONSISID_ID_DIM,
        LFE_vit_dim=CONSISID_VIT_DIM,
        LFE_depth=CONSISID_SCALES,
        LFE_dim_head=8,
        LFE_num_heads=2,
        LFE_num_id_token=2,
        LFE_num_querie=4,
        LFE_output_dim=21,
        LFE_ff_mult=2,
        LFE_num_scale=CONSISID_SCALES,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_consisid_pipeline(transformer=None):
    """ConsisIDPipeline with CogVideoX's DPM scheduler, a one-level ``AutoencoderKLCogVideoX`` (spatial ratio 1; it
    encodes the face image into the first latent frame of the image latents), no T5. Imported from its module:
    ``diffusers`` exports a placeholder without OpenCV, which the pipeline needs only to draw face key points
    (``is_kps``)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler
    from diffusers.pipelines.consisid.pipeline_consisid import ConsisIDPipeline

    vae = AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",),
        up_block_types=("CogVideoXUpBlock3D",),
        block_out_channels=(8,),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDPMScheduler(
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
    pipe = ConsisIDPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=transformer if transformer is not None else tiny_consisid_transformer(),
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def consisid_face_inputs(faces: int = 1, seed: int = 0) -> dict:
    """Hand-written face embeddings in place of ConsisID's face models (``process_face_embeddings_infer``)."""
    gen = torch.Generator().manual_seed(82_500 + seed)
    return dict(
        id_cond=torch.randn(faces, CONSISID_ID_DIM, generator=gen),
        id_vit_hidden=[
            torch.randn(faces, CONSISID_VIT_LEN, CONSISID_VIT_DIM, generator=gen) for _ in range(CONSISID_SCALES)
        ],
    )


def consisid_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 6 tokens with negative prompts (guidance 6, batched), one face (embeddings and an 8 px
    image), 5 frames of 8 px: latents ``[B, 2, 4, 8, 8]`` (frames before channels), N = 32."""
    gen = torch.Generator().manual_seed(82_000 + seed)
    return dict(
        image=torch.rand(1, 3, 8, 8, generator=gen),
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        **consisid_face_inputs(1, seed),
        guidance_scale=6.0,
        num_frames=5,
        height=8,
        width=8,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def consisid_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``ConsisIDPipeline``: ``batch`` rows, the negative and positive halves of
    ``batch // 2`` prompts, one face for all of them."""
    return transformer_call_kwargs(
        tiny_consisid_pipeline(), consisid_pipeline_kwargs(max(1, batch // 2), steps=4, seed=seed)
    )


# ---------------------------------------------------------------------------------------------------- Motif-Video


def tiny_motif_video_transformer(seed: int = 0, decoder: bool = True):
    """Motif-Video: one dual-stream block, two single-stream blocks (the last one a decoder layer unless
    ``decoder=False``), text cross-attention in both kinds, 2 heads x 8, 3-axis RoPE (2, 2, 4), patch 2, 9 input
    channels (4 noisy latents, 4 condition latents, a mask), 4 output, text width 24."""
    from diffusers import MotifVideoTransformer3DModel

    model = MotifVideoTransformer3DModel(
        in_channels=9,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=2,
        num_decoder_layers=1 if decoder else 0,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=TEXT_DIM,
        rope_axes_dim=(2, 2, 4),
        enable_text_cross_attention_dual=True,
        enable_text_cross_attention_single=True,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_motif_video_pipeline(transformer=None):
    """MotifVideoPipeline with a flow-matching scheduler, classifier-free guidance (5) as its guider, a tiny Wan VAE,
    no T5Gemma2 text encoder or tokenizer."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, MotifVideoPipeline

    pipe = MotifVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=tiny_wan_vae(),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_motif_video_transformer(),
        guider=ClassifierFreeGuidance(guidance_scale=5.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def motif_video_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 6 tokens and negative prompts of 3 valid tokens (bool masks; the guider calls the
    transformer once per branch), 5 frames of 64 px: latents ``[B, 4, 2, 8, 8]`` (plus 4 condition channels and a
    mask channel, all zero for text to video), N = 32."""
    gen = torch.Generator().manual_seed(83_000 + seed)
    prompt, prompt_mask = _masked_text(gen, batch, TEXT_LEN)
    negative, negative_mask = _masked_text(gen, batch, 3)
    return dict(
        prompt_embeds=prompt,
        prompt_attention_mask=prompt_mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
        num_frames=5,
        height=64,
        width=64,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def motif_video_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``MotifVideoPipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_motif_video_pipeline(), motif_video_pipeline_kwargs(batch, steps=4, seed=seed))


# ------------------------------------------------------------------------------------------ HunyuanVideo Framepack

FRAMEPACK_WINDOW = 2  # latent_window_size: latent frames generated per section
FRAMEPACK_HISTORY = (1, 2, 16)  # history_sizes of the inverted anti-drifting sampling (1x, 2x, 4x)


def tiny_framepack_transformer(seed: int = 0):
    """HunyuanVideo Framepack: one token-refiner layer, one double-stream and one single-stream block, 2 heads x 8,
    3-axis RoPE (2, 2, 4), patch 2, 4 latent channels, text width 24, pooled width 12, the SigLIP image projection
    (width 12) and the history patch embeddings (1x, 2x, 4x), guidance-distilled."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=12,
        rope_axes_dim=(2, 2, 4),
        has_image_proj=True,
        image_proj_dim=12,
        has_clean_x_embedder=True,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def framepack_call_kwargs(batch: int = 2, seed: int = 0, timestep: float = 1000.0) -> dict:
    """``transformer(**kwargs)`` as ``HunyuanVideoFramepackPipeline`` calls it at the first step of its first
    section, written by hand: the pipeline needs a SigLIP image encoder and a VAE (it decodes every section into
    the history video). Follows its ``__call__`` for ``sampling_type=INVERTED_ANTI_DRIFTING``, one section
    (``latent_padding_size = 0``), ``latent_window_size = 2`` and ``true_cfg_scale = 1`` (one call per step):

    * ``hidden_states`` ``[B, 4, 2, 8, 8]`` (64 px, 5 frames), ``indices_latents = [1, 2]``;
    * ``latents_clean`` = ``cat([image_latents, history_1x])`` ``[B, 4, 2, 8, 8]`` at frames ``[0, 3]``; the
      2x and 4x history latents (2 and 16 frames, zeros in the first section) at frames ``[4, 5]`` and
      ``[6, ..., 21]``; the image latents (the VAE-encoded first frame) drawn at random here;
    * ``encoder_attention_mask`` float ``[B, 6]`` (``.to(transformer_dtype)``; 6 and 4 valid tokens),
      ``pooled_projections`` ``[B, 12]``, ``image_embeds`` ``[B, 4, 12]`` (SigLIP's last hidden state);
    * ``timestep`` float32 ``[B]`` (``1000 * sigma``), ``guidance`` ``[B]`` = ``guidance_scale * 1000``.
    """
    gen = torch.Generator().manual_seed(84_000 + seed)
    latents = torch.randn(batch, 4, FRAMEPACK_WINDOW, 8, 8, generator=gen)
    image_latents = torch.randn(batch, 4, 1, 8, 8, generator=gen)
    history = torch.zeros(batch, 4, sum(FRAMEPACK_HISTORY), 8, 8)
    history_1x, history_2x, history_4x = history.split(FRAMEPACK_HISTORY, dim=2)
    indices = torch.arange(0, 1 + FRAMEPACK_WINDOW + sum(FRAMEPACK_HISTORY))
    prefix, window, index_1x, index_2x, index_4x = indices.split([1, FRAMEPACK_WINDOW, *FRAMEPACK_HISTORY])
    mask = torch.ones(batch, TEXT_LEN)
    mask[1::2, TEXT_LEN - 2 :] = 0.0
    return dict(
        hidden_states=latents,
        timestep=torch.tensor(float(timestep)).expand(batch),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(batch, 12, generator=gen),
        image_embeds=torch.randn(batch, 4, 12, generator=gen),
        indices_latents=window,
        guidance=torch.full((batch,), 10.0 * 1000.0),
        latents_clean=torch.cat([image_latents, history_1x], dim=2),
        indices_latents_clean=torch.cat([prefix, index_1x]),
        latents_history_2x=history_2x,
        indices_latents_history_2x=index_2x,
        latents_history_4x=history_4x,
        indices_latents_history_4x=index_4x,
        attention_kwargs=None,
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------------------- LTX-2

LTX2_AUDIO_FRAMES = 5  # audio latent frames of the tiny clip
LTX2_AUDIO_IN = 8  # packed audio token width: 2 latent channels x 4 latent mel bins


def tiny_ltx2_transformer(seed: int = 0):
    """LTX-2 (2.0, prompt projections in the transformer): one audio-visual block (video self-attention, text
    cross-attention, audio-to-video and video-to-audio cross-attention, feed-forwards), video 2 heads x 8 over
    packed tokens of 4 channels (patch 1), audio 2 heads x 8 over tokens of width 8, text width 24."""
    from diffusers import LTX2VideoTransformer3DModel

    model = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=LTX2_AUDIO_IN,
        audio_out_channels=LTX2_AUDIO_IN,
        audio_num_attention_heads=2,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
        num_layers=1,
        caption_channels=TEXT_DIM,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def ltx2_call_kwargs(batch: int = 2, seed: int = 0, timestep: float = 1000.0) -> dict:
    """``transformer(**kwargs)`` as ``LTX2Pipeline`` calls it at its first step with CFG, written by hand (the
    pipeline needs its text connectors, the video and audio VAEs and the vocoder to build). Follows its
    ``__call__`` (steps 4-7): ``batch`` rows ``[negative; positive]`` of ``batch // 2`` prompts,

    * ``hidden_states`` ``[B, 32, 4]`` packed video latents (2 x 4 x 4 latent grid, patch 1),
      ``audio_hidden_states`` ``[B, 5, 8]`` packed audio latents, both ``cat([latents] * 2)``;
    * ``encoder_hidden_states`` = ``audio_encoder_hidden_states`` ``[B, 6, 24]`` (the connectors' output) with
      one ``encoder_attention_mask`` ``[B, 6]`` (negative: 3 valid tokens) for both;
    * ``timestep`` = ``sigma`` float32 ``[B]`` (``1000 * sigma``);
    * ``video_coords`` / ``audio_coords`` from ``transformer.rope.prepare_video_coords`` and
      ``transformer.audio_rope.prepare_audio_coords`` (fps 24), repeated for the two halves.
    """
    videos = max(1, batch // 2)
    gen = torch.Generator().manual_seed(85_000 + seed)
    latents = torch.randn(videos, 32, 4, generator=gen)
    audio = torch.randn(videos, LTX2_AUDIO_FRAMES, LTX2_AUDIO_IN, generator=gen)
    prompt, prompt_mask = _masked_text(gen, videos, TEXT_LEN)
    negative, negative_mask = _masked_text(gen, videos, 3)
    model = tiny_ltx2_transformer(seed)
    video_coords = model.rope.prepare_video_coords(videos, 2, 4, 4, torch.device("cpu"), fps=24.0)
    audio_coords = model.audio_rope.prepare_audio_coords(videos, LTX2_AUDIO_FRAMES, torch.device("cpu"))
    embeds = torch.cat([negative, prompt])
    t = torch.tensor(float(timestep)).expand(2 * videos)
    return dict(
        hidden_states=torch.cat([latents] * 2),
        audio_hidden_states=torch.cat([audio] * 2),
        encoder_hidden_states=embeds,
        audio_encoder_hidden_states=embeds,
        timestep=t,
        sigma=t,
        encoder_attention_mask=torch.cat([negative_mask, prompt_mask]),
        audio_encoder_attention_mask=torch.cat([negative_mask, prompt_mask]),
        num_frames=2,
        height=4,
        width=4,
        fps=24.0,
        audio_num_frames=LTX2_AUDIO_FRAMES,
        video_coords=video_coords.repeat((2,) + (1,) * (video_coords.ndim - 1)),
        audio_coords=audio_coords.repeat((2,) + (1,) * (audio_coords.ndim - 1)),
        isolate_modalities=False,
        spatio_temporal_guidance_blocks=None,
        perturbation_mask=None,
        use_cross_timestep=False,
        attention_kwargs=None,
        return_dict=False,
    )


# ----------------------------------------------------------------------------------------------------- MiniMax-H3


def tiny_minimax_h3_transformer(seed: int = 0):
    """MiniMax-H3: one token-refiner layer and one block over the packed ``[text; audio; video]`` sequence, 2 heads
    x 8 (RoPE on 6 of them: 3 axes x 1 frequency x 2), patch (1, 2, 2) over 4 latent channels, audio rows of width
    8, text width 24."""
    from diffusers import MiniMaxH3Transformer3DModel

    model = MiniMaxH3Transformer3DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        hidden_size=16,
        num_layers=1,
        num_refiner_layers=1,
        ffn_dim=32,
        in_channels=4,
        audio_in_channels=8,
        patch_size=(1, 2, 2),
        text_dim=TEXT_DIM,
        freq_dim=16,
        time_embed_hidden_dim=16,
        time_embed_dim=8,
        rope_freq_dim=1,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def minimax_h3_call_kwargs(batch: int = 2, seed: int = 0, timestep: float = 1.0) -> dict:
    """``transformer(**kwargs)`` as the MiniMax-H3 modular pipeline's denoise step calls it (text to video with
    audio, no keyframes), written by hand after ``before_denoise.py`` (the packed-sequence layout): the sequence is
    ``[6 text rows; 6 audio rows (3 latents x 2 channels, channel-major); 32 video rows (2 x 4 x 4)]``, with
    ``video_indices`` / ``audio_indices`` / ``text_indices`` its row positions, ``token_tags`` 0 video, 1 text,
    2 audio, float64 ``position_ids`` ``[44, 3]`` (text on the time axis at its row index, media continuing it),
    one distinct timestep in ``[0, 1]`` (unscaled) and ``timestep_indices`` all 0. The rotary coordinates here are
    a simplified grid (the pipeline's frame clock rescales the time axis)."""
    gen = torch.Generator().manual_seed(86_000 + seed)
    text_rows, audio_latents, audio_channels, frames, grid = TEXT_LEN, 3, 2, 2, 4
    audio_rows, video_rows = audio_latents * audio_channels, frames * grid * grid
    length = text_rows + audio_rows + video_rows
    audio_start, video_start = text_rows, text_rows + audio_rows
    position_ids = torch.zeros(length, 3, dtype=torch.float64)
    position_ids[:text_rows, 0] = torch.arange(text_rows, dtype=torch.float64)
    position_ids[audio_start:video_start, 0] = (text_rows + torch.arange(audio_latents, dtype=torch.float64)).repeat(
        audio_channels
    )
    t, h, w = torch.meshgrid(
        text_rows + torch.arange(frames, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )
    position_ids[video_start:] = torch.stack([t, h, w], dim=-1).reshape(-1, 3)
    tags = torch.empty(length, dtype=torch.long)
    tags[:text_rows], tags[audio_start:video_start], tags[video_start:] = 1, 2, 0
    return dict(
        hidden_states=torch.randn(batch, video_rows, 16, generator=gen),
        audio_hidden_states=torch.randn(batch, audio_rows, 8, generator=gen),
        encoder_hidden_states=torch.randn(batch, text_rows, TEXT_DIM, generator=gen),
        timestep=torch.tensor([float(timestep)]),
        timestep_indices=torch.zeros(length, dtype=torch.long),
        token_tags=tags,
        position_ids=position_ids,
        video_indices=torch.arange(video_start, length),
        audio_indices=torch.arange(audio_start, video_start),
        text_indices=torch.arange(text_rows),
        attention_kwargs=None,
        return_dict=False,
    )


# --------------------------------------------------------------------------------------------------- Kandinsky 6

K6_POOLED_DIM, K6_AUDIO_DIM = 12, 4  # CLIP pooled width; audio latent channels


def tiny_kandinsky6_transformer(seed: int = 0):
    """Kandinsky 6 (TI2VA): one text block per text branch (video, audio), two fused blocks (video self-attention,
    text cross-attention, video-to-audio and audio-to-video cross-attention, feed-forwards), video and audio 2 heads
    x 8 (3-axis RoPE (2, 2, 4)), patch (1, 2, 2) by ``view``/``permute`` and a linear, 9 input channels (4 noisy
    latents, 4 conditioning latents, a mask), 4 output, audio width 4, text width 24, pooled width 12; the released
    checkpoints' flags (``text_token_padding``, ``ca_rope``, ``cross_gates``, ``fix_modulation``) and two visual
    token types (image conditioning)."""
    from diffusers import Kandinsky6Transformer3DModel

    model = Kandinsky6Transformer3DModel(
        in_visual_dim=4,
        out_visual_dim=4,
        in_text_dim=TEXT_DIM,
        in_text_dim2=K6_POOLED_DIM,
        time_dim=16,
        patch_size=(1, 2, 2),
        model_dim=16,
        ff_dim=32,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(2, 2, 4),
        visual_cond=True,
        in_audio_dim=K6_AUDIO_DIM,
        out_audio_dim=K6_AUDIO_DIM,
        text_token_padding=True,
        ca_rope=True,
        cross_gates=True,
        fix_modulation=True,
        visual_token_type_num_embeddings=2,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def _tiny_mmaudio():
    """A one-level ``MMAudioVAE`` (8 mel bins, 4 latent channels) and a one-upsample ``MMAudioVocoder``, never run
    (latent output): ``sample_audio=True`` requires both, and the pipeline reads the audio VAE's sample rate and latent
    hop length (44.1 kHz, 1024 samples per audio latent) to size the audio latents."""
    from diffusers import MMAudioVAE, MMAudioVocoder

    vae = MMAudioVAE(
        mel_bins=8, latent_channels=K6_AUDIO_DIM, hidden_channels=8, channel_multipliers=(1,), layers_per_block=1
    )
    vocoder = MMAudioVocoder(
        num_mels=8,
        upsample_initial_channel=8,
        upsample_rates=(2,),
        upsample_kernel_sizes=(4,),
        resblock_kernel_sizes=(3,),
        resblock_dilation_sizes=((1,),),
    )
    return vae.eval(), vocoder.eval()


def tiny_kandinsky6_pipeline(transformer=None):
    """Kandinsky6TI2VAPipeline with a flow-matching scheduler (shift 5), no video VAE (spatial 8, temporal 4), no
    Qwen2.5-VL or CLIP text encoders and tokenizers, the tiny audio VAE and vocoder of ``_tiny_mmaudio``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky6TI2VAPipeline

    audio_vae, vocoder = _tiny_mmaudio()
    pipe = Kandinsky6TI2VAPipeline(
        transformer=transformer if transformer is not None else tiny_kandinsky6_transformer(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        audio_vae=audio_vae,
        vocoder=vocoder,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def kandinsky6_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 6 tokens with CLIP pooled embeddings and negative ones (guidance 5: two calls per step;
    ``__call__`` takes no text mask with embeddings, so none reaches the transformer), text to video with audio,
    5 frames of 64 px: latents ``[B, 2, 8, 8, 9]`` (channels last), N = 32, and 9 audio latents ``[B, 9, 4]``."""
    gen = torch.Generator().manual_seed(87_000 + seed)
    return dict(
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        pooled_prompt_embeds=torch.randn(batch, K6_POOLED_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_pooled_prompt_embeds=torch.randn(batch, K6_POOLED_DIM, generator=gen),
        height=64,
        width=64,
        num_frames=5,
        guidance_scale=5.0,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def kandinsky6_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``Kandinsky6TI2VAPipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_kandinsky6_pipeline(), kandinsky6_pipeline_kwargs(batch, steps=4, seed=seed))


# ------------------------------------------------------------------------------------------------ Kandinsky 6 SR


def tiny_kandinsky6_sr_transformer(seed: int = 0):
    """Kandinsky 6 SR: two blocks (NABLA sparse self-attention through flex attention, feed-forward) of 2 heads x 8
    (3-axis RoPE (2, 2, 4)), patch (1, 1, 1), 9 input channels (4 noisy latents, 4 anchor latents, an anchor mask),
    4 output, one 128 px tile size (8 x 8 latents at the K-VAE's factor 16: one 64-token NABLA block)."""
    from diffusers import Kandinsky6SRTransformer3DModel

    model = Kandinsky6SRTransformer3DModel(
        in_visual_dim=4,
        out_visual_dim=4,
        time_dim=16,
        patch_size=(1, 1, 1),
        model_dim=16,
        ff_dim=32,
        num_visual_blocks=2,
        axes_dims=(2, 2, 4),
        tile_sizes=((128, 128),),
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def kandinsky6_sr_call_kwargs(batch: int = 2, seed: int = 0, timestep: float = 1000.0) -> dict:
    """``transformer(**kwargs)`` as ``Kandinsky6SRPipeline`` calls it at its first step, written by hand: the
    pipeline needs the K-VAE (``Kandinsky6SRVAE``) to encode the low-resolution tiles and to decode them (it has no
    latent output). Follows its ``__call__`` (steps 4-5) without a latent upscaler, ``tiles_batch_size = batch``:
    one latent frame of 8 x 8 per tile (the NABLA grid needs multiples of 8), the low-resolution latents mixed with
    noise, ``sqrt(1 - 0.7^2) * lq + 0.7 * noise`` (``lq_noise_scale``), joined on channels with zero anchor latents
    and a zero anchor mask: ``[B, 1, 8, 8, 9]`` (channels last), N = 64; ``timestep`` = ``t`` expanded to the tiles
    (1000 at the first step of a ``FlowMatchEulerDiscreteScheduler``). No text, no guidance: one call per step."""
    gen = torch.Generator().manual_seed(88_000 + seed)
    low_res = torch.randn(batch, 1, 8, 8, 4, generator=gen)
    noise = torch.randn(batch, 1, 8, 8, 4, generator=gen)
    latents = (1 - 0.7**2) ** 0.5 * low_res + 0.7 * noise
    anchor_mask = torch.zeros(batch, 1, 8, 8, 1)
    return dict(
        hidden_states=torch.cat([latents, torch.zeros_like(latents), anchor_mask], dim=-1),
        timestep=torch.tensor(float(timestep)).expand(batch),
        return_dict=False,
    )
