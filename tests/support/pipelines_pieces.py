"""Tiny, download-free diffusers pipelines around two of the "pieces" transformers of :mod:`models_pieces`.

No text encoder, tokenizer or processor (prompt embeddings and masks passed in), ``output_type="latent"`` (the VAE
never runs), a flow-matching scheduler built in code, the progress bar off.  Sizes give the latents of
``models_pieces.*_call_kwargs`` and prompt embeddings of the widths the tiny transformers read.

How each pipeline calls its transformer per denoising step (diffusers 0.42), both with classifier-free guidance:

================  ===================================================================================
fibo2             twice: prompt, then negative prompt (a second pass, not a batch of 2);
                  ``guidance_scale`` 5, the pipeline's default
hunyuan_video15   twice with ``ClassifierFreeGuidance(guidance_scale=6)``: cond, then uncond
================  ===================================================================================
"""

from __future__ import annotations

import torch

from tests.support.models_pieces import _gen, _padded_mask

FIBO2_PIXELS = 128  # VAE factor 8 with no VAE: 16x16 latents, 8x8 patches of 2 (N = 64)
FIBO2_TEXT_LEN = 6

HV15_PIXELS = 32  # tiny VAE: spatial factor 4 -> 8x8 latents
HV15_FRAMES = 3  # temporal factor 2 -> 2 latent frames (N = 2 * 8 * 8 = 128)
HV15_TEXT_LEN, HV15_TEXT_DIM = 6, 24
HV15_GLYPH_LEN, HV15_GLYPH_DIM = 4, 12
HV15_IMAGE_TOKENS = 4  # the pipeline's 729 SigLIP slots (all zeros and masked out in text to video), cut to 4


