"""The model families of ``rascompile bench --model``: how each transformer is built, what its diffusers pipeline
hands it per call, and the pipeline's denoising loop.

* ``sd3``: ``SD3Transformer2DModel`` (MMDiT, joint blocks); latents [B, C, H, W], patch 2; classifier-free
  guidance batched: one call of batch 2 per step (``StableDiffusion3Pipeline``).
* ``flux``: ``FluxTransformer2DModel`` (double-stream blocks, then single-stream blocks over the joint
  [text; image] sequence, RoPE over it from ``txt_ids``/``img_ids``); latents packed 2x2 into [B, N, 4C];
  guidance-distilled (a guidance embedding, no CFG batch): one call of batch 1 per step (``FluxPipeline``).
* ``wan``: ``WanTransformer3DModel`` (self-attention with 3-D RoPE, cross-attention to the text); video latents
  [B, C, F, H, W], patch (1, 2, 2); ``WanPipeline`` calls the transformer once per guidance branch (batch 1,
  the text first, then the negative text), so a step is two calls.

The inputs are built as those pipelines build them (latent layout, position ids, timestep scale, guidance);
the weights are random (see :func:`randomize_`). Sizes are scaled-down, CPU-friendly versions of each family.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Per family: the ``BenchSettings`` fields whose defaults differ from the SD3 ones.
MODEL_DEFAULTS: dict[str, dict] = {
    "sd3": {},
    "flux": dict(
        layers=2,
        single_layers=4,
        latent_size=64,
        text_tokens=128,
        joint_dim=768,
        pooled_dim=768,
        guidance_scale=3.5,
    ),
    "wan": dict(
        layers=4,
        frames=4,
        latent_size=32,
        text_tokens=128,
        joint_dim=768,
        guidance_scale=5.0,
    ),
}

#: Per family: what ``--smoke`` changes beyond ``bench.SMOKE`` (the tiny SD3 sizes).
MODEL_SMOKE: dict[str, dict] = {
    "sd3": {},
    "flux": dict(layers=1, single_layers=1),
    "wan": dict(frames=2, latent_size=8),
}

MODELS = tuple(MODEL_DEFAULTS)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter (diffusers zero-initialises some layers): matrices ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.02^2), biases ~ N(0, 0.02^2), from one seeded generator in parameter order."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() >= 2:
                value = noise / math.sqrt(param[0].numel())
            elif name.endswith("weight"):
                value = 1.0 + 0.02 * noise
            else:
                value = 0.02 * noise
            param.copy_(value.to(param.dtype))
    return model


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


# ============================================================================================ SD3


@dataclass
class Inputs:
    """SD3: the prompt inputs of one image with classifier-free guidance."""

    latents: torch.Tensor  # [1, C, H, W]: one image, duplicated for CFG
    prompt_embeds: torch.Tensor  # [2, L, joint_dim]: negative; positive
    pooled: torch.Tensor  # [2, pooled_dim]


class BenchModel:
    """One family. ``s`` is a ``BenchSettings``; ``inputs`` what :meth:`make_inputs` returned."""

    name = ""
    class_name = ""
    #: transformer calls per denoising step (one per guidance branch for pipelines that call it per branch)
    calls_per_step = 1
    guidance = ""

    def build(self, s) -> torch.nn.Module:
        raise NotImplementedError

    def make_inputs(self, s):
        raise NotImplementedError

    def call_kwargs(self, s, inputs, latents: torch.Tensor, t: torch.Tensor, branch: int = 0) -> dict:
        """The keyword arguments of the transformer call of guidance branch ``branch`` at timestep ``t`` (a
        scheduler timestep) for the current ``latents`` (the pipeline's latents, one image)."""
        raise NotImplementedError

    def combine(self, s, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The prediction the scheduler steps with, from the outputs of the step's calls."""
        raise NotImplementedError

    def make_scheduler(self, s):
        raise NotImplementedError

    def set_timesteps(self, s, scheduler, steps: int) -> None:
        scheduler.set_timesteps(steps)

    def describe(self, s) -> str:
        raise NotImplementedError

    def shapes(self, s) -> dict:
        """The sizes of the model and its latents, for the report's JSON."""
        return {
            "layers": s.layers,
            "hidden": s.hidden,
            "heads": s.heads,
            "head_dim": s.head_dim,
            "latent_size": s.latent_size,
            "num_tokens": s.num_tokens,
            "text_tokens": s.text_tokens,
            "batch": s.batch,
        }

    def denoise(self, transformer: Callable, s, inputs, steps: int, on_step=None) -> torch.Tensor:
        """The pipeline's denoising loop around ``transformer``; returns the final latents."""
        scheduler = self.make_scheduler(s)
        self.set_timesteps(s, scheduler, steps)
        x = inputs.latents
        for t in scheduler.timesteps:
            outs = [transformer(**self.call_kwargs(s, inputs, x, t, b))[0] for b in range(self.calls_per_step)]
            x = scheduler.step(self.combine(s, outs), t, x, return_dict=False)[0]
            if on_step is not None:
                on_step()
        return x


class SD3(BenchModel):
    name = "sd3"
    class_name = "SD3Transformer2DModel"
    guidance = "CFG batch 2"

    def build(self, s) -> torch.nn.Module:
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel(
            sample_size=s.latent_size,
            patch_size=s.patch,
            in_channels=s.latent_channels,
            num_layers=s.layers,
            attention_head_dim=s.head_dim,
            num_attention_heads=s.heads,
            joint_attention_dim=s.joint_dim,
            caption_projection_dim=s.hidden,
            pooled_projection_dim=s.pooled_dim,
            out_channels=s.latent_channels,
            pos_embed_max_size=max(96, s.latent_size // s.patch),
        )
        return randomize_(model, s.seed).eval()

    def make_inputs(self, s) -> Inputs:
        gen = torch.Generator().manual_seed(s.seed + 1)
        return Inputs(
            latents=torch.randn(1, s.latent_channels, s.latent_size, s.latent_size, generator=gen),
            prompt_embeds=torch.randn(2, s.text_tokens, s.joint_dim, generator=gen),
            pooled=torch.randn(2, s.pooled_dim, generator=gen),
        )

    def call_kwargs(self, s, inputs, latents, t, branch=0) -> dict:
        # StableDiffusion3Pipeline: latents duplicated for CFG, the scheduler's timestep (0..1000) expanded
        return dict(
            hidden_states=torch.cat([latents, latents]),
            timestep=t.expand(2),
            encoder_hidden_states=inputs.prompt_embeds,
            pooled_projections=inputs.pooled,
            return_dict=False,
        )

    def combine(self, s, outputs):
        uncond, cond = outputs[0].chunk(2)
        return uncond + s.guidance_scale * (cond - uncond)

    def make_scheduler(self, s):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(shift=3.0)

    def describe(self, s) -> str:
        return (
            f"SD3Transformer2DModel, random weights, {s.layers} layers, hidden {s.hidden} ({s.heads} heads x "
            f"{s.head_dim}), {s.latent_channels}x{s.latent_size}x{s.latent_size} latents = {s.num_tokens} image "
            f"tokens, {s.text_tokens} text tokens, CFG batch {s.batch}, fp32, no_grad"
        )

    def shapes(self, s) -> dict:
        return super().shapes(s) | {"patch": s.patch, "in_channels": s.latent_channels, "joint_dim": s.joint_dim}


# ============================================================================================ Flux


@dataclass
class FluxInputs:
    latents: torch.Tensor  # [1, N, 4C]: packed 2x2 (FluxPipeline._pack_latents)
    prompt_embeds: torch.Tensor  # [1, L, joint_dim] (T5)
    pooled: torch.Tensor  # [1, pooled_dim] (CLIP)
    txt_ids: torch.Tensor  # [L, 3], zeros
    img_ids: torch.Tensor  # [N, 3]: (0, row, column)
    guidance: torch.Tensor  # [1]: the guidance scale, embedded by the guidance-distilled model


def flux_pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``FluxPipeline._pack_latents``: [B, C, H, W] -> [B, (H/2)(W/2), 4C]."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def flux_image_ids(height: int, width: int) -> torch.Tensor:
    """``FluxPipeline._prepare_latent_image_ids`` for a packed grid of ``height`` x ``width``: [H*W, 3]."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def flux_shift(image_seq_len: int, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """``diffusers.pipelines.flux.pipeline_flux.calculate_shift`` with FLUX.1's scheduler config."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def flux_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE channels per position axis (text/frame, row, column), in FLUX.1's proportions (16, 56, 56 of 128),
    each even."""
    t = 2 * max(1, round(head_dim / 16))
    h = (head_dim - t) // 2 // 2 * 2
    return t, h, head_dim - t - h


class Flux(BenchModel):
    name = "flux"
    class_name = "FluxTransformer2DModel"
    guidance = "guidance-distilled, batch 1"

    def build(self, s) -> torch.nn.Module:
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * s.latent_channels,
            num_layers=s.layers,
            num_single_layers=s.single_layers,
            attention_head_dim=s.head_dim,
            num_attention_heads=s.heads,
            joint_attention_dim=s.joint_dim,
            pooled_projection_dim=s.pooled_dim,
            guidance_embeds=True,
            axes_dims_rope=flux_rope_axes(s.head_dim),
        )
        return randomize_(model, s.seed).eval()

    def make_inputs(self, s) -> FluxInputs:
        gen = torch.Generator().manual_seed(s.seed + 1)
        grid = s.latent_size // 2
        noise = torch.randn(1, s.latent_channels, s.latent_size, s.latent_size, generator=gen)
        return FluxInputs(
            latents=flux_pack_latents(noise),
            prompt_embeds=torch.randn(1, s.text_tokens, s.joint_dim, generator=gen),
            pooled=torch.randn(1, s.pooled_dim, generator=gen),
            txt_ids=torch.zeros(s.text_tokens, 3),
            img_ids=flux_image_ids(grid, grid),
            guidance=torch.full([1], s.guidance_scale, dtype=torch.float32).expand(1),
        )

    def call_kwargs(self, s, inputs, latents, t, branch=0) -> dict:
        # FluxPipeline: the scheduler's timestep (0..1000) divided by 1000, the guidance scale as a tensor
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        return dict(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=inputs.guidance,
            pooled_projections=inputs.pooled,
            encoder_hidden_states=inputs.prompt_embeds,
            txt_ids=inputs.txt_ids,
            img_ids=inputs.img_ids,
            joint_attention_kwargs={},
            return_dict=False,
        )

    def combine(self, s, outputs):
        return outputs[0]

    def make_scheduler(self, s):
        from diffusers import FlowMatchEulerDiscreteScheduler

        # FLUX.1-dev's scheduler config
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )

    def set_timesteps(self, s, scheduler, steps: int) -> None:
        import numpy as np

        sigmas = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(steps, sigmas=sigmas, mu=flux_shift(s.num_tokens))

    def describe(self, s) -> str:
        grid = s.latent_size // 2
        return (
            f"FluxTransformer2DModel, random weights, {s.layers} double-stream + {s.single_layers} single-stream "
            f"blocks, hidden {s.hidden} ({s.heads} heads x {s.head_dim}, RoPE axes "
            f"{'/'.join(map(str, flux_rope_axes(s.head_dim)))}), {s.latent_channels}x{s.latent_size}x"
            f"{s.latent_size} latents packed 2x2 = [1, {s.num_tokens}, {4 * s.latent_channels}] ({grid}x{grid} "
            f"image tokens), {s.text_tokens} text tokens, guidance embedding {s.guidance_scale:g}, batch "
            f"{s.batch} (guidance-distilled: no CFG batch), fp32, no_grad"
        )

    def shapes(self, s) -> dict:
        return super().shapes(s) | {
            "single_layers": s.single_layers,
            "packed_channels": 4 * s.latent_channels,
            "latent_channels": s.latent_channels,
            "joint_dim": s.joint_dim,
            "rope_axes": list(flux_rope_axes(s.head_dim)),
        }


# ============================================================================================ Wan


@dataclass
class WanInputs:
    latents: torch.Tensor  # [1, C, F, H, W]
    prompt_embeds: torch.Tensor  # [1, L, text_dim]: the prompt's tokens, zero-padded to L (WanPipeline pads)
    negative_prompt_embeds: torch.Tensor  # [1, L, text_dim]


def _padded_text(gen: torch.Generator, tokens: int, length: int, dim: int) -> torch.Tensor:
    """Text embeddings as WanPipeline passes them: ``tokens`` rows of the prompt, zeros up to ``length``."""
    embeds = torch.zeros(1, length, dim)
    embeds[:, :tokens] = torch.randn(1, tokens, dim, generator=gen)
    return embeds


class Wan(BenchModel):
    name = "wan"
    class_name = "WanTransformer3DModel"
    calls_per_step = 2
    guidance = "CFG as two calls of batch 1 per step"

    def build(self, s) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(
            patch_size=(1, s.patch, s.patch),
            num_attention_heads=s.heads,
            attention_head_dim=s.head_dim,
            in_channels=s.latent_channels,
            out_channels=s.latent_channels,
            text_dim=s.joint_dim,
            freq_dim=256,
            ffn_dim=4 * s.hidden,
            num_layers=s.layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            rope_max_seq_len=1024,
        )
        return randomize_(model, s.seed).eval()

    def make_inputs(self, s) -> WanInputs:
        gen = torch.Generator().manual_seed(s.seed + 1)
        shape = (1, s.latent_channels, s.frames, s.latent_size, s.latent_size)
        latents = torch.randn(shape, generator=gen)
        return WanInputs(
            latents=latents,
            prompt_embeds=_padded_text(gen, max(1, s.text_tokens // 2), s.text_tokens, s.joint_dim),
            negative_prompt_embeds=_padded_text(gen, max(1, s.text_tokens // 4), s.text_tokens, s.joint_dim),
        )

    def call_kwargs(self, s, inputs, latents, t, branch=0) -> dict:
        # WanPipeline (Wan2.1, expand_timesteps off): the scheduler's timestep expanded to the batch, the text of
        # the branch: the prompt first ("cond"), then the negative prompt ("uncond")
        return dict(
            hidden_states=latents,
            timestep=t.expand(latents.shape[0]),
            encoder_hidden_states=inputs.prompt_embeds if branch == 0 else inputs.negative_prompt_embeds,
            attention_kwargs=None,
            return_dict=False,
        )

    def combine(self, s, outputs):
        cond, uncond = outputs
        return uncond + s.guidance_scale * (cond - uncond)

    def make_scheduler(self, s):
        from diffusers import UniPCMultistepScheduler

        # Wan2.1 T2V's scheduler config (flow_shift 3.0: 480p)
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
        )

    def describe(self, s) -> str:
        p = s.patch
        grid = s.latent_size // p
        return (
            f"WanTransformer3DModel, random weights, {s.layers} blocks, hidden {s.hidden} ({s.heads} heads x "
            f"{s.head_dim}), FFN {4 * s.hidden}, {s.latent_channels}x{s.frames}x{s.latent_size}x{s.latent_size} "
            f"video latents [1, C, F, H, W] ({4 * (s.frames - 1) + 1} frames), patch (1, {p}, {p}) = "
            f"{s.frames}x{grid}x{grid} = {s.num_tokens} video tokens, {s.text_tokens} text tokens (cross-attention; "
            f"prompt zero-padded), CFG as 2 calls of batch {s.batch} per step (WanPipeline), fp32, no_grad"
        )

    def shapes(self, s) -> dict:
        return super().shapes(s) | {
            "frames": s.frames,
            "video_frames": 4 * (s.frames - 1) + 1,
            "latent_channels": s.latent_channels,
            "patch": [1, s.patch, s.patch],
            "ffn_dim": 4 * s.hidden,
            "text_dim": s.joint_dim,
        }


FAMILIES: dict[str, BenchModel] = {m.name: m for m in (SD3(), Flux(), Wan())}


def bench_model(name: str) -> BenchModel:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model {name!r} is not benchmarked: choose one of {', '.join(FAMILIES)}") from None


def input_shapes(kwargs: dict) -> dict:
    """``name -> shape`` of the tensor arguments of one transformer call (with dtypes of non-float ones)."""
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            out[name] = _shape(value) if value.dtype == torch.float32 else [*_shape(value), str(value.dtype)]
    return out
