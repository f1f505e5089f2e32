"""Tiny, seeded, download-free DiTs of diffusers' classes whose token layouts rascompile's rules do not read yet:
ERNIE-Image, Kandinsky 5, Latte, Ideogram 4, AnyFlow (bidirectional and FAR causal) and Z-Image.

Conventions as :mod:`models_image_newer`: one or two blocks, 2 heads x 8 (hidden 16) where the class allows, N = 32
to 64 image tokens, parameters re-drawn with ``_reinit_``; the call kwargs are read from the real pipeline's first
transformer call (``capture.transformer_call_kwargs``) except for Ideogram 4, whose pipeline always runs its text
encoder (written by hand from the pipeline's own lines).

ERNIE-Image batches guidance (``[negative; positive]`` rows), float timesteps ``sigma * 1000``, latents
``[B, C, H, W]`` (no VAE: scale 16) and the text as one zero-padded ``text_bth`` with ``text_lens`` (the model builds
a boolean key mask from them); here the negative prompts are 3 tokens, the positive 5. Kandinsky 5 (text to video)
calls its transformer once per guidance branch, channel-last latents ``[B, F, H, W, C]``, float timesteps
``sigma * 1000``, RoPE positions as a list of ``arange`` tensors and ``sparse_params=None`` (regular attention).
Latte batches guidance, DDIM int64 timesteps (up to 999), latents ``[B, C, F, H, W]``, learned sigma (8 output
channels, the pipeline keeps the first 4), no text mask. Ideogram 4 runs two transformers per step: the conditional
one on a packed ``[left-pad][text][image]`` sequence ``[B, L + N, C]`` with ``indicator``/``segment_ids``/
``position_ids``, the unconditional one (another model) on the image tokens alone; timestep ``1 - sigma`` (0 is
noise). AnyFlow takes ``[B, F, C, H, W]`` latents, a per-frame timestep ``[B, F]`` (``sigma * 1000``) and the target
timestep ``r_timestep``; its checkpoints fold guidance into the weights (``guidance_scale=1``: one call per step).
AnyFlow-FAR generates chunk by chunk with a K/V cache; its first call denoises the first chunk (one latent frame).
Z-Image takes lists: ``x`` a list of ``[C, 1, H, W]`` latents, ``cap_feats`` a list of ``[L_i, D]`` captions, batches
guidance as ``[positive; negative]`` and passes ``t = 1 - sigma`` (scaled by 1000 inside: 0 is noise).
"""

from __future__ import annotations

import torch

from tests.support.capture import transformer_call_kwargs
from tests.support.models import TINY_WAN_CONFIG, WAN_TEXT_DIM, WAN_TEXT_LEN, _reinit_
from tests.support.models_image import _smooth_timestep_embedding_

HEADS, HEAD_DIM, TEXT_DIM, TEXT_LEN = 2, 8, 24, 5


