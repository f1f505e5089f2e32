"""Tiny, seeded, download-free video DiTs beyond Wan: Wan-VACE, ChronoEdit, Helios, Cosmos 1.0, Sana-Video,
Wan-Animate, Wan-Animate-2, Cosmos 3, SANA-WM and its refiner.

Conventions as :mod:`models_wan_family`: two blocks of the tiny Wan sizes (hidden 16 = 2 heads x 8, patch
(1, 2, 2), 4 latent channels) where the class allows, 5 frames of 64x64 pixels (latents ``[B, C, 2, 8, 8]``,
N = 32), parameters re-drawn with ``_reinit_``. The call kwargs are read from the real pipeline's first transformer
call (``capture.transformer_call_kwargs``).

Wan-VACE (``WanVACEPipeline``) calls its transformer once per guidance branch with an int64 timestep per row and
the control video's latents (``control_hidden_states`` ``[B, 2 * 4 + 64, 2, 8, 8]``: inactive and reactive parts
encoded by the VAE, the mask folded into 8 x 8 channels) plus a per-VACE-layer scale. It needs a VAE to encode the
control video: a tiny ``AutoencoderKLWan`` built here, seeded. The pipeline makes one video per call, so the batch-2
call kwargs join two batch-1 pipeline calls. ChronoEdit (``ChronoEditPipeline``, image editing as image to video)
calls once per branch, int64 timesteps, latents ``[B, 12, 2, 8, 8]`` (noisy latents, 4 first-frame mask channels,
the VAE-encoded input image; the output has 4 channels) and CLIP image embeddings beside the text: it needs the
tiny VAE and a tiny CLIP vision tower (it takes the image or its embeddings, never both). Its prompt embeddings
are 512 tokens (the attention processor hard-codes that length). Helios (``HeliosPipeline``) calls once per branch
with a float64 timestep, frame indices and the short / mid / long history latents (zeros at the first chunk),
whose tokens join the self-attention before the image tokens; its pipeline decodes every chunk with the VAE.
Cosmos 1.0 (``CosmosTextToWorldPipeline``, EDM) calls once per branch with the EDM noise conditioning
``0.25 * log(sigma)`` as timestep (float32), an ``fps`` and an all-zero padding mask, and needs a stand-in for its
safety checker; latents ``[B, 4, 3, 8, 12]``, N = 72. Sana-Video (``SanaVideoPipeline``) batches guidance
(``[negative; positive]`` rows), int64 timesteps, an int64 text mask, latents passed positionally.

Wan-Animate (``WanAnimatePipeline``) calls once per branch (positive first; the negative branch gets the face video
blanked to -1), int64 timesteps, latents ``[B, 12, 3, 8, 8]`` (noise beside the 4 mask channels and the latents of
the reference image and the previous segment, one extra leading frame for the reference image), the pose latents
``[B, 4, 2, 8, 8]``, the face video in pixels ``[B, 3, 5, 8, 8]`` and CLIP features of the reference image; it
needs the tiny VAE and CLIP tower, and 512-token prompts (the same hard-coded split as ChronoEdit). Wan-Animate-2
has only a modular pipeline (umT5, CLIP ViT-H, the Wan VAE): its call kwargs are written by hand. It takes lists
of per-video ``[C, F, H, W]`` tensors, runs a reference pass first that fills a ``WanAnimate2KVCache``
(``kv_cache_mode="extract"``), then one call per branch per step (``"cached"``, float timestep ``[1]``) whose
self-attention reads the cache through a flex ``BlockMask``. Cosmos 3 (``Cosmos3OmniPipeline``) tokenizes prompt
strings itself, so its kwargs are written by hand through the pipeline's own packing helpers: one batch-less joint
sequence per call (text ids, then ``[N, 16]`` vision patches scattered in by index), one call per branch, float
per-token timesteps in 0..1000 (scaled by 0.001 inside). SANA-WM (``SanaWMPipeline``) batches guidance, passes
latents ``[2, 4, 2, 4, 6]``, a per-frame float timestep ``[B, 1, F]`` (``1000 * sigma``, 0 on the clean first
frame) and the text positionally, a text mask, camera ray maps ``[B, F, 20]`` and Plücker chunks
``[B, 48, F, H, W]``; it needs the tiny LTX-2 VAE for the first frame. Its refiner (``SanaWMLTX2Refiner``) always
runs Gemma-3 and the LTX-2 connectors, so its kwargs are written by hand: one call per step (no guidance), packed
tokens ``[B, 48, 4]``, a per-token float timestep ``1000 * sigma``, the RoPE tables and a ``SanaWMRefinerKVCache``
holding the attention sink.
"""

from __future__ import annotations

import numpy as np
import torch

from tests.support.capture import transformer_call_kwargs
from tests.support.models import TINY_WAN_CONFIG, WAN_TEXT_DIM, WAN_TEXT_LEN, _reinit_

#: latent channels of the tiny Wan VAE (= the transformers' ``in_channels``), its spatial factor's square: the
#: VACE mask is folded into ``8 * 8`` channels
Z_DIM, MASK_CHANNELS = 4, 8 * 8
HIDDEN = TINY_WAN_CONFIG["num_attention_heads"] * TINY_WAN_CONFIG["attention_head_dim"]


