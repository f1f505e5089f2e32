"""``rascompile bench --model wan``: ``WanTransformer3DModel`` (self-attention with 3-D RoPE, cross-attention to the
text); video latents [B, C, F, H, W], patch (1, 2, 2); ``WanPipeline`` calls the transformer once per guidance
branch (batch 1, the text first, then the negative text), so a step is two calls."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .family import BenchModel


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

    def construct(self, s, **overrides) -> torch.nn.Module:
        from diffusers import WanTransformer3DModel

        config = dict(
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
        return WanTransformer3DModel(**(config | overrides))

    def draw_inputs(self, s) -> WanInputs:
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
            timestep=t.expand(latents.shape[0]).to(latents.device),
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
