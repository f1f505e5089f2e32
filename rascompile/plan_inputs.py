"""The transformer call a pipeline makes at a given size, built without the pipeline, for ``rascompile.plan``.

Each builder gives the keyword arguments of one transformer call as the family's diffusers pipeline makes it
(latents, text embeddings of the pipeline's default text length, timestep and the family's extra inputs) for an
image of ``height`` x ``width`` pixels (and ``frames`` frames for video), with ``batch`` rows, as tensors on
``device`` (the meta device by default: shapes only, nothing allocated). Families that are not here take their
call from the user (``rascompile.plan(..., call_kwargs=...)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CallSize:
    """What the call is for: pixels, frames (video), rows per call, text tokens (None: the pipeline's default)."""

    height: int
    width: int
    frames: int | None = None
    batch: int = 1
    text_tokens: int | None = None
    dtype: torch.dtype = torch.bfloat16
    device: torch.device | str = "meta"


def _new(size: CallSize, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype or size.dtype, device=size.device)


def _latent_side(pixels: int, name: str, multiple: int) -> int:
    if pixels % multiple:
        raise ValueError(f"{name}={pixels} is invalid for this model: must be a multiple of {multiple}")
    return pixels // 8


def _timestep(size: CallSize) -> torch.Tensor:
    return torch.full((size.batch,), 500.0, device=size.device)


def _video_frames(size: CallSize, stride: int = 4) -> int:
    frames = size.frames or 1
    if (frames - 1) % stride:
        raise ValueError(f"frames={frames} is invalid for this model: must be {stride} * k + 1")
    return (frames - 1) // stride + 1


def sd3(config, size: CallSize) -> dict:
    h, w = (_latent_side(p, n, 8 * config.patch_size) for p, n in ((size.height, "height"), (size.width, "width")))
    text = size.text_tokens or 77 + 256  # CLIP's 77 tokens joined with T5's 256 (max_sequence_length)
    return dict(
        hidden_states=_new(size, size.batch, config.in_channels, h, w),
        encoder_hidden_states=_new(size, size.batch, text, config.joint_attention_dim),
        pooled_projections=_new(size, size.batch, config.pooled_projection_dim),
        timestep=_timestep(size),
        return_dict=False,
    )


def flux(config, size: CallSize) -> dict:
    h, w = (_latent_side(p, n, 16) // 2 for p, n in ((size.height, "height"), (size.width, "width")))
    text = size.text_tokens or 512
    call = dict(
        hidden_states=_new(size, size.batch, h * w, config.in_channels),
        encoder_hidden_states=_new(size, size.batch, text, config.joint_attention_dim),
        pooled_projections=_new(size, size.batch, config.pooled_projection_dim),
        timestep=_timestep(size) / 1000,
        img_ids=_new(size, h * w, 3),
        txt_ids=_new(size, text, 3),
        return_dict=False,
    )
    if config.guidance_embeds:
        call["guidance"] = torch.full((size.batch,), 3.5, device=size.device)
    return call


def qwen_image(config, size: CallSize) -> dict:
    h, w = (_latent_side(p, n, 16) // 2 for p, n in ((size.height, "height"), (size.width, "width")))
    text = size.text_tokens or 128
    return dict(
        hidden_states=_new(size, size.batch, h * w, config.in_channels),
        encoder_hidden_states=_new(size, size.batch, text, config.joint_attention_dim),
        # the pipeline's mask of unpadded text changes no shape; Dynamo cannot trace its use on the meta device
        encoder_hidden_states_mask=None,
        timestep=_timestep(size) / 1000,
        img_shapes=[[(1, h, w)]] * size.batch,
        return_dict=False,
    )


def wan(config, size: CallSize) -> dict:
    patch = config.patch_size
    h, w = (_latent_side(p, n, 8 * patch[1]) for p, n in ((size.height, "height"), (size.width, "width")))
    return dict(
        hidden_states=_new(size, size.batch, config.in_channels, _video_frames(size), h, w),
        encoder_hidden_states=_new(size, size.batch, size.text_tokens or 512, config.text_dim),
        timestep=_timestep(size),
        return_dict=False,
    )


def hunyuan_video(config, size: CallSize) -> dict:
    h, w = (_latent_side(p, n, 8 * config.patch_size) for p, n in ((size.height, "height"), (size.width, "width")))
    text = size.text_tokens or 256
    call = dict(
        hidden_states=_new(size, size.batch, config.in_channels, _video_frames(size), h, w),
        encoder_hidden_states=_new(size, size.batch, text, config.text_embed_dim),
        encoder_attention_mask=torch.ones(size.batch, text, dtype=size.dtype, device=size.device),
        pooled_projections=_new(size, size.batch, config.pooled_projection_dim),
        timestep=_timestep(size),
        return_dict=False,
    )
    if config.guidance_embeds:
        call["guidance"] = torch.full((size.batch,), 6000.0, device=size.device)
    return call


#: diffusers transformer class name -> (builder, whether its pipeline calls it once per guidance branch)
BUILDERS: dict[str, tuple[Callable[..., dict], bool]] = {
    "SD3Transformer2DModel": (sd3, False),
    "FluxTransformer2DModel": (flux, False),
    "QwenImageTransformer2DModel": (qwen_image, True),
    "WanTransformer3DModel": (wan, True),
    "HunyuanVideoTransformer3DModel": (hunyuan_video, False),
}


def transformer_call(model: torch.nn.Module, size: CallSize) -> dict:
    """The call ``model``'s pipeline makes at ``size``; ValueError naming the supported classes for others."""
    name = type(model).__name__
    if name not in BUILDERS:
        raise ValueError(
            f"rascompile.plan has no built-in call for {name}: pass call_kwargs (the keyword arguments of one "
            f"transformer call, meta tensors are enough). Built in: {', '.join(sorted(BUILDERS))}"
        )
    return BUILDERS[name][0](model.config, size)