def tiny_wan_vae():
    """A tiny ``AutoencoderKLWan``: base width 3, one residual block per level, factors 8 (spatial) and 4
    (temporal), ``Z_DIM`` latent channels, latents neither shifted nor scaled; diffusers' default initialisation
    under a fixed seed (it encodes the conditioning video, so it must be the same VAE on every build)."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKLWan(
            base_dim=3,
            z_dim=Z_DIM,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * Z_DIM,
            latents_std=[1.0] * Z_DIM,
        )
    return vae.eval()


def _frames(count: int, size: int, seed: int):
    """``count`` seeded random RGB frames of ``size`` x ``size`` pixels (PIL images)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def _stack_rows(calls: list[dict], batched: tuple[str, ...]) -> dict:
    """One call of ``len(calls)`` rows from batch-1 calls: the ``batched`` tensors concatenated, the rest of the
    first call."""
    out = dict(calls[0])
    for key in batched:
        out[key] = torch.cat([call[key] for call in calls])
    return out


def _wan_scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


# ------------------------------------------------------------------------------------------------- Wan-VACE

#: One VACE block (beside block 0): with two, the per-layer ``control_hidden_states_scale`` ``[2]`` would look like a
#: batch axis of 2 rows to code that slices call arguments by row.
VACE_LAYERS = [0]


