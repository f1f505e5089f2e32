"""Tiny, seeded, download-free image DiTs (and their pipelines) beyond SD3 / Lumina / Flux.1 / Qwen-Image.

Same conventions as :mod:`models`: fp32, CPU, eval mode, every parameter re-initialised from a private
``torch.Generator`` with :func:`models._reinit_` (``std=0.15, qk_std=0.3``) so that every layer matters, and call
arguments drawn from private generators.  Every default size gives **N = 64 image tokens** (an 8 x 8 patch grid).

For each model key (``flux2``, ``chroma``, ``cogview4``, ``cogview3plus``, ``auraflow``, ``hunyuan_image``):

* ``tiny_<key>_transformer(seed=0)`` -- one block of each kind, 2 heads x 8 (hidden 16);
* ``<key>_call_kwargs(batch=2, seed=0)`` -- the keyword arguments the diffusers pipeline passes to
  ``transformer(...)`` at one denoising step (same layouts, dtypes, masks, position ids, ``return_dict=False``);
* ``tiny_<key>_pipeline(transformer=None)`` / ``<key>_pipeline_kwargs(batch=1, steps=8, seed=0)`` -- the real
  diffusers pipeline without VAE, text encoders or tokenizers (prompt embeddings passed in,
  ``output_type="latent"``).  All six pipelines can be assembled that way.

How each pipeline calls its transformer per denoising step (diffusers 0.42):

==============  =====================================================================================
flux2           once; guidance-distilled (``guidance`` = guidance_scale per row), no CFG, no text mask
chroma          once per CFG branch (positive, then negative); joint float mask over [text; image]
cogview4        once per CFG branch (cond, then uncond); no mask passed
cogview3plus    once, CFG batched ``[negative; positive]`` (negative embeddings are zeros)
auraflow        once, CFG batched ``[negative; positive]``; no mask passed to the transformer
hunyuan_image   once per guider branch (cond, then uncond) with ``AdaptiveProjectedMixGuidance``;
                once per step with no guider (the distilled checkpoint)
==============  =====================================================================================

In the batched-CFG call kwargs (cogview3plus, auraflow) rows ``b`` and ``b + B // 2`` are the two CFG halves of
the same image and get identical latents.

Not built here: Flux2KleinPipeline (a Flux2Transformer2DModel with ``guidance_embeds=False``, called once per CFG
branch with ``guidance=None``).

Graph capture: with ``glyph=True`` (the default, as the HunyuanImage-2.1 checkpoint) HunyuanImage's forward
reorders each row's text with boolean-mask indexing (``text_2[text_mask_2]``, data-dependent shapes) inside a
per-row loop, so Dynamo skips the model's forward and compiles every sub-module call as its own graph;
``tiny_hunyuan_image_transformer(glyph=False)`` gives one graph.  The other five models give one graph each.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tests.support.models import _reinit_

HIDDEN = 16  # 2 heads x 8
HEADS = 2
HEAD_DIM = 8
GRID = 8  # patch grid side: N = GRID * GRID = 64 image tokens
NUM_IMAGE_TOKENS = GRID * GRID

_STD = dict(std=0.15, qk_std=0.3)


def _gen(offset: int, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(offset + seed)


def _smooth_timestep_embedding_(model: torch.nn.Module) -> None:
    """Scale the first linear layer of every 256-channel sinusoidal timestep embedder (AuraFlow, HunyuanImage) to
    std ``0.15 * sqrt(16 / 256)``, as if it read 16 channels like the other tiny models here.

    With std-0.15 weights over 256 sinusoids the high-frequency channels dominate and the random model's output
    changes completely from one denoising step to the next (relative change up to ~8 for AuraFlow), so reused
    (RAS) outputs would be meaningless; scaled, consecutive steps change by ~0.1-0.3 as in the other models."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("timestep_embedder.linear_1", "time_step_proj.linear_1")) and module.in_features > 16:
                module.weight.mul_((16 / module.in_features) ** 0.5)


