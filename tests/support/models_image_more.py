"""Tiny, seeded, download-free image DiTs of diffusers' newest classes: FLUX.3, LongCat-Image, Bria FIBO,
NucleusMoE-Image, Krea 2 (RAS), DreamLite, GLM-Image, OmniGen, JoyImage-Edit and JoyImage-Edit-Plus (dense).

Conventions as :mod:`models_image_newer`: one or two blocks, 2 heads x 8 (hidden 16), N = 64 image tokens (128 px,
no VAE), parameters re-drawn with ``_reinit_``. The call kwargs are read from the real pipeline's first transformer
call (``capture.transformer_call_kwargs``) where the pipeline runs download-free, else written by hand after the
pipeline's source (DreamLite, OmniGen).

FLUX.3 has only a modular pipeline: its text-to-image core (``Flux3CoreDenoiseStep``) with
``ClassifierFreeGuidance`` calls the transformer once per guidance branch (positive, then negative), with
``t / 1000``, float ``img_ids`` ``[N, 4]`` and ``txt_ids`` ``[L, 4]``, packed latents ``[B, N, C]``, no text mask.
LongCat-Image: one call per branch (positive, then negative), ``t / 1000``, float ids ``[L, 3]`` and ``[N, 3]``;
its ``encode_prompt`` reads ``len(prompt)`` even when handed embeddings, so the tiny pipeline is a subclass whose
``encode_prompt`` takes the batch from the embeddings. Bria FIBO batches guidance ([negative; positive] rows),
passes ``t`` (1000 at sigma 1), a list of per-block text-encoder layers and, when prompts are padded, a boolean key
mask ``[B, 1, 1, L + N]`` in ``joint_attention_kwargs``; it takes prompt strings only, so a one-layer SmolLM3 and a
word-level tokenizer are built. NucleusMoE-Image: one call per branch, ``t / 1000``, int64 text masks,
``img_shapes``; image queries only (text gives keys and values). Krea 2: one call per branch (guidance
``cond + s * (cond - uncond)``), ``t / 1000``, text ``[B, L, layers, C]`` with a boolean mask, ``position_ids``
``[L + N, 3]``. DreamLite's transformer runs inside a UNet's blocks on ``[B, C, H, W]`` feature maps (guidance
batched by the UNet). GLM-Image: one call per branch, ``t - 1`` (999 at sigma 1), prior tokens per image patch
(all dropped in the negative branch). OmniGen batches guidance ([cond; uncond]), passes ``t`` and a ``[B, S, S]``
mask over [text; time; image].
JoyImage-Edit: one call per branch (positive, then negative; the guided prediction rescaled to the positive one's
norm), ``t`` (1000 at sigma 1), no text mask; 6-D latents ``[B, items, C, T, H, W]``, the VAE-encoded reference image
first and the target last: the transformer moves the target to the front and folds the items into frames, so its
tokens are ``[target; reference]`` (N = 64 + 64 here), its joint attention ``[image; text]``; the pipeline overwrites
the reference item after every step. JoyImage-Edit-Plus batches guidance ([negative; positive] rows), ``t``, latents
pre-patchified by the pipeline, ``[B, P, C, 1, 2, 2]``: the target's patches first, then each reference image's
(each its own size), zero padding to the longest row; a Python ``shape_list`` per row (RoPE per image, its frame
index the image's place) and a boolean key mask ``[B, 1, 1, P + L]`` over ``[patches; text]``. Both pipelines encode
their references with a tiny Wan VAE and snap sizes to 1024 px buckets, so the tiny ones keep 128 px.
"""

from __future__ import annotations

import torch

from tests.support.capture import transformer_call_kwargs
from tests.support.models import _reinit_

HEADS, HEAD_DIM, TEXT_DIM, TEXT_LEN = 2, 8, 24, 5
PIXELS = 128  # no VAE: scale 8, packed 2x2 -> 8x8 = 64 tokens