def tiny_fibo2_pipeline(transformer=None):
    """BriaFibo2Pipeline with the tiny transformer, a flow-matching scheduler with resolution-dependent shift (the
    pipeline passes ``mu``), no VAE (the pipeline then assumes factor 8), no Qwen3-VL / processor.  Guidance is a
    second transformer pass per step with the negative embeddings."""
    from diffusers import BriaFibo2Pipeline, FlowMatchEulerDiscreteScheduler

    from tests.support.models_pieces import tiny_fibo2_transformer

    pipe = BriaFibo2Pipeline(
        transformer=transformer if transformer is not None else tiny_fibo2_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=None,
        text_encoder=None,
        processor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fibo2_pipeline_kwargs(batch: int = 1, steps: int = 6, seed: int = 0) -> dict:
    """``batch`` prompts: embeddings ``[batch, 2, 6, 16]`` (Perceiver bundle + one injection bundle) with bool masks
    (prompt: the last row valid up to 4 tokens, as ``fibo2_call_kwargs``; negative: 3 valid tokens per row, a short
    null caption), so neither mask is all-true and dropped to ``None``.  128x128 pixels (16x16 latents, N = 64),
    ``guidance_scale=5``.  Returns latents ``[batch, 4, 16, 16]``."""
    gen = _gen(11, seed)
    negative_mask = torch.zeros(batch, FIBO2_TEXT_LEN, dtype=torch.bool)
    negative_mask[:, :3] = True
    return dict(
        prompt_embeds=torch.randn(batch, 2, FIBO2_TEXT_LEN, 16, generator=gen),
        prompt_embeds_mask=_padded_mask(batch, FIBO2_TEXT_LEN, 4),
        negative_prompt_embeds=torch.randn(batch, 2, FIBO2_TEXT_LEN, 16, generator=gen),
        negative_prompt_embeds_mask=negative_mask,
        height=FIBO2_PIXELS,
        width=FIBO2_PIXELS,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def tiny_hunyuan_video15_pipeline(transformer=None):
    """HunyuanVideo15Pipeline (text to video) with the tiny transformer, a flow-matching scheduler (shift 7), no
    Qwen2.5-VL / ByT5 and ``ClassifierFreeGuidance(guidance_scale=6)``: the transformer is called once per branch
    (cond, then uncond) per step.  The constructor reads ``vae.config.latent_channels`` and the compression ratios,
    so a tiny ``AutoencoderKLHunyuanVideo15`` (4 latent channels, factors 4 spatial / 2 temporal, never run) is
    built; the zero image embeddings are cut from 729 to 4 tokens as in ``hunyuan_video15_call_kwargs``."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance

    from tests.support.models_pieces import tiny_hunyuan_video15_transformer

    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4,
        block_out_channels=(8, 8),  # (4, 4) gives an empty downsampling conv
        layers_per_block=1,
        spatial_compression_ratio=4,
        temporal_compression_ratio=2,
        downsample_match_channel=False,
        upsample_match_channel=False,
    )
    pipe = HunyuanVideo15Pipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_hunyuan_video15_transformer(),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=None,
        tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    pipe.vision_num_semantic_tokens = HV15_IMAGE_TOKENS
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_video15_pipeline_kwargs(batch: int = 1, steps: int = 6, seed: int = 0) -> dict:
    """``batch`` prompts: Qwen embeddings ``[batch, 6, 24]`` + int64 masks (prompt: the last row valid up to 4
    tokens; negative: 3 valid), ByT5 glyph embeddings ``[batch, 4, 12]`` (prompt row 0: 3 glyph tokens; negatives:
    none, zeros, as the pipeline encodes a prompt without quoted text), 32x32 pixels x 3 frames (2 latent frames of
    8x8, N = 128).  The pipeline casts the masks to the transformer's dtype (float32).  Returns latents
    ``[batch, 4, 2, 8, 8]``."""
    gen = _gen(12, seed)
    negative_mask = torch.zeros(batch, HV15_TEXT_LEN, dtype=torch.int64)
    negative_mask[:, :3] = 1
    glyph_mask = torch.zeros(batch, HV15_GLYPH_LEN, dtype=torch.int64)
    glyph_mask[0, :3] = 1
    glyph = torch.randn(batch, HV15_GLYPH_LEN, HV15_GLYPH_DIM, generator=gen)
    glyph[1:] = 0
    return dict(
        prompt_embeds=torch.randn(batch, HV15_TEXT_LEN, HV15_TEXT_DIM, generator=gen),
        prompt_embeds_mask=_padded_mask(batch, HV15_TEXT_LEN, 4, dtype=torch.int64),
        negative_prompt_embeds=torch.randn(batch, HV15_TEXT_LEN, HV15_TEXT_DIM, generator=gen),
        negative_prompt_embeds_mask=negative_mask,
        prompt_embeds_2=glyph,
        prompt_embeds_mask_2=glyph_mask,
        negative_prompt_embeds_2=torch.zeros(batch, HV15_GLYPH_LEN, HV15_GLYPH_DIM),
        negative_prompt_embeds_mask_2=torch.zeros(batch, HV15_GLYPH_LEN, dtype=torch.int64),
        height=HV15_PIXELS,
        width=HV15_PIXELS,
        num_frames=HV15_FRAMES,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def tiny_qwen_image21_pipeline(transformer=None):
    """QwenImage21Pipeline with the tiny transformer, a flow-matching scheduler with resolution-dependent shift, no
    VAE, no Qwen3-VL / processor. With ``causal_condition`` (the default) the pipeline prefills the text keys and
    values into its own per-block cache on the first step (``kv_cache_mode="extract"``) and then runs only the image
    rows through the blocks (``"cached"``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    from tests.support.models_pieces import tiny_qwen_image21_transformer

    pipe = QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=None,
        text_encoder=None,
        processor=_NoProcessor(),
        transformer=transformer if transformer is not None else tiny_qwen_image21_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _NoProcessor:
    """What ``QwenImage21Pipeline.__init__`` asks of its Qwen3-VL processor (the system prompt's token count, the
    image-pad token id) without the download; the tests pass prompt embeddings, so it tokenizes nothing else."""

    class tokenizer:  # noqa: N801 - the attribute the pipeline reads
        @staticmethod
        def encode(text):
            return [0]

    @staticmethod
    def apply_chat_template(messages, tokenize=True, return_dict=False):
        return [[0] * 8]


def qwen_image21_pipeline_kwargs(batch: int = 1, steps: int = 6, seed: int = 0, use_kv_cache: bool = True) -> dict:
    """``batch`` prompts of 6 tokens (width 24; the last row valid up to 4) with a negative prompt of 3 valid tokens
    and ``true_cfg_scale=4`` (two transformer calls per step), 128x128 pixels (8x8 packed latents, N = 64, the VAE
    factor 16). Returns packed latents ``[batch, 64, 16]``."""
    embeds, mask, negative_embeds, negative_mask = _prompts(batch, 24, torch.bool, 61_000 + seed)
    return dict(
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=negative_embeds,
        negative_prompt_embeds_mask=negative_mask,
        true_cfg_scale=4.0,
        height=128,
        width=128,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
        use_kv_cache=use_kv_cache,
    )


def tiny_mochi_pipeline(transformer=None):
    """MochiPipeline with the tiny transformer, a flow-matching scheduler, no VAE, no T5. Guidance is batched: one
    transformer call per step over the negative and positive prompts."""
    from diffusers import FlowMatchEulerDiscreteScheduler, MochiPipeline

    from tests.support.models_pieces import tiny_mochi_transformer

    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_mochi_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mochi_pipeline_kwargs(batch: int = 1, steps: int = 6, seed: int = 0) -> dict:
    """``batch`` prompts of 6 tokens (width 16; the last row valid up to 4), a negative prompt of 3 valid tokens,
    ``guidance_scale=4.5``; 7 frames of 64x64 pixels (2 latent frames of 8x8, N = 32). Returns latents
    ``[batch, 4, 2, 8, 8]``."""
    embeds, mask, negative_embeds, negative_mask = _prompts(batch, 16, torch.long, 62_000 + seed)
    return dict(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative_embeds,
        negative_prompt_attention_mask=negative_mask,
        guidance_scale=4.5,
        num_frames=7,
        height=64,
        width=64,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def _prompts(batch: int, width: int, mask_dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    """Prompt and negative-prompt embeddings ``[batch, 6, width]`` with their masks: the prompt's last row valid up
    to 4 tokens, the negative prompt 3 valid tokens per row."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 6, dtype=mask_dtype)
    mask[-1, 4:] = 0
    negative_mask = torch.zeros(batch, 6, dtype=mask_dtype)
    negative_mask[:, :3] = 1
    embeds = torch.randn(batch, 6, width, generator=gen)
    return embeds, mask, torch.randn(batch, 6, width, generator=gen), negative_mask