def _text_mask(batch: int, length: int, padded: int = 2, dtype=torch.int64) -> torch.Tensor:
    """Row 0 has its last ``padded`` slots masked out, the other rows are full (so masking always matters)."""
    mask = torch.ones(batch, length, dtype=dtype)
    mask[0, length - padded :] = 0
    return mask


# ---------------------------------------------------------------------------------------------- Flux.2 (packed)

FLUX2_IN_CHANNELS = 16  # the pipeline packs 2x2 patches of 4 latent channels
FLUX2_TEXT_DIM = 24
FLUX2_TEXT_LEN = 5
FLUX2_PIXELS = 128  # latents 16x16 (no VAE: scale 8), packed 2x2 -> 8x8 = 64 tokens


def tiny_flux2_transformer(seed: int = 0):
    """Flux.2: one double-stream and one single-stream block, hidden 16 (2 heads x 8), 4-axis RoPE (t, h, w, l)
    with 2 dims per axis over the joint [text; image] sequence, guidance embedding, packed latents of 16 elements
    per token.  Tokens: N = 64 image, 5 text."""
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=FLUX2_IN_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=FLUX2_TEXT_DIM,
        timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=True,
    )
    _reinit_(model, seed, **_STD)
    return model.eval()


def flux2_call_kwargs(batch: int = 2, seed: int = 0, timestep: float = 0.75, guidance_scale: float = 4.0) -> dict:
    """As Flux2Pipeline calls the transformer: packed latents ``[B, 64, 16]``, prompt embeddings ``[B, 5, 24]``,
    ``txt_ids`` ``[B, 5, 4]`` = (0, 0, 0, l) and ``img_ids`` ``[B, 64, 4]`` = (0, h, w, 0) (int64, batched; the
    model uses row 0), ``timestep`` = t / 1000 ``[B]`` float, ``guidance`` ``[B]`` float.  No text mask."""
    gen = _gen(40_000, seed)
    latent_ids = torch.cartesian_prod(torch.arange(1), torch.arange(GRID), torch.arange(GRID), torch.arange(1))
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(FLUX2_TEXT_LEN))
    return dict(
        hidden_states=torch.randn(batch, NUM_IMAGE_TOKENS, FLUX2_IN_CHANNELS, generator=gen),
        timestep=torch.full((batch,), timestep),
        guidance=torch.full((1,), guidance_scale).expand(batch),
        encoder_hidden_states=torch.randn(batch, FLUX2_TEXT_LEN, FLUX2_TEXT_DIM, generator=gen),
        txt_ids=text_ids.unsqueeze(0).expand(batch, -1, -1).contiguous(),
        img_ids=latent_ids.unsqueeze(0).expand(batch, -1, -1),
        joint_attention_kwargs=None,
        return_dict=False,
    )


