"""``rascompile bench --model sd3``: ``SD3Transformer2DModel`` (MMDiT, joint blocks); latents [B, C, H, W], patch 2;
classifier-free guidance batched: one call of batch 2 per step (``StableDiffusion3Pipeline``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .family import BenchModel


@dataclass
class Inputs:
    """SD3: the prompt inputs of one image with classifier-free guidance."""

    latents: torch.Tensor  # [1, C, H, W]: one image, duplicated for CFG
    prompt_embeds: torch.Tensor  # [2, L, joint_dim]: negative; positive
    pooled: torch.Tensor  # [2, pooled_dim]


class SD3(BenchModel):
    name = "sd3"
    class_name = "SD3Transformer2DModel"
    guidance = "CFG batch 2"

    def construct(self, s, **overrides) -> torch.nn.Module:
        from diffusers import SD3Transformer2DModel

        config = dict(
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
        return SD3Transformer2DModel(**(config | overrides))

    def draw_inputs(self, s) -> Inputs:
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
            timestep=t.expand(2).to(latents.device),
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