def tiny_wan_vace_transformer(seed: int = 0):
    """Wan-VACE: the tiny Wan 2.1 sizes, one VACE block (hint added after block 0); the control video enters as
    ``2 * Z_DIM`` latent channels (inactive and reactive parts) plus the 64 mask channels."""
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(
        **TINY_WAN_CONFIG, vace_layers=VACE_LAYERS, vace_in_channels=2 * Z_DIM + MASK_CHANNELS
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_wan_vace_pipeline(transformer=None):
    """WanVACEPipeline with the tiny Wan VAE (it encodes the control video), no text encoder or tokenizer."""
    from diffusers import WanVACEPipeline

    pipe = WanVACEPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_wan_vae(),
        scheduler=_wan_scheduler(),
        transformer=transformer if transformer is not None else tiny_wan_vace_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_vace_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """One prompt (the pipeline generates one video at a time) and its negative prompt (two calls per step), a
    control video of 5 random 64x64 frames: latents ``[1, 4, 2, 8, 8]``, N = 32."""
    if batch != 1:
        raise ValueError("WanVACEPipeline generates one video per call")
    gen = torch.Generator().manual_seed(80_000 + seed)
    return dict(
        video=_frames(5, 64, 80_000 + seed),
        prompt_embeds=torch.randn(1, WAN_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(1, WAN_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        height=64,
        width=64,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def wan_vace_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``WanVACEPipeline`` (its positive branch) for ``batch`` videos: one pipeline
    run per row (seeds ``seed``, ``seed + 1``, ...), rows concatenated."""
    pipe = tiny_wan_vace_pipeline()
    calls = [transformer_call_kwargs(pipe, wan_vace_pipeline_kwargs(1, steps=4, seed=seed + i)) for i in range(batch)]
    return _stack_rows(calls, ("hidden_states", "timestep", "encoder_hidden_states", "control_hidden_states"))


# ------------------------------------------------------------------------------------------------- ChronoEdit

#: The tiny CLIP vision tower's width and the prompt length: ChronoEdit's attention processor takes all but the
#: last 512 context tokens as image tokens (``encoder_hidden_states.shape[1] - 512``, hard-coded), so the prompt
#: embeddings must be exactly 512 tokens long.
CHRONOEDIT_IMAGE_DIM, CHRONOEDIT_TEXT_LEN = 12, 512


def tiny_chronoedit_transformer(seed: int = 0):
    """ChronoEdit (Wan 2.1 image-to-video blocks): the tiny Wan sizes with ``2 * Z_DIM + 4`` input channels
    (noisy latents, 4 first-frame mask channels, the encoded input image) and image cross-attention (added K/V)."""
    from diffusers import ChronoEditTransformer3DModel

    config = {**TINY_WAN_CONFIG, "in_channels": 2 * Z_DIM + 4, "out_channels": Z_DIM}
    model = ChronoEditTransformer3DModel(
        **config, image_dim=CHRONOEDIT_IMAGE_DIM, added_kv_proj_dim=HIDDEN, rope_temporal_skip_len=8
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def _tiny_clip_vision():
    """A tiny CLIP vision tower (two layers of width 12, 32 px images of 16 px patches: 5 tokens) and its image
    processor: ChronoEditPipeline takes either the input image or its CLIP embeddings, never both, and needs the
    image itself for its VAE condition, so it must run its image encoder."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=CHRONOEDIT_IMAGE_DIM,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        projection_dim=CHRONOEDIT_IMAGE_DIM,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = CLIPVisionModel(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return encoder, processor


def tiny_chronoedit_pipeline(transformer=None):
    """ChronoEditPipeline with the tiny Wan VAE (it encodes the input image) and a tiny CLIP vision tower, no
    text encoder or tokenizer."""
    from diffusers import ChronoEditPipeline

    image_encoder, image_processor = _tiny_clip_vision()
    pipe = ChronoEditPipeline(
        tokenizer=None,
        text_encoder=None,
        image_encoder=image_encoder,
        image_processor=image_processor,
        transformer=transformer if transformer is not None else tiny_chronoedit_transformer(),
        vae=tiny_wan_vae(),
        scheduler=_wan_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chronoedit_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 512 tokens and their negative prompts (two calls per step), one random 64x64 input
    image; without temporal reasoning the pipeline generates 5 frames: latents
    ``[B, 12, 2, 8, 8]``, N = 32."""
    gen = torch.Generator().manual_seed(81_000 + seed)
    return dict(
        image=_frames(1, 64, 81_000 + seed)[0],
        prompt_embeds=torch.randn(batch, CHRONOEDIT_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, CHRONOEDIT_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        height=64,
        width=64,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def chronoedit_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``ChronoEditPipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_chronoedit_pipeline(), chronoedit_pipeline_kwargs(batch, steps=4, seed=seed))


# ------------------------------------------------------------------------------------------------- Helios

#: Helios' frames per chunk (latent frames the transformer denoises per call): 2, so 5 frames are one chunk.
HELIOS_CHUNK = 2


def tiny_helios_transformer(seed: int = 0):
    """Helios: the tiny Wan sizes, 3-axis RoPE (4, 2, 2) from frame indices, the short / mid / long history
    patch embeddings (their tokens join the self-attention before the image tokens)."""
    from diffusers import HeliosTransformer3DModel

    config = {k: v for k, v in TINY_WAN_CONFIG.items() if k != "rope_max_seq_len"}
    model = HeliosTransformer3DModel(**config, rope_dim=(4, 2, 2))
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_helios_pipeline(transformer=None):
    """HeliosPipeline with the tiny Wan VAE (the pipeline decodes every chunk into its history video, even for
    latent output), no text encoder or tokenizer."""
    from diffusers import HeliosPipeline, HeliosScheduler

    pipe = HeliosPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_wan_vae(),
        scheduler=HeliosScheduler(stages=1, use_dynamic_shifting=True),
        transformer=transformer if transformer is not None else tiny_helios_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def helios_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts and their negative prompts (two calls per step), text to video: one chunk of 2 latent
    frames (5 frames of 64x64): latents ``[B, 4, 2, 8, 8]``, N = 32, with the default history sizes (16, 2, 1)
    of zero latents."""
    gen = torch.Generator().manual_seed(82_000 + seed)
    return dict(
        prompt_embeds=torch.randn(batch, WAN_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, WAN_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        height=64,
        width=64,
        num_frames=5,
        num_latent_frames_per_chunk=HELIOS_CHUNK,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def helios_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``HeliosPipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_helios_pipeline(), helios_pipeline_kwargs(batch, steps=4, seed=seed))


# ------------------------------------------------------------------------------------------------- Cosmos

COSMOS_TEXT_LEN = 6


class _NoSafetyChecker(torch.nn.Module):
    """Stands in for ``cosmos_guardrail.CosmosSafetyChecker`` (not installed, and it downloads its models), which
    the Cosmos pipelines refuse to run without: passes every prompt and video."""

    device = torch.device("cpu")  # read by the pipeline's ``_execution_device``
    dtype = torch.float32

    def check_text_safety(self, prompt) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


def tiny_cosmos_transformer(seed: int = 0):
    """Cosmos 1.0 (sizes scaled down): two blocks, hidden 32 (2 heads x 16: its RoPE's NTK factor divides by
    ``dim_h - 2``, zero at head dim 8), patch (1, 2, 2), 4 latent channels, 3-axis RoPE scaled by fps, a learnable
    position table, AdaLN-LoRA of rank 8. ``concat_padding_mask=False``: the padding-mask channel is resized with
    torchvision, not installed here (the pipeline's mask is all zeros)."""
    from diffusers import CosmosTransformer3DModel

    model = CosmosTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2.0,
        text_embed_dim=WAN_TEXT_DIM,
        adaln_lora_dim=8,
        max_size=(8, 16, 16),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False,
        extra_pos_embed_type="learnable",
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_cosmos_pipeline(transformer=None):
    """CosmosTextToWorldPipeline (Cosmos 1.0 text to video) with an EDM Euler scheduler, no VAE (factors 8 / 8),
    no T5, a pass-through safety checker."""
    from diffusers import CosmosTextToWorldPipeline, EDMEulerScheduler

    pipe = CosmosTextToWorldPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_cosmos_transformer(),
        vae=None,
        scheduler=EDMEulerScheduler(sigma_data=0.5, final_sigmas_type="sigma_min"),
        safety_checker=_NoSafetyChecker(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cosmos_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts and their negative prompts (two calls per step), 17 frames of 64x96 pixels: latents
    ``[B, 4, 3, 8, 12]``, N = 3 * 4 * 6 = 72 (three frames and a non-square grid: with one or two frames, or 4
    latent channels over a square grid, Cosmos' reshape-and-permute patchify reads as more than one token
    layout)."""
    gen = torch.Generator().manual_seed(83_000 + seed)
    return dict(
        prompt_embeds=torch.randn(batch, COSMOS_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, COSMOS_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        height=64,
        width=96,
        num_frames=17,
        fps=30,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def cosmos_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``CosmosTextToWorldPipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_cosmos_pipeline(), cosmos_pipeline_kwargs(batch, steps=4, seed=seed))


def tiny_cosmos2_transformer(seed: int = 0):
    """Cosmos Predict2 (sizes scaled down as ``tiny_cosmos_transformer``): no learnable position table
    (``extra_pos_embed_type=None``), RoPE scaled (1, 4, 4) as the text-to-image checkpoints."""
    from diffusers import CosmosTransformer3DModel

    model = CosmosTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        mlp_ratio=2.0,
        text_embed_dim=WAN_TEXT_DIM,
        adaln_lora_dim=8,
        max_size=(8, 16, 16),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=False,
        extra_pos_embed_type=None,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_cosmos2_pipeline(transformer=None):
    """Cosmos2TextToImagePipeline (Predict2 text to image, one latent frame) with a flow-matching scheduler, no VAE
    (factor 8), no T5, a pass-through safety checker."""
    from diffusers import Cosmos2TextToImagePipeline, FlowMatchEulerDiscreteScheduler

    pipe = Cosmos2TextToImagePipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_cosmos2_transformer(),
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
        safety_checker=_NoSafetyChecker(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cosmos2_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts and their negative prompts (two calls per step), 64x64 pixels: latents ``[B, 4, 1, 8, 8]``,
    N = 16 (one frame of four channels over a square grid: the patchify replayed tells channels from frames)."""
    gen = torch.Generator().manual_seed(84_000 + seed)
    return dict(
        prompt_embeds=torch.randn(batch, COSMOS_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, COSMOS_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        height=64,
        width=64,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def cosmos2_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``Cosmos2TextToImagePipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_cosmos2_pipeline(), cosmos2_pipeline_kwargs(batch, steps=4, seed=seed))


# ------------------------------------------------------------------------------------------------- Sana-Video

SANA_VIDEO_CAPTION_DIM, SANA_VIDEO_TEXT_LEN = 24, 6


def tiny_sana_video_transformer(seed: int = 0):
    """Sana-Video: two blocks of ReLU linear self-attention (2 heads x 8) with Wan RoPE, softmax cross-attention to
    the text, a GLUMBConv feed-forward with a temporal convolution; patch (1, 2, 2), 4 latent channels."""
    from diffusers import SanaVideoTransformer3DModel

    model = SanaVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=HIDDEN,
        caption_channels=SANA_VIDEO_CAPTION_DIM,
        mlp_ratio=2.5,
        sample_size=8,
        patch_size=(1, 2, 2),
        rope_max_seq_len=64,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_sana_video_pipeline(transformer=None):
    """SanaVideoPipeline with the flow DPM-Solver++ scheduler (flow shift 3), no VAE (factors 8 / 4), no Gemma."""
    from diffusers import DPMSolverMultistepScheduler, SanaVideoPipeline

    pipe = SanaVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=transformer if transformer is not None else tiny_sana_video_transformer(),
        scheduler=DPMSolverMultistepScheduler(
            flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++"
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sana_video_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts (6 / 4 valid tokens) and negative prompts (2 valid), guidance batched (transformer batch
    ``2 * batch``), 5 frames of 64x64 without resolution binning: latents ``[2B, 4, 2, 8, 8]``, N = 32."""
    gen = torch.Generator().manual_seed(84_000 + seed)

    def mask(valid: list[int]) -> torch.Tensor:
        out = torch.zeros(batch, SANA_VIDEO_TEXT_LEN, dtype=torch.int64)
        for row in range(batch):
            out[row, : valid[row % len(valid)]] = 1
        return out

    return dict(
        prompt_embeds=torch.randn(batch, SANA_VIDEO_TEXT_LEN, SANA_VIDEO_CAPTION_DIM, generator=gen),
        prompt_attention_mask=mask([6, 4]),
        negative_prompt_embeds=torch.randn(batch, SANA_VIDEO_TEXT_LEN, SANA_VIDEO_CAPTION_DIM, generator=gen),
        negative_prompt_attention_mask=mask([2]),
        negative_prompt=None,
        height=64,
        width=64,
        frames=5,
        num_inference_steps=steps,
        guidance_scale=6.0,
        generator=torch.Generator().manual_seed(seed),
        use_resolution_binning=False,
        output_type="latent",
        return_dict=False,
    )


def sana_video_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``SanaVideoPipeline``: ``batch`` rows, the negative and positive halves of
    ``batch // 2`` prompts (the latents are passed positionally)."""
    pipe = tiny_sana_video_pipeline()
    pipe_kwargs = sana_video_pipeline_kwargs(max(1, batch // 2), steps=4, seed=seed)
    return transformer_call_kwargs(pipe, pipe_kwargs)


# ------------------------------------------------------------------------------------------------- Wan-Animate

#: The face video's side in pixels (the motion encoder's input size): its convolutions take it down to 4 x 4, then
#: a 4 x 4 convolution to one feature per frame.
WAN_ANIMATE_FACE_SIZE = 8


def tiny_wan_animate_transformer(seed: int = 0):
    """Wan-Animate (Wan 2.2 Animate): the tiny Wan sizes with ``2 * Z_DIM + 4`` input channels (noisy latents, the
    4 mask channels and the latents of the reference image / previous segment), a pose patch embedding added to
    every frame but the reference one, image cross-attention (added K/V, as the released ``added_kv_proj_dim=5120``)
    and a face adapter after block 0 (one every ``inject_face_latents_blocks = 2`` blocks) that cross-attends each
    frame's tokens to that frame's face-motion features (a motion encoder on 8 x 8 face crops, a causal temporal
    convolution encoder)."""
    from diffusers import WanAnimateTransformer3DModel

    config = {k: v for k, v in TINY_WAN_CONFIG.items() if k not in ("in_channels", "out_channels")}
    model = WanAnimateTransformer3DModel(
        **config,
        in_channels=2 * Z_DIM + 4,
        latent_channels=Z_DIM,
        out_channels=Z_DIM,
        image_dim=CHRONOEDIT_IMAGE_DIM,
        added_kv_proj_dim=HIDDEN,
        motion_encoder_channel_sizes={"8": 8, "4": 8},
        motion_encoder_size=WAN_ANIMATE_FACE_SIZE,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=8,
        face_encoder_hidden_dim=8,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_wan_animate_pipeline(transformer=None):
    """WanAnimatePipeline with the tiny Wan VAE (it encodes the reference image, the pose video and the previous
    segment, and decodes every segment) and the tiny CLIP vision tower (it needs the reference image itself, so it
    cannot take only its embeddings), no text encoder or tokenizer."""
    from diffusers import WanAnimatePipeline

    image_encoder, image_processor = _tiny_clip_vision()
    pipe = WanAnimatePipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_wan_vae(),
        scheduler=_wan_scheduler(),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer if transformer is not None else tiny_wan_animate_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_animate_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """Animate mode: ``batch`` prompts of 512 tokens and their negative prompts (two calls per step), a random 64x64
    character image, a 5-frame pose video of 64x64 and a 5-frame face video of 8x8, one segment of 5 frames: latents
    ``[B, 12, 3, 8, 8]`` (2 latent frames after the reference frame), N = 48."""
    gen = torch.Generator().manual_seed(85_000 + seed)
    return dict(
        image=_frames(1, 64, 85_000 + seed)[0],
        pose_video=_frames(5, 64, 85_100 + seed),
        face_video=_frames(5, WAN_ANIMATE_FACE_SIZE, 85_200 + seed),
        prompt_embeds=torch.randn(batch, CHRONOEDIT_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, CHRONOEDIT_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        height=64,
        width=64,
        segment_frame_length=5,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def wan_animate_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``WanAnimatePipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_wan_animate_pipeline(), wan_animate_pipeline_kwargs(batch, steps=4, seed=seed))


# ------------------------------------------------------------------------------------------------- Wan-Animate-2

#: Wan-Animate-2's image projection takes CLIP ViT-H features (width 1280, fixed in the model); 5 tokens here.
WAN_ANIMATE2_CLIP_DIM, WAN_ANIMATE2_CLIP_LEN = 1280, 5


def tiny_wan_animate2_transformer(seed: int = 0):
    """Wan-Animate-2: two blocks of hidden 16 (2 heads x 8), patch (1, 2, 2), ``Z_DIM`` latent channels plus
    ``4 + Z_DIM`` condition channels, text padded to ``WAN_TEXT_LEN`` tokens; its generation self-attention reads
    the reference K/V from a ``WanAnimate2KVCache`` through a flex ``BlockMask``."""
    from diffusers import WanAnimate2Transformer3DModel

    model = WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2),
        text_len=WAN_TEXT_LEN,
        in_dim=2 * Z_DIM + 4,
        dim=HIDDEN,
        ffn_dim=32,
        freq_dim=16,
        text_dim=WAN_TEXT_DIM,
        out_dim=Z_DIM,
        num_heads=2,
        num_layers=2,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def wan_animate2_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """A denoising call (``kv_cache_mode="cached"``, positive branch) of the Wan-Animate-2 modular pipeline, written
    by hand: the modular blocks need the umT5 text encoder, the CLIP ViT-H tower and the Wan VAE. Follows
    ``modular_pipelines/wan_animate_2``: ``WanAnimate2PrepareSegmentsStep`` (grid and sequence lengths),
    ``WanAnimate2ImageVaeEncoderStep`` / the segment condition steps (mask channels + latents), the reference pass
    ``WanAnimate2ReferenceExtractStep`` (``kv_cache_mode="extract"`` at the first timestep, run here on the seed-0
    tiny model so that the cache matches ``tiny_wan_animate2_transformer()``) and ``WanAnimate2SegmentDenoiseInner``.
    5 frames of 64x64: a segment of 2 latent frames, the noise ``[4, 3, 8, 8]`` per video (the reference image's
    slot first), N = 48; per-sample lists of ``batch`` videos (the pipeline passes one), the grid sizes repeated per
    row (``rope_apply`` rotates one sample per grid row)."""
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    gen = torch.Generator().manual_seed(86_000 + seed)
    frames, side = 2, 8

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    def mask(num_frames: int, mask_len: int) -> torch.Tensor:  # get_i2v_mask: 4 channels, ones on the kept frames
        out = torch.zeros(4, num_frames, side, side)
        out[:, :mask_len] = 1.0
        return out

    reference_image = torch.cat([mask(1, 1), rand(Z_DIM, 1, side, side)])
    reference_latents = [
        torch.cat([reference_image, torch.cat([mask(frames, 0), rand(Z_DIM, frames, side, side)])], dim=1)
        for _ in range(batch)
    ]
    driving = [rand(Z_DIM, frames, side, side) for _ in range(batch)]
    driving_condition = [torch.cat([mask(frames, 5), latents]) for latents in driving]
    clip = rand(batch, WAN_ANIMATE2_CLIP_LEN, WAN_ANIMATE2_CLIP_DIM)
    prompts = [rand(4, WAN_TEXT_DIM) for _ in range(batch)]
    reference_prompts = [rand(3, WAN_TEXT_DIM) for _ in range(batch)]
    grid_ref = torch.tensor([[frames, side // 2, side // 2]] * batch)
    timestep = torch.tensor([999.0])

    model = tiny_wan_animate2_transformer()
    kv_cache = WanAnimate2KVCache(model.config.num_layers)
    with torch.no_grad():
        model(
            driving,
            timestep=timestep,
            encoder_hidden_states=reference_prompts,
            encoder_hidden_states_image=clip,
            condition_latents=driving_condition,
            kv_cache=kv_cache,
            kv_cache_mode="extract",
            seq_len=frames * side * side // 4,
            offset_grid_sizes=grid_ref,
        )
    return dict(
        hidden_states=[rand(Z_DIM, frames + 1, side, side) for _ in range(batch)],
        timestep=timestep,
        encoder_hidden_states=prompts,
        condition_latents=reference_latents,
        kv_cache=kv_cache,
        kv_cache_mode="cached",
        seq_len=(frames + 1) * side * side // 4,
        reference_grid_sizes=grid_ref,
        origin_len=5,
        origin_area=[64, 64],
        is_uncondtion=False,
        encoder_hidden_states_image=clip,
        return_dict=False,
    )


# ------------------------------------------------------------------------------------------------- Cosmos 3

COSMOS3_VOCAB, COSMOS3_TEXT_LEN, COSMOS3_LATENT = 64, 7, 4


def tiny_cosmos3_transformer(seed: int = 0):
    """Cosmos 3 omni (mixture-of-transformers): two decoder layers of hidden 16, 2 query heads x 8 and one K/V head
    (GQA), a causal text ("understanding") pathway and a generation pathway that attends to text and vision, 3-axis
    interleaved mRoPE (sections 2, 1, 1), 4 latent channels in 2 x 2 patches, a 64-token vocabulary."""
    from diffusers import Cosmos3OmniTransformer

    model = Cosmos3OmniTransformer(
        head_dim=8,
        hidden_size=16,
        intermediate_size=32,
        latent_channel=COSMOS3_LATENT,
        latent_patch_size=2,
        num_attention_heads=2,
        num_hidden_layers=2,
        num_key_value_heads=1,
        patch_latent_dim=4 * COSMOS3_LATENT,
        vocab_size=COSMOS3_VOCAB,
        rope_axes_dim=[2, 1, 1],
        dtype="float32",
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def cosmos3_call_kwargs(batch: int = 1, seed: int = 0) -> dict:
    """The first (conditional) transformer call of ``Cosmos3OmniPipeline`` for text to video, written by hand: the
    pipeline tokenizes prompt strings itself (a Qwen tokenizer, no ``prompt_embeds`` argument) and needs the Wan 2.2
    VAE. Follows its ``__call__`` (steps 3-7) through the pipeline's own ``_prepare_text_segment`` and
    ``_prepare_vision_segment`` (on a stand-in holding the tiny transformer): 7 random token ids, latents
    ``[1, 4, 2, 8, 8]`` (5 frames of 128x128, factors 4 / 16), all frames noisy, fps 24, every vision token at the
    timestep ``999.0`` (the transformer scales it by 0.001). One video per call (the model packs one batch-less
    joint sequence), so ``batch`` must be 1."""
    import types

    from diffusers import Cosmos3OmniPipeline

    if batch != 1:
        raise ValueError("Cosmos3OmniPipeline generates one video per call")
    gen = torch.Generator().manual_seed(87_000 + seed)
    stand_in = types.SimpleNamespace(transformer=tiny_cosmos3_transformer(), vae_scale_factor_temporal=4)
    input_ids = torch.randint(0, COSMOS3_VOCAB, (COSMOS3_TEXT_LEN,), generator=gen).tolist()
    text = Cosmos3OmniPipeline._prepare_text_segment(stand_in, input_ids, device="cpu")
    latents = torch.randn(1, COSMOS3_LATENT, 2, 8, 8, generator=gen)
    vision = Cosmos3OmniPipeline._prepare_vision_segment(
        stand_in,
        input_vision_tokens=latents,
        has_image_condition=False,
        mrope_offset=text["vision_start_temporal_offset"],
        vision_fps=24.0,
        curr=text["und_len"],
        device="cpu",
        condition_frame_indexes=[],
    )
    return dict(
        input_ids=text["input_ids"],
        text_indexes=text["text_indexes"],
        position_ids=torch.cat([text["text_mrope_ids"], vision["vision_mrope_ids"]], dim=1),
        und_len=text["und_len"],
        sequence_length=text["und_len"] + vision["num_vision_tokens"],
        vision_tokens=[latents],
        vision_token_shapes=vision["vision_token_shapes"],
        vision_sequence_indexes=vision["vision_sequence_indexes"],
        vision_mse_loss_indexes=vision["vision_mse_loss_indexes"],
        vision_timesteps=torch.full((vision["num_noisy_vision_tokens"],), 999.0),
        vision_noisy_frame_indexes=vision["vision_noisy_frame_indexes"],
        return_dict=False,
    )


# ------------------------------------------------------------------------------------------------- SANA-WM

SANA_WM_LATENT, SANA_WM_CAPTION_DIM, SANA_WM_TEXT_LEN = 4, 24, 6


def tiny_sana_wm_transformer(seed: int = 0):
    """SANA-WM (camera-controlled world model, stage 1): two blocks of hidden 16 (2 heads x 8), block 0 a
    bidirectional gated-delta-net linear attention over frames, block 1 softmax attention (``softmax_every_n=2``),
    both with the UCPE camera branch and Plücker embeddings after attention; per-frame adaLN, patch (1, 1, 1), 4
    latent channels, GLUMBConv feed-forward with a temporal convolution."""
    from diffusers import SanaWMTransformer3DModel

    model = SanaWMTransformer3DModel(
        in_channels=SANA_WM_LATENT,
        num_layers=2,
        hidden_size=16,
        num_attention_heads=2,
        softmax_every_n=2,
        linear_head_dim=8,
        chunk_plucker_post_attn_blocks=2,
        caption_channels=SANA_WM_CAPTION_DIM,
        mlp_ratio=2.0,
        mixed_precision="fp32",
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def _tiny_ltx2_vae():
    """A tiny ``AutoencoderKLLTX2Video`` (LTX-2's layout: factors 32 spatial, 8 temporal; width 8, one layer per
    block, ``SANA_WM_LATENT`` channels), seeded: SanaWMPipeline encodes the first frame with it."""
    from diffusers import AutoencoderKLLTX2Video

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = AutoencoderKLLTX2Video(
            latent_channels=SANA_WM_LATENT,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1),
            spatial_compression_ratio=32,
            temporal_compression_ratio=8,
        )
    return vae.eval()


def tiny_sana_wm_pipeline(transformer=None):
    """SanaWMPipeline with the tiny LTX-2 VAE (it encodes the first frame) and a flow-match Euler scheduler, no
    Gemma-2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaWMPipeline

    pipe = SanaWMPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=_tiny_ltx2_vae(),
        transformer=transformer if transformer is not None else tiny_sana_wm_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sana_wm_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """One prompt (the pipeline generates one video per call; 6 valid tokens, the negative 2) with guidance batched
    (transformer batch 2), a random 192x128 first frame, 9 camera poses moving right and forward with intrinsics
    ``[96, 96, 96, 64]``: latents ``[2, 4, 2, 4, 6]``, N = 48, the first latent frame the clean anchor."""
    if batch != 1:
        raise ValueError("SanaWMPipeline generates one video per call")
    from PIL import Image

    gen = torch.Generator().manual_seed(88_000 + seed)
    rng = np.random.default_rng(88_000 + seed)
    c2w = np.tile(np.eye(4, dtype=np.float32), (9, 1, 1))
    c2w[:, 0, 3] = np.linspace(0.0, 0.4, 9)
    c2w[:, 2, 3] = np.linspace(0.0, 0.8, 9)

    def mask(valid: int) -> torch.Tensor:
        out = torch.zeros(1, SANA_WM_TEXT_LEN, dtype=torch.int64)
        out[:, :valid] = 1
        return out

    return dict(
        image=Image.fromarray(rng.integers(0, 256, (128, 192, 3), dtype=np.uint8)),
        prompt="",
        c2w=c2w,
        intrinsics=[96.0, 96.0, 96.0, 64.0],
        prompt_embeds=torch.randn(1, 1, SANA_WM_TEXT_LEN, SANA_WM_CAPTION_DIM, generator=gen),
        prompt_attention_mask=mask(SANA_WM_TEXT_LEN),
        negative_prompt_embeds=torch.randn(1, 1, SANA_WM_TEXT_LEN, SANA_WM_CAPTION_DIM, generator=gen),
        negative_prompt_attention_mask=mask(2),
        height=128,
        width=192,
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def sana_wm_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``SanaWMPipeline``: batch 2 is one video's negative and positive rows, batch 1
    the same video without guidance (latents, timestep and text are passed positionally)."""
    if batch not in (1, 2):
        raise ValueError("SanaWMPipeline generates one video per call: batch 2 with guidance, 1 without")
    pipe_kwargs = sana_wm_pipeline_kwargs(1, steps=4, seed=seed)
    if batch == 1:
        pipe_kwargs["guidance_scale"] = 1.0
    return transformer_call_kwargs(tiny_sana_wm_pipeline(), pipe_kwargs)


# ------------------------------------------------------------------------------------------------- SANA-WM refiner

REFINER_LATENT, REFINER_CAPTION_DIM, REFINER_TEXT_LEN = 4, 24, 6


def tiny_sana_wm_refiner_transformer(seed: int = 0):
    """SANA-WM's stage-2 refiner (LTX-2 blocks, video stream only, self-attention over ``[sink + history +
    current]`` K/V from a ``SanaWMRefinerKVCache``): two blocks of 2 heads x 8 over packed tokens of 4 channels
    (patch 1), text width 24; the audio modules exist (their weights round-trip) but never run."""
    from diffusers import SanaWMLTX2RefinerTransformer3DModel

    model = SanaWMLTX2RefinerTransformer3DModel(
        in_channels=REFINER_LATENT,
        out_channels=REFINER_LATENT,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=8,
        audio_out_channels=8,
        audio_num_attention_heads=2,
        audio_attention_head_dim=8,
        audio_cross_attention_dim=16,
        num_layers=2,
        caption_channels=REFINER_CAPTION_DIM,
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def sana_wm_refiner_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first denoising call (``kv_cache_mode="inject"``) of ``SanaWMLTX2Refiner`` on its first AR block, written
    by hand: the refiner always runs its Gemma-3 tokenizer, text encoder and LTX-2 connectors (no ``prompt_embeds``
    argument). Follows its ``__call__`` (steps 3-4) with its own helpers: a stage-1 latent ``[B, 4, 4, 4, 4]``, the
    sink (``sink_size=1``) captured pre-RoPE at sigma 0 by ``_capture_block_kv`` (on a stand-in holding the seed-0
    tiny model, so that the cache matches ``tiny_sana_wm_refiner_transformer()``), the sink RoPE and the block's
    RoPE from ``build_rotary_emb_for_absolute_positions`` (fps 16), the block of ``block_size=3`` frames at the first
    distilled sigma 0.909375 packed by ``_pack_latents``: tokens ``[B, 48, 4]``, timestep ``1000 * sigma`` per
    token. The connectors' text mask is all ones (LTX-2 fills padding with learned registers). One call per step,
    no guidance."""
    import types

    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache
    from diffusers.pipelines.sana_wm.refiner import STAGE_2_DISTILLED_SIGMA_VALUES, SanaWMLTX2Refiner, _pack_latents

    sink_size, block_size, fps, cpu = 1, 3, 16.0, torch.device("cpu")
    gen = torch.Generator().manual_seed(89_000 + seed)
    model = tiny_sana_wm_refiner_transformer()
    stage1 = torch.randn(batch, REFINER_LATENT, sink_size + block_size, 4, 4, generator=gen)
    prompt_embeds = torch.randn(batch, REFINER_TEXT_LEN, REFINER_CAPTION_DIM, generator=gen)
    prompt_mask = torch.ones(batch, REFINER_TEXT_LEN, dtype=torch.int64)
    height, width = stage1.shape[-2:]
    kv_cache = SanaWMRefinerKVCache(len(model.transformer_blocks))
    with torch.no_grad():
        SanaWMLTX2Refiner._capture_block_kv(
            types.SimpleNamespace(transformer=model),
            clean_block=stage1[:, :, :sink_size].contiguous(),
            frame_positions=list(range(sink_size)),
            prompt_embeds=prompt_embeds,
            prompt_attention_mask=prompt_mask,
            fps=fps,
            kv_cache=kv_cache,
            kv_cache_mode="capture_pre_rope",
            device=cpu,
        )
        for layer in kv_cache.layer_caches:
            layer.store_sink(*layer.get_captured_pre_rope())
        # block 0: no history yet, so the sink's RoPE offset is 0
        kv_cache.sink_pe = model.build_rotary_emb_for_absolute_positions(
            batch_size=batch, frame_positions=list(range(sink_size)), height=height, width=width, device=cpu, fps=fps
        )
        sigma = STAGE_2_DISTILLED_SIGMA_VALUES[0]
        clean_block = stage1[:, :, sink_size:]
        noise = torch.randn(clean_block.shape, generator=gen)
        tokens = _pack_latents((1.0 - sigma) * clean_block + sigma * noise)
        rotary = model.build_rotary_emb_for_absolute_positions(
            batch_size=batch,
            frame_positions=list(range(sink_size, sink_size + block_size)),
            height=height,
            width=width,
            device=cpu,
            fps=fps,
        )
    return dict(
        hidden_states=tokens,
        encoder_hidden_states=prompt_embeds,
        timestep=torch.full(tokens.shape[:2], sigma * float(model.config.timestep_scale_multiplier)),
        video_rotary_emb=rotary,
        encoder_attention_mask=prompt_mask,
        kv_cache=kv_cache,
        kv_cache_mode="inject",
        return_dict=False,
    )