def _disabled(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ERNIE-Image --------------------------------------------------------------------------------------------------------


def tiny_ernie_image_transformer(seed: int = 0):
    """ERNIE-Image: two shared-AdaLN blocks, hidden 16 (2 heads x 8), patch 1, 8 latent channels, 3-axis RoPE
    (2, 2, 4)."""
    from diffusers import ErnieImageTransformer2DModel

    model = ErnieImageTransformer2DModel(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_layers=2,
        ffn_hidden_size=32,
        in_channels=8,
        out_channels=8,
        patch_size=1,
        text_in_dim=TEXT_DIM,
        rope_axes_dim=(2, 2, 4),
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_ernie_image_pipeline(transformer=None):
    """ErnieImagePipeline with a flow-matching scheduler, no VAE (scale 16), no Mistral3 text encoder or tokenizer."""
    from diffusers import ErnieImagePipeline, FlowMatchEulerDiscreteScheduler

    return _disabled(
        ErnieImagePipeline(
            transformer=transformer if transformer is not None else tiny_ernie_image_transformer(),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            scheduler=FlowMatchEulerDiscreteScheduler(),
        )
    )


def ernie_image_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens and negative prompts of 3 (guidance 4, batched; the text is padded to 5 and
    masked), 128 px: 8x8 latents, N = 64."""
    gen = torch.Generator().manual_seed(80_000 + seed)
    return dict(
        prompt_embeds=[torch.randn(TEXT_LEN, TEXT_DIM, generator=gen) for _ in range(batch)],
        negative_prompt_embeds=[torch.randn(3, TEXT_DIM, generator=gen) for _ in range(batch)],
        guidance_scale=4.0,
        height=128,
        width=128,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
        use_pe=False,
    )


def ernie_image_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``ErnieImagePipeline``: ``batch`` rows, the negative and positive halves of
    ``batch // 2`` prompts."""
    pipe = tiny_ernie_image_pipeline()
    return transformer_call_kwargs(pipe, ernie_image_pipeline_kwargs(max(1, batch // 2), steps=4, seed=seed))


# Kandinsky 5 --------------------------------------------------------------------------------------------------------

KANDINSKY_POOLED_DIM = 12


def tiny_kandinsky5_transformer(seed: int = 0):
    """Kandinsky 5: one text block and two visual blocks, hidden 16 (2 heads x 8, RoPE axes (2, 2, 4)), patch
    (1, 2, 2), 4 latent channels, regular (not sparse) attention."""
    from diffusers import Kandinsky5Transformer3DModel

    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4,
        out_visual_dim=4,
        in_text_dim=TEXT_DIM,
        in_text_dim2=KANDINSKY_POOLED_DIM,
        time_dim=16,
        patch_size=(1, 2, 2),
        model_dim=HEADS * HEAD_DIM,
        ff_dim=32,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(2, 2, 4),
        attention_type="regular",
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_kandinsky5_pipeline(transformer=None):
    """Kandinsky5T2VPipeline with a flow-matching scheduler, no VAE (factors 4 temporal, 8 spatial), no Qwen2.5-VL
    or CLIP text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline

    return _disabled(
        Kandinsky5T2VPipeline(
            transformer=transformer if transformer is not None else tiny_kandinsky5_transformer(),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        )
    )


def kandinsky5_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 Qwen tokens plus pooled CLIP vectors, and negative ones (guidance 5: two calls per
    step), 5 frames of 64x64 px: latents ``[B, 2, 8, 8, 4]``, N = 2 * 4 * 4 = 32."""
    gen = torch.Generator().manual_seed(81_000 + seed)
    lengths = torch.full((batch,), TEXT_LEN, dtype=torch.int32)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    return dict(
        prompt_embeds_qwen=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        prompt_embeds_clip=torch.randn(batch, KANDINSKY_POOLED_DIM, generator=gen),
        prompt_cu_seqlens=cu_seqlens,
        negative_prompt_embeds_qwen=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_embeds_clip=torch.randn(batch, KANDINSKY_POOLED_DIM, generator=gen),
        negative_prompt_cu_seqlens=cu_seqlens.clone(),
        guidance_scale=5.0,
        height=64,
        width=64,
        num_frames=5,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def kandinsky5_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``Kandinsky5T2VPipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_kandinsky5_pipeline(), kandinsky5_pipeline_kwargs(batch, steps=4, seed=seed))


# Latte --------------------------------------------------------------------------------------------------------------


def tiny_latte_transformer(seed: int = 0):
    """Latte: two spatial and two temporal blocks, hidden 16 (2 heads x 8), patch 2, 4 latent channels, learned sigma
    (8 output channels), AdaLN-single, 3 frames of temporal position table, a 6x6 token grid (sample size 12): the
    sizes B*F, N, B*N and the hidden width all differ, so no shape literal is ambiguous. Its 256-channel timestep
    embedder is smoothed (``models_image._smooth_timestep_embedding_``): unsmoothed, the random model's prediction
    for a site changes by 70-115 % from one DDIM step to the next, so no reuse could hold."""
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=HEADS * HEAD_DIM,
        sample_size=12,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=TEXT_DIM,
        video_length=3,
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    _smooth_timestep_embedding_(model)
    return model.eval()


def tiny_latte_pipeline(transformer=None):
    """LattePipeline with a DDIM scheduler, no VAE (scale 8), no T5 text encoder or tokenizer. DDIM without sample
    clipping: clipping the random tiny model's x0 estimate at +-1 saturates it, and a small difference in the noise
    prediction becomes a flip from one bound to the other (a whole 8-step generation under RAS at ratio 0.9 then
    differs from dense by 0.29 relative, unclipped by 0.007)."""
    from diffusers import DDIMScheduler, LattePipeline

    return _disabled(
        LattePipeline(
            tokenizer=None,
            text_encoder=None,
            vae=None,
            transformer=transformer if transformer is not None else tiny_latte_transformer(),
            scheduler=DDIMScheduler(clip_sample=False),
        )
    )


def latte_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens and their negative prompts (guidance 7.5, batched), 3 latent frames of 96x96 px:
    latents ``[B, 4, 3, 12, 12]``, 36 spatial sites per frame."""
    gen = torch.Generator().manual_seed(82_000 + seed)
    return dict(
        negative_prompt=None,
        prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        negative_prompt_embeds=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=gen),
        guidance_scale=7.5,
        video_length=3,
        height=96,
        width=96,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        clean_caption=False,
        output_type="latent",
        return_dict=False,
    )


def latte_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``LattePipeline``: ``batch`` rows, the negative and positive halves of
    ``batch // 2`` prompts."""
    return transformer_call_kwargs(tiny_latte_pipeline(), latte_pipeline_kwargs(max(1, batch // 2), steps=4, seed=seed))


# Ideogram 4 ---------------------------------------------------------------------------------------------------------

IDEOGRAM_LATENT_DIM, IDEOGRAM_GRID = 8, 8


def tiny_ideogram4_transformer(seed: int = 0):
    """Ideogram 4: two blocks, hidden 16 (2 heads x 8), 8 packed latent channels, text features of width 24,
    interleaved MRoPE sections (2, 1, 1)."""
    from diffusers import Ideogram4Transformer2DModel

    model = Ideogram4Transformer2DModel(
        in_channels=IDEOGRAM_LATENT_DIM,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        intermediate_size=32,
        adaln_dim=16,
        llm_features_dim=TEXT_DIM,
        mrope_section=(2, 1, 1),
    )
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def _ideogram4_inputs(batch: int, seed: int, text_lengths=None) -> dict:
    """The packed inputs ``Ideogram4Pipeline.__call__`` builds before its first step (pipeline_ideogram4.py,
    ``encode_prompt`` and ``_prepare_ids`` for the layout, then steps 4-8 of ``__call__``): 8x8 tokens (256 px),
    ``max_sequence_length`` 5, prompts of 5 and 3 tokens (left-padded), the default logit-normal schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import _logit_normal_sigmas, _resolution_aware_mu

    gen = torch.Generator().manual_seed(83_000 + seed)
    lengths = list(text_lengths or [TEXT_LEN if b % 2 == 0 else 3 for b in range(batch)])
    max_len, n = TEXT_LEN, IDEOGRAM_GRID * IDEOGRAM_GRID
    position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids(
        lengths, IDEOGRAM_GRID, IDEOGRAM_GRID, max_len, torch.device("cpu")
    )
    # encode_prompt: the tapped text features, zero at the left padding, then zero rows for the image tokens.
    text = torch.randn(batch, max_len, TEXT_DIM, generator=gen)
    valid = torch.stack([torch.arange(max_len) >= max_len - length for length in lengths])
    text = text * valid.unsqueeze(-1)
    llm_features = torch.cat([text, torch.zeros(batch, n, TEXT_DIM)], dim=1)
    # The schedule of __call__ (mu = 0, std = 1.5, 256 px) and the first step's model time 1 - t / 1000.
    scheduler = FlowMatchEulerDiscreteScheduler()
    mu = _resolution_aware_mu(height=256, width=256, base_mu=0.0)
    scheduler.set_timesteps(sigmas=_logit_normal_sigmas(8, mu, std=1.5).tolist())
    t_model = (1.0 - scheduler.timesteps[0].float() / scheduler.config.num_train_timesteps).expand(batch)
    latents = torch.randn(batch, n, IDEOGRAM_LATENT_DIM, generator=gen)
    return dict(
        latents=latents,
        t_model=t_model,
        llm_features=llm_features,
        position_ids=position_ids,
        segment_ids=segment_ids,
        indicator=indicator,
        max_len=max_len,
    )


def ideogram4_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The conditional transformer's first call of ``Ideogram4Pipeline`` (pipeline_ideogram4.py, the ``pos_out``
    call of the denoising loop): the packed ``[left-pad][text][image]`` sequence ``[B, 5 + 64, 8]``, the text
    region of ``hidden_states`` zero, the image region of ``encoder_hidden_states`` zero. Written by hand: the
    pipeline always runs its Qwen3-VL text encoder on prompt strings."""
    inputs = _ideogram4_inputs(batch, seed)
    zeros = torch.zeros(batch, inputs["max_len"], IDEOGRAM_LATENT_DIM)
    return dict(
        hidden_states=torch.cat([zeros, inputs["latents"]], dim=1),
        timestep=inputs["t_model"],
        encoder_hidden_states=inputs["llm_features"],
        position_ids=inputs["position_ids"],
        segment_ids=inputs["segment_ids"],
        indicator=inputs["indicator"],
        attention_kwargs=None,
        return_dict=False,
    )


def ideogram4_unconditional_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The unconditional transformer's first call (the ``neg_v`` call): image tokens only ``[B, 64, 8]``, zero
    text features, the image slices of the layout."""
    inputs = _ideogram4_inputs(batch, seed)
    n, cut = IDEOGRAM_GRID * IDEOGRAM_GRID, inputs["max_len"]
    return dict(
        hidden_states=inputs["latents"],
        timestep=inputs["t_model"],
        encoder_hidden_states=torch.zeros(batch, n, TEXT_DIM),
        position_ids=inputs["position_ids"][:, cut:],
        segment_ids=inputs["segment_ids"][:, cut:],
        indicator=inputs["indicator"][:, cut:],
        attention_kwargs=None,
        return_dict=False,
    )


def tiny_ideogram4_pipeline(transformer=None):
    """The real ``Ideogram4Pipeline`` loop (packing, asymmetric guidance with its second transformer, the
    logit-normal schedule) without its Qwen3-VL encoder or VAE: ``encode_prompt`` returns the packed conditioning
    of ``_ideogram4_inputs`` (random text features of 5 and 3 tokens, left-padded), and generations stop at the
    latents (no VAE: scale 8, so 128 px is an 8x8 token grid)."""
    import types

    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline

    def encode_prompt(self, prompt, grid_h, grid_w, max_sequence_length, device):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        lengths = [TEXT_LEN if b % 2 == 0 else 3 for b in range(len(prompts))]
        inputs = _ideogram4_inputs(len(prompts), seed=0, text_lengths=lengths)
        return inputs["llm_features"], inputs["position_ids"], inputs["segment_ids"], inputs["indicator"]

    pipe = Ideogram4Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer if transformer is not None else tiny_ideogram4_transformer(0),
        unconditional_transformer=tiny_ideogram4_transformer(1),
    )
    pipe.encode_prompt = types.MethodType(encode_prompt, pipe)
    return _disabled(pipe)


def ideogram4_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    return dict(
        prompt=["a red cube", "a blue ball"][:batch] if batch <= 2 else ["a red cube"] * batch,
        height=IDEOGRAM_GRID * 16,
        width=IDEOGRAM_GRID * 16,
        num_inference_steps=steps,
        guidance_scale=4.0,
        guidance_schedule=None,
        max_sequence_length=TEXT_LEN,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


# AnyFlow ------------------------------------------------------------------------------------------------------------


def tiny_anyflow_transformer(seed: int = 0):
    """AnyFlow (bidirectional): the tiny Wan 2.1 sizes (``TINY_WAN_CONFIG``) with the dual-timestep embedding."""
    from diffusers import AnyFlowTransformer3DModel

    model = AnyFlowTransformer3DModel(**TINY_WAN_CONFIG)
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_anyflow_pipeline(transformer=None):
    """AnyFlowPipeline with the flow-map Euler scheduler, no VAE (factors 4 temporal, 8 spatial), no UMT5."""
    from diffusers import AnyFlowPipeline, FlowMapEulerDiscreteScheduler

    return _disabled(
        AnyFlowPipeline(
            tokenizer=None,
            text_encoder=None,
            transformer=transformer if transformer is not None else tiny_anyflow_transformer(),
            vae=None,
            scheduler=FlowMapEulerDiscreteScheduler(),
        )
    )


def anyflow_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts, guidance 1 (the released checkpoints fold guidance in: one call per step), 5 frames of
    64x64 px: latents ``[B, 2, 4, 8, 8]`` as the transformer sees them, N = 32."""
    gen = torch.Generator().manual_seed(84_000 + seed)
    return dict(
        prompt_embeds=torch.randn(batch, WAN_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        height=64,
        width=64,
        num_frames=5,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def anyflow_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``AnyFlowPipeline`` for ``batch`` prompts."""
    return transformer_call_kwargs(tiny_anyflow_pipeline(), anyflow_pipeline_kwargs(batch, steps=4, seed=seed))


def tiny_anyflow_far_transformer(seed: int = 0):
    """AnyFlow-FAR (causal): the tiny Wan 2.1 sizes, compressed patch (1, 4, 4), chunks of (1, 2) latent frames."""
    from diffusers import AnyFlowFARTransformer3DModel

    model = AnyFlowFARTransformer3DModel(**TINY_WAN_CONFIG, compressed_patch_size=(1, 4, 4), chunk_partition=(1, 2))
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_anyflow_far_pipeline(transformer=None):
    """AnyFlowFARPipeline with the flow-map Euler scheduler, no VAE, no UMT5."""
    from diffusers import AnyFlowFARPipeline, FlowMapEulerDiscreteScheduler

    return _disabled(
        AnyFlowFARPipeline(
            tokenizer=None,
            text_encoder=None,
            transformer=transformer if transformer is not None else tiny_anyflow_far_transformer(),
            vae=None,
            scheduler=FlowMapEulerDiscreteScheduler(),
        )
    )


def anyflow_far_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts, guidance 1, 9 frames of 64x128 px: 3 latent frames of 8x16 in chunks (1, 2); the first
    call denoises chunk 0, N = 4 * 8 = 32 tokens."""
    gen = torch.Generator().manual_seed(85_000 + seed)
    return dict(
        prompt_embeds=torch.randn(batch, WAN_TEXT_LEN, WAN_TEXT_DIM, generator=gen),
        height=64,
        width=128,
        num_frames=9,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def anyflow_far_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``AnyFlowFARPipeline`` (chunk 0, an empty K/V cache) for ``batch`` prompts."""
    pipe = tiny_anyflow_far_pipeline()
    return transformer_call_kwargs(pipe, anyflow_far_pipeline_kwargs(batch, steps=4, seed=seed))


# Z-Image ------------------------------------------------------------------------------------------------------------


def tiny_z_image_transformer(seed: int = 0):
    """Z-Image: one noise-refiner, one context-refiner and two main blocks, hidden 16 (2 heads x 8, RoPE axes
    (2, 2, 4)), patch 2, 4 latent channels. Its RoPE table is built here, as the model's first call would build it
    (``warm_z_image_rope_``): built inside a compiled call, under ``with torch.device("cpu")``, it breaks the graph
    there, and Dynamo keeps that split for every later call. Its timestep embedder is scaled as if 16 wide (as
    Bria FIBO 2's in ``models_pieces``): unscaled, the prediction changed by 100-190 % from one step to the next."""
    from diffusers import ZImageTransformer2DModel

    model = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=HEADS * HEAD_DIM,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=HEADS,
        n_kv_heads=HEADS,
        cap_feat_dim=TEXT_DIM,
        axes_dims=[2, 2, 4],
        axes_lens=[64, 32, 32],
    )
    _reinit_(model, seed, std=0.15, qk_std=0.3)
    with torch.no_grad():
        # 256 sinusoids through a 1024-wide layer, as Bria FIBO 2's (models_pieces): scaled as if 16 wide
        first, last = model.t_embedder.mlp[0], model.t_embedder.mlp[2]
        first.weight.mul_((16 / first.in_features) ** 0.5)
        last.weight.mul_((16 / last.in_features) ** 0.5)
    return warm_z_image_rope_(model.eval())


def warm_z_image_rope_(model):
    """Build Z-Image's lazily built RoPE table now (what its first call does), so that a compiled call traces the
    whole transformer as one graph; what a user does by running one generation before compiling."""
    rope = model.rope_embedder
    rope.freqs_cis = rope.precompute_freqs_cis(rope.axes_dims, rope.axes_lens, theta=rope.theta)
    return model


def tiny_z_image_pipeline(transformer=None):
    """ZImagePipeline with a flow-matching scheduler, no VAE (scale 8, x2 patch), no Qwen3 text encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    return _disabled(
        ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            transformer=transformer if transformer is not None else tiny_z_image_transformer(),
        )
    )


def z_image_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """``batch`` prompts of 5 tokens and negative prompts of 3 (lists of ``[L, D]``; guidance 4, batched), 128 px:
    latents 16x16, N = 64."""
    gen = torch.Generator().manual_seed(86_000 + seed)
    return dict(
        prompt_embeds=[torch.randn(TEXT_LEN, TEXT_DIM, generator=gen) for _ in range(batch)],
        negative_prompt_embeds=[torch.randn(3, TEXT_DIM, generator=gen) for _ in range(batch)],
        guidance_scale=4.0,
        height=128,
        width=128,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )


def z_image_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``ZImagePipeline``: ``batch`` rows, the positive and negative halves of
    ``batch // 2`` prompts. The pipeline passes ``x``, ``t`` and ``cap_feats`` positionally; here by name."""
    pipe = tiny_z_image_pipeline()
    seen = {}

    def hook(module, args, kwargs):
        names = ("x", "t", "cap_feats")
        seen.update({k: _clone(v) for k, v in {**dict(zip(names, args)), **kwargs}.items()})
        raise _Stop

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**z_image_pipeline_kwargs(max(1, batch // 2), steps=4, seed=seed))
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen


class _Stop(Exception):
    pass


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value