def tiny_flux2_pipeline(transformer=None):
    """Flux2Pipeline with the tiny transformer, a dynamically shifted flow-matching scheduler, no VAE, no Mistral
    text encoder/processor (prompt embeddings passed in).  Calls the transformer once per step (no CFG)."""
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_flux2_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux2_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of embeddings ``[batch, 5, 24]``, 128x128 pixels (N = 64); returns packed latents
    ``[batch, 64, 16]``.  Transformer batch = ``batch``."""
    gen = _gen(41_000, seed)
    return dict(
        prompt_embeds=torch.randn(batch, FLUX2_TEXT_LEN, FLUX2_TEXT_DIM, generator=gen),
        height=FLUX2_PIXELS,
        width=FLUX2_PIXELS,
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- Chroma (packed)

CHROMA_IN_CHANNELS = 16
CHROMA_TEXT_DIM = 24
CHROMA_TEXT_LEN = 6
CHROMA_PIXELS = 128


def tiny_chroma_transformer(seed: int = 0):
    """Chroma (pruned Flux.1-schnell): one double-stream and one single-stream block, hidden 16 (2 heads x 8),
    Flux RoPE (2, 2, 4) over [text; image], a 1-layer approximator (16 -> 32 -> 16) producing every block's
    modulation.  Tokens: N = 64 image, 6 text."""
    from diffusers import ChromaTransformer2DModel

    model = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=CHROMA_IN_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=CHROMA_TEXT_DIM,
        axes_dims_rope=(2, 2, 4),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    _reinit_(model, seed, **_STD)
    return model.eval()


def _chroma_text_mask(batch: int) -> torch.Tensor:
    # as ChromaPipeline builds it: float, 1 up to and including the first padding token (row 0: 3 valid tokens + 1
    # unmasked pad, 2 masked pads); the other rows are full
    mask = torch.ones(batch, CHROMA_TEXT_LEN)
    mask[0, 4:] = 0
    return mask


def chroma_call_kwargs(batch: int = 2, seed: int = 0, timestep: float = 0.75, padded_text: bool = True) -> dict:
    """As ChromaPipeline calls the transformer (one call per CFG branch; ``batch`` = images): packed latents
    ``[B, 64, 16]``, embeddings ``[B, 6, 24]``, 2-D position ids ``txt_ids`` zeros ``[6, 3]`` and ``img_ids``
    ``[64, 3]`` = (0, h, w) float, ``timestep`` = t / 1000 ``[B]``, and ``attention_mask`` ``[B, 6 + 64]`` float
    (text mask, then ones for the image: ``_prepare_attention_mask``).

    The blocks turn it into ``mask[:, None, None, :] * mask[:, None, :, None]`` ``[B, 1, 70, 70]`` and, being
    float, SDPA *adds* it to the scores (+1 on valid pairs, +0 on pairs with a padded token): that is what
    diffusers does with the pipeline's float mask.  With ``padded_text`` row 0 has 2 masked text slots."""
    gen = _gen(50_000, seed)
    text_mask = _chroma_text_mask(batch) if padded_text else torch.ones(batch, CHROMA_TEXT_LEN)
    img_ids = torch.zeros(GRID, GRID, 3)
    img_ids[..., 1] += torch.arange(GRID)[:, None]
    img_ids[..., 2] += torch.arange(GRID)[None, :]
    return dict(
        hidden_states=torch.randn(batch, NUM_IMAGE_TOKENS, CHROMA_IN_CHANNELS, generator=gen),
        timestep=torch.full((batch,), timestep),
        encoder_hidden_states=torch.randn(batch, CHROMA_TEXT_LEN, CHROMA_TEXT_DIM, generator=gen),
        txt_ids=torch.zeros(CHROMA_TEXT_LEN, 3),
        img_ids=img_ids.reshape(NUM_IMAGE_TOKENS, 3),
        attention_mask=torch.cat([text_mask, torch.ones(batch, NUM_IMAGE_TOKENS, dtype=torch.bool)], dim=1),
        joint_attention_kwargs={},
        return_dict=False,
    )


