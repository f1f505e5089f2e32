"""``rascompile bench --model flux``: ``FluxTransformer2DModel`` (double-stream blocks, then single-stream blocks over
the joint [text; image] sequence, RoPE over it from ``txt_ids``/``img_ids``); latents packed 2x2 into [B, N, 4C];
guidance-distilled (a guidance embedding, no CFG batch): one call of batch 1 per step (``FluxPipeline``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .family import BenchModel


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

    def construct(self, s, **overrides) -> torch.nn.Module:
        from diffusers import FluxTransformer2DModel

        config = dict(
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
        return FluxTransformer2DModel(**(config | overrides))

    def draw_inputs(self, s) -> FluxInputs:
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
        timestep = t.expand(latents.shape[0]).to(latents.device, latents.dtype)
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
