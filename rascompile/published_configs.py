"""The transformer configs of published checkpoints (their ``transformer/config.json`` values), so that
``rascompile plan`` can plan a model by name without downloading anything: the model is built on the meta device
from these values alone. Keys are the names ``rascompile plan`` takes; each entry names its Hub repository."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Published:
    repo: str
    class_name: str
    config: dict = field(default_factory=dict)
    height: int = 1024  # the pipeline's default size
    width: int = 1024
    frames: int | None = None
    batch: int = 1  # rows per transformer call (2: the pipeline batches classifier-free guidance)
    branches: int = 1  # transformer calls per step (2: one per guidance branch)


PUBLISHED: dict[str, Published] = {
    "sd3-medium": Published(
        "stabilityai/stable-diffusion-3-medium-diffusers",
        "SD3Transformer2DModel",
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        ),
        batch=2,
    ),
    "flux-dev": Published(
        "black-forest-labs/FLUX.1-dev",
        "FluxTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
    ),
    "qwen-image": Published(
        "Qwen/Qwen-Image",
        "QwenImageTransformer2DModel",
        dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        ),
        height=1328,
        width=1328,
        branches=2,
    ),
    "wan2.1-t2v-14b": Published(
        "Wan-AI/Wan2.1-T2V-14B-Diffusers",
        "WanTransformer3DModel",
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=40,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=13824,
            num_layers=40,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=1e-6,
            image_dim=None,
            added_kv_proj_dim=None,
            rope_max_seq_len=1024,
        ),
        height=480,
        width=832,
        frames=81,
        branches=2,
    ),
    "hunyuan-video": Published(
        "hunyuanvideo-community/HunyuanVideo",
        "HunyuanVideoTransformer3DModel",
        dict(
            in_channels=16,
            out_channels=16,
            num_attention_heads=24,
            attention_head_dim=128,
            num_layers=20,
            num_single_layers=40,
            num_refiner_layers=2,
            mlp_ratio=4.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=4096,
            pooled_projection_dim=768,
            rope_theta=256.0,
            rope_axes_dim=(16, 56, 56),
        ),
        height=720,
        width=1280,
        frames=129,
    ),
}


def build_on_meta(name: str, dtype=None):
    """The published transformer ``name`` built on the meta device (no memory), in ``dtype`` (default bfloat16)."""
    import diffusers
    import torch

    from .memory_plan import build_on_meta as meta_model

    if name not in PUBLISHED:
        raise ValueError(f"model={name!r} is not a published config rascompile knows: one of {', '.join(PUBLISHED)}")
    entry = PUBLISHED[name]
    return meta_model(getattr(diffusers, entry.class_name), entry.config, dtype or torch.bfloat16)