def tiny_chroma_pipeline(transformer=None):
    """ChromaPipeline with the tiny transformer, a dynamically shifted flow-matching scheduler, no VAE, no T5.
    Calls the transformer twice per step when guidance_scale > 1 (positive, then negative branch)."""
    from diffusers import ChromaPipeline

    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_chroma_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chroma_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts: embeddings ``[batch, 6, 24]`` with float masks (prompt: first row padded as in
    :func:`chroma_call_kwargs`; negative: 2 valid tokens + 1 unmasked pad), 128x128 pixels (N = 64), CFG 4.0.
    Returns packed latents ``[batch, 64, 16]``."""
    gen = _gen(51_000, seed)
    negative_mask = torch.zeros(batch, CHROMA_TEXT_LEN)
    negative_mask[:, :3] = 1
    return dict(
        prompt_embeds=torch.randn(batch, CHROMA_TEXT_LEN, CHROMA_TEXT_DIM, generator=gen),
        prompt_attention_mask=_chroma_text_mask(batch),
        negative_prompt_embeds=torch.randn(batch, CHROMA_TEXT_LEN, CHROMA_TEXT_DIM, generator=gen),
        negative_prompt_attention_mask=negative_mask,
        height=CHROMA_PIXELS,
        width=CHROMA_PIXELS,
        num_inference_steps=steps,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- CogView4

COGVIEW_IN_CHANNELS = 4
COGVIEW_TEXT_DIM = 24
COGVIEW_TEXT_LEN = 6
COGVIEW_LATENT = 16  # latent side; patch 2 -> 8x8 = 64 tokens
COGVIEW_PIXELS = COGVIEW_LATENT * 8  # no VAE: scale 8


def tiny_cogview4_transformer(seed: int = 0):
    """CogView4: one block (joint attention over [text; image], LayerNorm qk-norm, 2-D RoPE on the image part of
    q/k only), hidden 16 (2 heads x 8), patch 2, 4 latent channels, text width 24, time embedding 16.
    Tokens: N = 64 image (16x16 latents), 6 text."""
    from diffusers import CogView4Transformer2DModel

    model = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=COGVIEW_IN_CHANNELS,
        out_channels=COGVIEW_IN_CHANNELS,
        num_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        text_embed_dim=COGVIEW_TEXT_DIM,
        time_embed_dim=16,
        condition_dim=8,
        pos_embed_max_size=32,
        sample_size=COGVIEW_LATENT,
        rope_axes_dim=(32, 32),
    )
    _reinit_(model, seed, **_STD)
    return model.eval()


def _size_conditions(batch: int) -> dict:
    size = torch.tensor([[COGVIEW_PIXELS, COGVIEW_PIXELS]], dtype=torch.float32).repeat(batch, 1)
    return dict(original_size=size, target_size=size.clone(), crop_coords=torch.zeros(batch, 2))


def cogview4_call_kwargs(batch: int = 2, seed: int = 0, timestep: float = 750.0, padded_text: bool = False) -> dict:
    """As CogView4Pipeline calls the transformer (one call per CFG branch; ``batch`` = images): latents
    ``[B, 4, 16, 16]``, embeddings ``[B, 6, 24]``, ``timestep`` ``[B]`` float in [0, 1000], size conditions
    ``[B, 2]`` float (128 px, crop 0).  The pipeline passes **no** ``attention_mask``; ``padded_text=True`` adds
    the ``[B, 6]`` text mask the transformer accepts (row 0: 2 padded) -- not a pipeline call."""
    gen = _gen(60_000, seed)
    kwargs = dict(
        hidden_states=torch.randn(batch, COGVIEW_IN_CHANNELS, COGVIEW_LATENT, COGVIEW_LATENT, generator=gen),
        encoder_hidden_states=torch.randn(batch, COGVIEW_TEXT_LEN, COGVIEW_TEXT_DIM, generator=gen),
        timestep=torch.full((batch,), timestep),
        **_size_conditions(batch),
        attention_kwargs=None,
        return_dict=False,
    )
    if padded_text:
        kwargs["attention_mask"] = _text_mask(batch, COGVIEW_TEXT_LEN)
    return kwargs


def tiny_cogview4_pipeline(transformer=None):
    """CogView4Pipeline with the tiny transformer, a linearly shifted dynamic flow-matching scheduler (as the
    checkpoint's), no VAE, no GLM.  Calls the transformer twice per step when guidance_scale > 1."""
    from diffusers import CogView4Pipeline

    pipe = CogView4Pipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer if transformer is not None else tiny_cogview4_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.25, max_shift=0.75
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cogview4_pipeline_kwargs(
    batch: int = 1, steps: int = 8, seed: int = 0, negative_text_len: int | None = None
) -> dict:
    """``batch`` prompts of embeddings ``[batch, 6, 24]``, negatives ``[batch, negative_text_len (default 6), 24]``,
    128x128 pixels (N = 64), CFG 5.0.  Returns latents ``[batch, 4, 16, 16]``.

    With the real GLM encoder the two branches usually have different text lengths (each padded to a multiple of
    16: an empty negative prompt gives 16, a prompt 32 or more), so the two per-branch calls have different
    shapes; ``negative_text_len`` reproduces that."""
    gen = _gen(61_000, seed)
    negative_len = COGVIEW_TEXT_LEN if negative_text_len is None else negative_text_len
    return dict(
        prompt_embeds=torch.randn(batch, COGVIEW_TEXT_LEN, COGVIEW_TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, negative_len, COGVIEW_TEXT_DIM, generator=gen),
        height=COGVIEW_PIXELS,
        width=COGVIEW_PIXELS,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- CogView3-Plus


def tiny_cogview3plus_transformer(seed: int = 0):
    """CogView3-Plus: one block (joint attention over [text; image] through CogVideoXAttnProcessor2_0, LayerNorm
    qk-norm, no RoPE; 2-D sin-cos position embedding added to the image tokens after a [text; image] concat in the
    patch embedding), hidden 16 (2 heads x 8), patch 2, 4 latent channels.  Tokens: N = 64 image, 6 text."""
    from diffusers import CogView3PlusTransformer2DModel

    model = CogView3PlusTransformer2DModel(
        patch_size=2,
        in_channels=COGVIEW_IN_CHANNELS,
        out_channels=COGVIEW_IN_CHANNELS,
        num_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        text_embed_dim=COGVIEW_TEXT_DIM,
        time_embed_dim=16,
        condition_dim=8,
        pos_embed_max_size=16,
        sample_size=COGVIEW_LATENT,
    )
    _reinit_(model, seed, **_STD)
    return model.eval()


def cogview3plus_call_kwargs(batch: int = 2, seed: int = 0, timestep: int = 749) -> dict:
    """As CogView3PlusPipeline calls the transformer: batched CFG, ``B = batch`` rows = ``[negative; positive]``
    (negative embeddings are zeros: the pipeline replaces them whenever ``negative_prompt`` is None), identical
    latents in rows ``b`` and ``b + B // 2``: latents ``[B, 4, 16, 16]``, embeddings ``[B, 6, 24]``, ``timestep``
    ``[B]`` **int64** (DDIM timesteps), size conditions ``[B, 2]`` float.  No mask."""
    if batch % 2:
        raise ValueError("batch is the CFG batch [negative; positive]: it must be even")
    gen = _gen(70_000, seed)
    half = batch // 2
    latents = torch.randn(half, COGVIEW_IN_CHANNELS, COGVIEW_LATENT, COGVIEW_LATENT, generator=gen)
    positive = torch.randn(half, COGVIEW_TEXT_LEN, COGVIEW_TEXT_DIM, generator=gen)
    return dict(
        hidden_states=torch.cat([latents, latents]),
        encoder_hidden_states=torch.cat([torch.zeros_like(positive), positive]),
        timestep=torch.full((batch,), timestep, dtype=torch.int64),
        **_size_conditions(batch),
        return_dict=False,
    )


def tiny_cogview3plus_pipeline(transformer=None):
    """CogView3PlusPipeline with the tiny transformer, a CogVideoX DDIM scheduler configured like the checkpoint's
    (v-prediction, zero-SNR, trailing spacing), no VAE, no T5.  Calls the transformer once per step with the CFG
    batch ``[negative; positive]``."""
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline

    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=4.0,
        timestep_spacing="trailing",
    )
    pipe = CogView3PlusPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer if transformer is not None else tiny_cogview3plus_transformer(),
        scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cogview3plus_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of embeddings ``[batch, 6, 24]`` (no negatives: the pipeline uses zeros), 128x128 pixels
    (N = 64), CFG 7.0: transformer batch ``2 * batch``.  Returns latents ``[batch, 4, 16, 16]``."""
    gen = _gen(71_000, seed)
    return dict(
        prompt_embeds=torch.randn(batch, COGVIEW_TEXT_LEN, COGVIEW_TEXT_DIM, generator=gen),
        height=COGVIEW_PIXELS,
        width=COGVIEW_PIXELS,
        num_inference_steps=steps,
        guidance_scale=7.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- AuraFlow

AURA_IN_CHANNELS = 4
AURA_TEXT_DIM = 24
AURA_TEXT_LEN = 6  # + 8 register tokens the model prepends
AURA_LATENT = 16
AURA_PIXELS = AURA_LATENT * 8


def tiny_auraflow_transformer(seed: int = 0):
    """AuraFlow: one MMDiT (joint) block and one single-DiT block, hidden 16 (2 heads x 8; caption projection 16),
    patch 2, 4 latent channels, a learned position table of 256 = 16x16 entries (the centred 8x8 window is used),
    8 register tokens prepended to the text.  Tokens: N = 64 image, 6 text + 8 registers = 14.  The blocks'
    modulation weights are 4x the usual std (see below) so that attention, and with it the text, matters; its
    256-channel timestep embedder is smoothed (:func:`_smooth_timestep_embedding_`)."""
    from diffusers import AuraFlowTransformer2DModel

    model = AuraFlowTransformer2DModel(
        sample_size=AURA_LATENT,
        patch_size=2,
        in_channels=AURA_IN_CHANNELS,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=AURA_TEXT_DIM,
        caption_projection_dim=HIDDEN,
        out_channels=AURA_IN_CHANNELS,
        pos_embed_max_size=256,
    )
    _reinit_(model, seed, **_STD)
    with torch.no_grad():
        # AuraFlow's adaLN modulation has no bias, so with std-0.15 weights every gate is ~0.1 and the text
        # (reached only through attention) barely moves the output; 4x larger modulation weights give gates ~0.4
        for name, module in model.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear")):
                module.weight.mul_(4.0)
    _smooth_timestep_embedding_(model)
    return model.eval()


def _aura_prompt(gen: torch.Generator, rows: int, valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    # UMT5 output times its mask, as the pipeline computes it: padded slots are zeros
    mask = torch.zeros(rows, AURA_TEXT_LEN, dtype=torch.int64)
    mask[:, :valid] = 1
    embeds = torch.randn(rows, AURA_TEXT_LEN, AURA_TEXT_DIM, generator=gen) * mask[..., None]
    return embeds, mask


def auraflow_call_kwargs(batch: int = 2, seed: int = 0, timestep: float = 0.75) -> dict:
    """As AuraFlowPipeline calls the transformer: batched CFG, ``B = batch`` rows = ``[negative; positive]`` with
    identical latents in rows ``b`` and ``b + B // 2``: latents ``[B, 4, 16, 16]``, embeddings ``[B, 6, 24]``
    (padded slots zeroed, as the pipeline's ``embeds * mask``: negative 2 valid, positive 4 valid), ``timestep`` =
    t / 1000 ``[B]`` float.  The pipeline passes no mask to the transformer, and the latents positionally."""
    if batch % 2:
        raise ValueError("batch is the CFG batch [negative; positive]: it must be even")
    gen = _gen(80_000, seed)
    half = batch // 2
    latents = torch.randn(half, AURA_IN_CHANNELS, AURA_LATENT, AURA_LATENT, generator=gen)
    negative, _ = _aura_prompt(gen, half, 2)
    positive, _ = _aura_prompt(gen, half, 4)
    return dict(
        hidden_states=torch.cat([latents, latents]),
        encoder_hidden_states=torch.cat([negative, positive]),
        timestep=torch.full((batch,), timestep),
        return_dict=False,
        attention_kwargs=None,
    )


def tiny_auraflow_pipeline(transformer=None):
    """AuraFlowPipeline with the tiny transformer, a flow-matching scheduler (shift 1.73, as the checkpoint's), no
    VAE, no UMT5.  Calls the transformer once per step with the CFG batch ``[negative; positive]``."""
    from diffusers import AuraFlowPipeline

    pipe = AuraFlowPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer if transformer is not None else tiny_auraflow_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.73),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def auraflow_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts: embeddings ``[batch, 6, 24]`` + int64 masks (positive 4 valid, negative 2 valid; the
    pipeline requires masks with embeddings but does not pass them on), 128x128 pixels (N = 64), CFG 3.5:
    transformer batch ``2 * batch``.  Returns latents ``[batch, 4, 16, 16]``."""
    gen = _gen(81_000, seed)
    positive, positive_mask = _aura_prompt(gen, batch, 4)
    negative, negative_mask = _aura_prompt(gen, batch, 2)
    return dict(
        prompt_embeds=positive,
        prompt_attention_mask=positive_mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
        height=AURA_PIXELS,
        width=AURA_PIXELS,
        num_inference_steps=steps,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- HunyuanImage 2.1

HUNYUAN_IN_CHANNELS = 4
HUNYUAN_TEXT_DIM = 24  # Qwen2.5-VL width
HUNYUAN_TEXT_LEN = 6
HUNYUAN_GLYPH_DIM = 12  # ByT5 width (text_embed_2_dim)
HUNYUAN_GLYPH_LEN = 4
HUNYUAN_VAE_SCALE = 32  # the pipeline's scale factor without a VAE
HUNYUAN_PIXELS = GRID * HUNYUAN_VAE_SCALE  # 256 px -> 8x8 latents, patch 1 -> 64 tokens


def tiny_hunyuan_image_transformer(seed: int = 0, glyph: bool = True):
    """HunyuanImage-2.1: one double-stream and one single-stream block, one token-refiner block, hidden 16
    (2 heads x 8), RMS qk-norm, 2-D RoPE (4, 4) on the image part of the joint [image; text] sequence (image
    *first*), patch 1, 4 latent channels.  ``glyph=True`` (as the checkpoint) adds the ByT5 glyph projection
    (``text_embed_2_dim=12``; its hidden width is fixed at 2048 by diffusers, so its two inner weights are rescaled
    to std 1/sqrt(fan_in) to keep activations O(1)).  Both 256-channel timestep embedders are smoothed
    (:func:`_smooth_timestep_embedding_`).  Tokens: N = 64 image, 6 text (+ 4 glyph)."""
    from diffusers import HunyuanImageTransformer2DModel

    model = HunyuanImageTransformer2DModel(
        in_channels=HUNYUAN_IN_CHANNELS,
        out_channels=HUNYUAN_IN_CHANNELS,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=(1, 1),
        text_embed_dim=HUNYUAN_TEXT_DIM,
        text_embed_2_dim=HUNYUAN_GLYPH_DIM if glyph else None,
        rope_axes_dim=(4, 4),
    )
    _reinit_(model, seed, **_STD)
    if glyph:
        with torch.no_grad():
            for linear in (model.context_embedder_2.linear_2, model.context_embedder_2.linear_3):
                linear.weight.mul_(1.0 / (0.15 * linear.in_features**0.5))
    _smooth_timestep_embedding_(model)
    return model.eval()


def hunyuan_image_call_kwargs(batch: int = 2, seed: int = 0, timestep: float = 750.0) -> dict:
    """As HunyuanImagePipeline calls the transformer (one call per guider branch; ``batch`` = images): latents
    ``[B, 4, 8, 8]``, Qwen embeddings ``[B, 6, 24]`` with an int64 mask (row 0: last 2 padded), ByT5 glyph
    embeddings ``[B, 4, 12]`` with an int64 mask (row 0: 3 glyph tokens; other rows no glyph text: zero embeddings
    and an all-zero mask, as the pipeline makes them), ``timestep`` ``[B]`` float in [0, 1000], ``timestep_r`` and
    ``guidance`` None (base, non-distilled model)."""
    gen = _gen(90_000, seed)
    glyph_mask = torch.zeros(batch, HUNYUAN_GLYPH_LEN, dtype=torch.int64)
    glyph_mask[0, :3] = 1
    glyph = torch.randn(batch, HUNYUAN_GLYPH_LEN, HUNYUAN_GLYPH_DIM, generator=gen)
    glyph[1:] = 0
    return dict(
        hidden_states=torch.randn(batch, HUNYUAN_IN_CHANNELS, GRID, GRID, generator=gen),
        timestep=torch.full((batch,), timestep),
        timestep_r=None,
        guidance=None,
        attention_kwargs={},
        return_dict=False,
        encoder_hidden_states=torch.randn(batch, HUNYUAN_TEXT_LEN, HUNYUAN_TEXT_DIM, generator=gen),
        encoder_attention_mask=_text_mask(batch, HUNYUAN_TEXT_LEN),
        encoder_hidden_states_2=glyph,
        encoder_attention_mask_2=glyph_mask,
    )


def tiny_hunyuan_image_pipeline(transformer=None, guider: bool = True):
    """HunyuanImagePipeline with the tiny transformer, a flow-matching scheduler (shift 4), no VAE, no
    Qwen2.5-VL / ByT5 (embeddings and glyph embeddings passed in).  ``guider=True``: the default
    ``AdaptiveProjectedMixGuidance`` -- the transformer is called once per branch (cond, then uncond) per step;
    ``guider=False``: no guidance, one call per step."""
    from diffusers import HunyuanImagePipeline
    from diffusers.guiders import AdaptiveProjectedMixGuidance

    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=4.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer if transformer is not None else tiny_hunyuan_image_transformer(),
        guider=AdaptiveProjectedMixGuidance() if guider else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_image_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts: Qwen embeddings ``[batch, 6, 24]`` + int64 masks (prompt row 0: 2 padded; negative:
    3 valid), glyph embeddings ``[batch, 4, 12]`` (prompt row 0: 3 glyph tokens; negatives: none, zeros),
    256x256 pixels (8x8 latents, N = 64).  Returns latents ``[batch, 4, 8, 8]``."""
    gen = _gen(91_000, seed)
    negative_mask = torch.zeros(batch, HUNYUAN_TEXT_LEN, dtype=torch.int64)
    negative_mask[:, :3] = 1
    glyph_mask = torch.zeros(batch, HUNYUAN_GLYPH_LEN, dtype=torch.int64)
    glyph_mask[0, :3] = 1
    glyph = torch.randn(batch, HUNYUAN_GLYPH_LEN, HUNYUAN_GLYPH_DIM, generator=gen)
    glyph[1:] = 0
    return dict(
        prompt_embeds=torch.randn(batch, HUNYUAN_TEXT_LEN, HUNYUAN_TEXT_DIM, generator=gen),
        prompt_embeds_mask=_text_mask(batch, HUNYUAN_TEXT_LEN),
        negative_prompt_embeds=torch.randn(batch, HUNYUAN_TEXT_LEN, HUNYUAN_TEXT_DIM, generator=gen),
        negative_prompt_embeds_mask=negative_mask,
        prompt_embeds_2=glyph,
        prompt_embeds_mask_2=glyph_mask,
        negative_prompt_embeds_2=torch.zeros(batch, HUNYUAN_GLYPH_LEN, HUNYUAN_GLYPH_DIM),
        negative_prompt_embeds_mask_2=torch.zeros(batch, HUNYUAN_GLYPH_LEN, dtype=torch.int64),
        height=HUNYUAN_PIXELS,
        width=HUNYUAN_PIXELS,
        num_inference_steps=steps,
        distilled_guidance_scale=None,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- registry

TINY_IMAGE_MODELS = {
    "flux2": (tiny_flux2_transformer, flux2_call_kwargs, tiny_flux2_pipeline, flux2_pipeline_kwargs),
    "chroma": (tiny_chroma_transformer, chroma_call_kwargs, tiny_chroma_pipeline, chroma_pipeline_kwargs),
    "cogview4": (tiny_cogview4_transformer, cogview4_call_kwargs, tiny_cogview4_pipeline, cogview4_pipeline_kwargs),
    "cogview3plus": (
        tiny_cogview3plus_transformer,
        cogview3plus_call_kwargs,
        tiny_cogview3plus_pipeline,
        cogview3plus_pipeline_kwargs,
    ),
    "auraflow": (tiny_auraflow_transformer, auraflow_call_kwargs, tiny_auraflow_pipeline, auraflow_pipeline_kwargs),
    "hunyuan_image": (
        tiny_hunyuan_image_transformer,
        hunyuan_image_call_kwargs,
        tiny_hunyuan_image_pipeline,
        hunyuan_image_pipeline_kwargs,
    ),
}
"""key -> (tiny transformer, call kwargs, tiny pipeline, pipeline kwargs)."""