def _gen(offset: int, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(offset + seed)


def _word_tokenizer(words):
    """A whitespace word-level tokenizer of ``words`` (ids 0 and 1: padding and unknown; everything else, such as a
    chat template's markers, is unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


def _padded_mask(batch: int, length: int, valid: int, dtype=torch.int64) -> torch.Tensor:
    """All ``length`` tokens valid, but the last row's only ``valid``."""
    mask = torch.ones(batch, length, dtype=dtype)
    mask[-1, valid:] = 0
    return mask


def _short_mask(batch: int, length: int, valid: int, dtype=torch.int64) -> torch.Tensor:
    """The first ``valid`` of ``length`` tokens valid in every row (a short negative prompt)."""
    mask = torch.zeros(batch, length, dtype=dtype)
    mask[:, :valid] = 1
    return mask


# FLUX.3 ------------------------------------------------------------------------------------------------------------


def tiny_flux3_transformer(seed: int = 0):
    """FLUX.3: one per-mode block (image, reference image, text) and one joint single block, 4-axis RoPE (2, 2, 2,
    2), 16 packed channels, 16 sinusoidal timestep channels."""
    from diffusers import Flux3Transformer2DModel

    model = Flux3Transformer2DModel(
        in_channels=16,
        cond_in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        timestep_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_flux3_pipeline(transformer=None):
    """FLUX.3's modular text-to-image core (``Flux3CoreDenoiseStep``: inputs, latents, timesteps, text RoPE ids,
    denoise loop, unpack) with the tiny transformer, ``FlowMatchEulerDiscreteScheduler(shift=6.93)`` (the blocks'
    default) and ``ClassifierFreeGuidance(guidance_scale=4)``; no VAE, no Qwen3-VL. It returns the latents of
    ``output="latents"``: ``[B, 16, 8, 8]``."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines.flux3.modular_blocks_flux3 import Flux3CoreDenoiseStep

    pipe = Flux3CoreDenoiseStep().init_pipeline()
    pipe.update_components(
        transformer=transformer if transformer is not None else tiny_flux3_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=6.93),
        guider=ClassifierFreeGuidance(guidance_scale=4.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux3_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens and their negative prompts (two calls per step), 128 px: N = 64."""
    gen = _gen(80_000, seed)
    return dict(
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        height=PIXELS,
        width=PIXELS,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output="latents",
    )


def flux3_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of FLUX.3's modular pipeline for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_flux3_pipeline(), flux3_pipeline_kwargs(batch, steps=4, seed=seed))


# LongCat-Image -----------------------------------------------------------------------------------------------------


def tiny_longcat_image_transformer(seed: int = 0):
    """LongCat-Image: one double-stream and one single-stream block, 3-axis RoPE (2, 2, 4), 64 packed channels (the
    pipeline packs 16 latent channels 2x2)."""
    from diffusers import LongCatImageTransformer2DModel

    model = LongCatImageTransformer2DModel(
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=[2, 2, 4],
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def _longcat_image_pipeline_class():
    from diffusers import LongCatImagePipeline

    class _LongCatImagePipeline(LongCatImagePipeline):
        """``LongCatImagePipeline.encode_prompt`` takes its batch from ``len(prompt)`` even when handed
        ``prompt_embeds`` (``prompt`` is ``None`` then, and the negative prompt ``""``); here the batch comes from
        the embeddings. Nothing else changes."""

        def encode_prompt(self, prompt=None, num_images_per_prompt=1, prompt_embeds=None):
            if prompt_embeds is not None:
                prompt = [""] * prompt_embeds.shape[0]
            return super().encode_prompt(prompt, num_images_per_prompt, prompt_embeds)

    return _LongCatImagePipeline


def tiny_longcat_image_pipeline(transformer=None):
    """LongCatImagePipeline (see ``_longcat_image_pipeline_class``) with a flow-matching scheduler, no VAE (scale 8),
    no Qwen2.5-VL text encoder, tokenizer or processor."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = _longcat_image_pipeline_class()(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_processor=None,
        transformer=transformer if transformer is not None else tiny_longcat_image_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def longcat_image_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens and their negative prompts (guidance 4.5: two calls per step, CFG renorm on),
    128 px: N = 64; no prompt rewrite (it runs the text encoder)."""
    gen = _gen(81_000, seed)
    return dict(
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        guidance_scale=4.5,
        height=PIXELS,
        width=PIXELS,
        num_inference_steps=steps,
        enable_prompt_rewrite=False,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def longcat_image_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``LongCatImagePipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(
        tiny_longcat_image_pipeline(), longcat_image_pipeline_kwargs(batch, steps=4, seed=seed)
    )


# Bria FIBO ---------------------------------------------------------------------------------------------------------

FIBO_TEXT_HIDDEN = 12  # the SmolLM3 width: prompt embeddings are its last two layers joined (24 wide)
FIBO_WORDS = ("a", "red", "cube", "on", "blue", "table", "blurry", "dark")


def tiny_bria_fibo_transformer(seed: int = 0):
    """Bria FIBO: one double-stream and one single-stream block, 3-axis RoPE (2, 2, 4), 16 latent channels (no
    patching); text width 24 (two SmolLM3 layers of 12 joined) and one caption projection of a text-encoder layer
    per block."""
    from diffusers import BriaFiboTransformer2DModel

    model = BriaFiboTransformer2DModel(
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=2 * FIBO_TEXT_HIDDEN,
        axes_dims_rope=[2, 2, 4],
        text_encoder_dim=FIBO_TEXT_HIDDEN,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def _tiny_fibo_text_encoder():
    """A one-layer SmolLM3 (width 12) and the word-level tokenizer of ``FIBO_WORDS``: ``BriaFiboPipeline``
    takes no prompt embeddings, it encodes prompt strings (the text encoder's last two hidden states, and every
    layer's for the per-block caption projections)."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    tokenizer = _word_tokenizer(FIBO_WORDS)
    config = SmolLM3Config(
        vocab_size=len(tokenizer),
        hidden_size=FIBO_TEXT_HIDDEN,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    text_encoder = _reinit_(SmolLM3ForCausalLM(config), 1, std=0.3).eval()
    return text_encoder, tokenizer


def tiny_bria_fibo_pipeline(transformer=None):
    """BriaFiboPipeline with a flow-matching scheduler (resolution-dependent shift: the pipeline passes ``mu``), no
    VAE (the pipeline fixes scale 16), the tiny SmolLM3 and tokenizer of ``_tiny_fibo_text_encoder``."""
    from diffusers import BriaFiboPipeline, FlowMatchEulerDiscreteScheduler

    text_encoder, tokenizer = _tiny_fibo_text_encoder()
    pipe = BriaFiboPipeline(
        transformer=transformer if transformer is not None else tiny_bria_fibo_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bria_fibo_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 and 3 words in turn and negative prompts of 2 words (guidance 5, the pipeline's default,
    batched): the shorter ones padded, so the pipeline passes a boolean key mask; 128 px: 8x8 = 64 tokens."""
    prompts = ["a red cube on table", "a blue table"]
    return dict(
        prompt=[prompts[i % 2] for i in range(batch)],
        negative_prompt=["blurry dark"] * batch,
        guidance_scale=5.0,
        height=PIXELS,
        width=PIXELS,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def bria_fibo_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``BriaFiboPipeline``: ``batch`` rows, the negative and positive halves of
    ``batch // 2`` prompts."""
    return transformer_call_kwargs(
        tiny_bria_fibo_pipeline(), bria_fibo_pipeline_kwargs(max(1, batch // 2), steps=4, seed=seed)
    )


# NucleusMoE-Image --------------------------------------------------------------------------------------------------


def tiny_nucleusmoe_image_transformer(seed: int = 0, moe: bool = True):
    """NucleusMoE-Image: two blocks, the second a mixture of 4 experts with expert-choice routing (the checkpoint's
    ``leave_first_three_and_last_block_dense`` keeps its middle blocks MoE; ``moe=False``: both dense), patch 2,
    16 packed channels (4 latent channels), 3-axis RoPE (2, 2, 4), one key/value head (grouped-query attention as
    the checkpoint)."""
    from diffusers import NucleusMoEImageTransformer2DModel

    model = NucleusMoEImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,  # per patch pixel: proj_out gives 2 * 2 * 4 = 16, the packed width, as the checkpoint's
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(2, 2, 4),
        moe_enabled=moe,
        dense_moe_strategy="leave_first_block_dense",
        num_experts=4,
        moe_intermediate_dim=16,
        capacity_factors=2.0,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_nucleusmoe_image_pipeline(transformer=None):
    """NucleusMoEImagePipeline with a flow-matching scheduler, no VAE (scale 8), no Qwen3-VL or processor."""
    from diffusers import FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline

    pipe = NucleusMoEImagePipeline(
        transformer=transformer if transformer is not None else tiny_nucleusmoe_image_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        processor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def nucleusmoe_image_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens (the last row 4 valid) and negative prompts of 3 valid tokens, int64 masks as the
    Qwen3-VL processor's (guidance 4: two calls per step), 128 px: 8x8 = 64 tokens of 2x2 patches."""
    gen = _gen(83_000, seed)
    return dict(
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        prompt_embeds_mask=_padded_mask(batch, TEXT_LEN, 4),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_embeds_mask=_short_mask(batch, TEXT_LEN, 3),
        guidance_scale=4.0,
        height=PIXELS,
        width=PIXELS,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def nucleusmoe_image_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``NucleusMoEImagePipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(
        tiny_nucleusmoe_image_pipeline(), nucleusmoe_image_pipeline_kwargs(batch, steps=4, seed=seed)
    )


# Krea 2 ------------------------------------------------------------------------------------------------------------

KREA2_TEXT_LAYERS, KREA2_TEXT_DIM = 3, 24


def tiny_krea2_transformer(seed: int = 0):
    """Krea 2: two blocks of hidden 16 (2 query heads x 8, one key/value head), 16 packed channels, 3-axis RoPE
    (2, 2, 4); a text fusion of one layer-wise and one refiner block over 3 tapped text layers of width 24."""
    from diffusers import Krea2Transformer2DModel

    model = Krea2Transformer2DModel(
        in_channels=16,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        intermediate_size=32,
        timestep_embed_dim=16,
        text_hidden_dim=KREA2_TEXT_DIM,
        num_text_layers=KREA2_TEXT_LAYERS,
        text_num_attention_heads=2,
        text_num_key_value_heads=2,
        text_intermediate_size=32,
        num_layerwise_text_blocks=1,
        num_refiner_text_blocks=1,
        axes_dims_rope=(2, 2, 4),
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_krea2_pipeline(transformer=None):
    """Krea2Pipeline with a flow-matching scheduler (resolution-dependent shift: the pipeline passes ``mu``), no VAE
    (scale 8), no Qwen3-VL or tokenizer; patch 2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    pipe = Krea2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_krea2_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def krea2_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens x 3 tapped layers (the last row 4 valid) and negative prompts of 3 valid tokens,
    boolean masks as the pipeline's own (guidance 4: two calls per step), 128 px: 8x8 = 64 tokens of 2x2 patches."""
    gen = _gen(84_000, seed)
    shape = (batch, TEXT_LEN, KREA2_TEXT_LAYERS, KREA2_TEXT_DIM)
    return dict(
        prompt_embeds=torch.randn(shape, generator=gen),
        prompt_embeds_mask=_padded_mask(batch, TEXT_LEN, 4, torch.bool),
        negative_prompt_embeds=torch.randn(shape, generator=gen),
        negative_prompt_embeds_mask=_short_mask(batch, TEXT_LEN, 3, torch.bool),
        guidance_scale=4.0,
        height=PIXELS,
        width=PIXELS,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def krea2_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``Krea2Pipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_krea2_pipeline(), krea2_pipeline_kwargs(batch, steps=4, seed=seed))


# DreamLite ---------------------------------------------------------------------------------------------------------


def tiny_dreamlite_transformer(seed: int = 0):
    """DreamLite's transformer: one block of 2 heads x 8 (RMS q/k norm, feed-forward x6 as ``DreamLiteUNetModel``'s
    defaults), group norm of 8 groups and 1x1 convolutions in and out, 16 channels, text
    width 24."""
    from diffusers import DreamLiteTransformer2DModel

    model = DreamLiteTransformer2DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=HEADS * HEAD_DIM,
        num_layers=1,
        norm_num_groups=8,
        cross_attention_dim=TEXT_DIM,
        qk_norm="rms_norm",
        num_kv_heads=HEADS,  # the UNet's default is 1: diffusers' RMS q/k norm then fails on the narrower keys
        ff_mult=6,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def dreamlite_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """By hand: ``DreamLitePipeline`` runs a ``DreamLiteUNetModel`` whose cross-attention down/mid/up blocks call this
    transformer on their feature maps (unet_dreamlite.py, ``attn(hidden_states, encoder_hidden_states=...,
    cross_attention_kwargs=..., attention_mask=..., encoder_attention_mask=..., return_dict=False)``): an 8x8 map of
    16 channels (N = 64), the text embeddings and the pipeline's text mask (the last row 4 of 5 tokens valid); no
    timestep reaches it (layer norms). The pipeline batches guidance ([uncond; cond] rows)."""
    gen = _gen(85_000, seed)
    return dict(
        hidden_states=torch.randn(batch, HEADS * HEAD_DIM, 8, 8, generator=gen),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        cross_attention_kwargs=None,
        attention_mask=None,
        encoder_attention_mask=_padded_mask(batch, TEXT_LEN, 4, torch.bool),
        return_dict=False,
    )


# GLM-Image ---------------------------------------------------------------------------------------------------------

GLM_CODEBOOK = 32


def tiny_glm_image_transformer(seed: int = 0):
    """GLM-Image: two blocks of 2 heads x 8, patch 2, 4 latent channels, glyph width 24, a prior-token codebook of
    32."""
    from diffusers import GlmImageTransformer2DModel

    model = GlmImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        text_embed_dim=TEXT_DIM,
        time_embed_dim=16,
        condition_dim=8,
        prior_vq_quantizer_codebook_size=GLM_CODEBOOK,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_glm_image_pipeline(transformer=None):
    """GlmImagePipeline with a flow-matching scheduler, no VAE (scale 8), no ByT5 glyph encoder, no GLM
    vision-language model (the prior tokens are passed in)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline

    pipe = GlmImagePipeline(
        tokenizer=None,
        processor=None,
        text_encoder=None,
        vision_language_encoder=None,
        vae=None,
        transformer=transformer if transformer is not None else tiny_glm_image_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def glm_image_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` glyph embeddings of 5 tokens and negative ones, prior tokens of the 8x8 patch grid (as the
    vision-language model's, upsampled 2x), guidance 1.5 (the default: two calls per step), 128 px: N = 64."""
    gen = _gen(86_000, seed)
    return dict(
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        prior_token_ids=torch.randint(0, GLM_CODEBOOK, (batch, 4, 4), generator=gen)
        .repeat_interleave(2, 1)
        .repeat_interleave(2, 2)
        .flatten(1),
        height=PIXELS,
        width=PIXELS,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def glm_image_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``GlmImagePipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_glm_image_pipeline(), glm_image_pipeline_kwargs(batch, steps=4, seed=seed))


# OmniGen -----------------------------------------------------------------------------------------------------------

OMNIGEN_WORDS = ("a", "red", "cube", "on", "blue", "table")


def tiny_omnigen_transformer(seed: int = 0):
    """OmniGen: two Phi-3 layers of hidden 16 (2 heads x 8), patch 2, 4 latent channels, a vocabulary of 16 (the
    tiny tokenizer's words), unit RoPE scaling factors."""
    from diffusers import OmniGenTransformer2DModel

    model = OmniGenTransformer2DModel(
        in_channels=4,
        patch_size=2,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        intermediate_size=32,
        num_layers=2,
        pad_token_id=0,
        vocab_size=16,
        rope_scaling={"short_factor": [1.0] * (HEAD_DIM // 2), "long_factor": [1.0] * (HEAD_DIM // 2)},
        pos_embed_max_size=16,
        time_step_dim=16,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def omnigen_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """By hand: ``OmniGenPipeline`` cannot be built here (it imports its processor only with torchvision), so this
    follows its ``__call__`` for text to image (pipeline_omnigen.py, steps 3-8): the processor
    (``OmniGenMultiModalProcessor``, its text parts) tokenizes each prompt and the default negative
    prompt with the word-level tokenizer of ``_word_tokenizer`` and builds ``input_ids``, the causal/bidirectional
    ``attention_mask`` ``[B, S, S]`` and ``position_ids``; no input image (``input_img_latents=[]``,
    ``input_image_sizes={}``); the latents are repeated for guidance ([cond; uncond] rows, one call per step) and
    the scheduler's first timestep (1000 for the default ``FlowMatchEulerDiscreteScheduler``) expanded to them.
    ``batch`` rows: ``batch // 2`` prompts, 128 px: N = 64."""
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator, OmniGenMultiModalProcessor

    prompts = ["a red cube on a blue table", "a blue cube"]
    rows = max(1, batch // 2)
    # its __init__ builds torchvision image transforms (unused without input images): set its text parts only
    processor = OmniGenMultiModalProcessor.__new__(OmniGenMultiModalProcessor)
    processor.text_tokenizer, processor.max_image_size = _word_tokenizer(OMNIGEN_WORDS), 1024
    processor.collator = OmniGenCollator()
    data = processor([prompts[i % 2] for i in range(rows)], None, height=PIXELS, width=PIXELS, use_img_cfg=False)
    latents = torch.randn(rows, 4, PIXELS // 8, PIXELS // 8, generator=_gen(87_000, seed))
    latents = torch.cat([latents] * 2)
    return dict(
        hidden_states=latents,
        timestep=torch.full((latents.shape[0],), 1000.0),
        input_ids=data["input_ids"],
        input_img_latents=[],
        input_image_sizes=data["input_image_sizes"],
        attention_mask=data["attention_mask"],
        position_ids=data["position_ids"],
        return_dict=False,
    )


# JoyImage-Edit -----------------------------------------------------------------------------------------------------

JOYIMAGE_CHANNELS = 4  # latent channels of the tiny Wan VAE (= the transformers' in_channels)


def tiny_joyimage_edit_transformer(seed: int = 0):
    """JoyImage-Edit: two double-stream blocks of hidden 16 (2 heads x 8; fused q/k/v per stream, RMS q/k norm, joint
    ``[image; text]`` attention), a ``Conv3d`` patch embedding (1, 2, 2), 4 latent channels, 3-axis RoPE (2, 2, 4)
    over the image tokens only, text width 24."""
    from diffusers import JoyImageEditTransformer3DModel

    model = JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2],
        in_channels=JOYIMAGE_CHANNELS,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        text_dim=TEXT_DIM,
        mlp_width_ratio=2.0,
        num_layers=2,
        rope_dim_list=[2, 2, 4],
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def _tiny_joyimage_vae():
    """A tiny ``AutoencoderKLWan`` (the JoyImage pipelines encode their reference images with it): base width 3, one
    residual block per level, factors 8 (spatial) and 4 (temporal), 4 latent channels, latents neither shifted nor
    scaled; diffusers' default initialisation under a fixed seed (it encodes the references: the same VAE on every
    build)."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=JOYIMAGE_CHANNELS,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * JOYIMAGE_CHANNELS,
            latents_std=[1.0] * JOYIMAGE_CHANNELS,
        )
    return vae.eval()


def _joyimage_image_processor(vae_scale_factor: int):
    """``JoyImageEditImageProcessor`` snaps every output and reference size to a bucket of its only base size, 1024
    (512 px a side at least: thousands of tokens); this one keeps the requested size, or the image's rounded down to
    the VAE factor. Its crop and preprocessing are the real ones."""
    from diffusers.pipelines.joyimage.image_processor import JoyImageEditImageProcessor

    class _UnbucketedProcessor(JoyImageEditImageProcessor):
        def get_default_height_width(self, image, height=None, width=None):
            if height is not None and width is not None:
                return height, width
            w, h = (image[0] if isinstance(image, list) else image).size
            factor = self.config.vae_scale_factor
            return h // factor * factor, w // factor * factor

    return _UnbucketedProcessor(vae_scale_factor=vae_scale_factor)


def _joyimage_image(size: int, seed: int):
    """A seeded random RGB image of ``size`` x ``size`` pixels (PIL)."""
    import numpy as np
    import PIL.Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def tiny_joyimage_edit_pipeline(transformer=None):
    """JoyImageEditPipeline with a flow-matching scheduler, the tiny Wan VAE (it encodes the reference image), no
    Qwen3-VL text encoder, tokenizer or processor, and the unbucketed image processor of ``_joyimage_image_processor``.
    A subclass seeds ``prepare_latents``: the reference latents are drawn from the VAE posterior with the global RNG
    (``latent_dist.sample()`` without the generator), here the same on every call; nothing else changes."""
    from diffusers import FlowMatchEulerDiscreteScheduler, JoyImageEditPipeline

    class _JoyImageEditPipeline(JoyImageEditPipeline):
        def prepare_latents(self, *args, **kwargs):
            with torch.random.fork_rng():
                torch.manual_seed(0)
                return super().prepare_latents(*args, **kwargs)

    pipe = _JoyImageEditPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_joyimage_vae(),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_joyimage_edit_transformer(),
        processor=None,
    )
    pipe.vae_image_processor = _joyimage_image_processor(pipe.vae_scale_factor_spatial)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def joyimage_edit_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens and their negative prompts (int64 masks, which the transformer never gets;
    guidance 4: two calls per step, the guided prediction rescaled to the positive one's norm), one 128 px reference
    image, 128 px output: latents ``[B, 2, 4, 1, 16, 16]`` (reference, target), 64 + 64 tokens."""
    gen = _gen(88_000, seed)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.int64)
    return dict(
        image=_joyimage_image(PIXELS, seed),
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        prompt_embeds_mask=mask,
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_embeds_mask=mask.clone(),
        guidance_scale=4.0,
        height=PIXELS,
        width=PIXELS,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def joyimage_edit_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``JoyImageEditPipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(
        tiny_joyimage_edit_pipeline(), joyimage_edit_pipeline_kwargs(batch, steps=4, seed=seed)
    )


# JoyImage-Edit-Plus ------------------------------------------------------------------------------------------------


def tiny_joyimage_edit_plus_transformer(seed: int = 0):
    """JoyImage-Edit-Plus: JoyImage-Edit's blocks (``tiny_joyimage_edit_transformer``'s sizes) over pre-patchified
    latents; RoPE per row and per image (its frame index the image's place) and a key mask over
    ``[patches; text]``."""
    from diffusers import JoyImageEditPlusTransformer3DModel

    model = JoyImageEditPlusTransformer3DModel(
        patch_size=[1, 2, 2],
        in_channels=JOYIMAGE_CHANNELS,
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        text_dim=TEXT_DIM,
        mlp_width_ratio=2.0,
        num_layers=2,
        rope_dim_list=[2, 2, 4],
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_joyimage_edit_plus_pipeline(transformer=None):
    """JoyImageEditPlusPipeline with a flow-matching scheduler, the tiny Wan VAE, no Qwen3-VL text encoder, tokenizer
    or processor, the unbucketed image processor of ``_joyimage_image_processor``. Its ``__call__`` formats ``prompt``
    (a chat turn with an ``<image>`` tag per reference) even when handed ``prompt_embeds`` (``len(None)`` fails),
    while ``check_inputs`` forbids passing both: a subclass lets a prompt come with its embeddings (formatted, never
    encoded). Nothing else changes."""
    from diffusers import FlowMatchEulerDiscreteScheduler, JoyImageEditPlusPipeline

    class _JoyImageEditPlusPipeline(JoyImageEditPlusPipeline):
        def check_inputs(self, prompt, height, width, negative_prompt=None, prompt_embeds=None, **kwargs):
            prompt = None if prompt_embeds is not None else prompt
            return super().check_inputs(prompt, height, width, negative_prompt, prompt_embeds, **kwargs)

    pipe = _JoyImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_joyimage_vae(),
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_joyimage_edit_plus_transformer(),
        processor=None,
    )
    pipe.image_processor = _joyimage_image_processor(pipe.vae_scale_factor_spatial)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def joyimage_edit_plus_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens and negative prompts of 3 valid tokens (int64 masks; guidance 4, batched),
    two reference images of 64 and 128 px per prompt, 128 px output: patches ``[B, 144, 4, 1, 2, 2]``, 64 target,
    16 and 64 reference."""
    gen = _gen(89_000, seed)
    return dict(
        images=[[_joyimage_image(64, seed), _joyimage_image(PIXELS, seed + 1)] for _ in range(batch)],
        prompt=["edit"] * batch,
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        prompt_embeds_mask=torch.ones(batch, TEXT_LEN, dtype=torch.int64),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_embeds_mask=_short_mask(batch, TEXT_LEN, 3),
        guidance_scale=4.0,
        height=PIXELS,
        width=PIXELS,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def joyimage_edit_plus_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``JoyImageEditPlusPipeline``: ``batch`` rows, the negative and positive halves
    of ``batch // 2`` prompts."""
    return transformer_call_kwargs(
        tiny_joyimage_edit_plus_pipeline(), joyimage_edit_plus_pipeline_kwargs(max(1, batch // 2), steps=4, seed=seed)
    )
