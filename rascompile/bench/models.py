"""The model families of ``rascompile bench --model``: how each transformer is built, what its diffusers pipeline
hands it per call, and the pipeline's denoising loop.

* ``sd3`` (``sd3.py``): ``SD3Transformer2DModel``, classifier-free guidance batched (one call of batch 2 per step);
* ``flux`` (``flux.py``): ``FluxTransformer2DModel``, latents packed 2x2, guidance-distilled (one call of batch 1);
* ``wan`` (``wan.py``): ``WanTransformer3DModel`` on video latents, one call per guidance branch (two per step).

The inputs are built as those pipelines build them (latent layout, position ids, timestep scale, guidance);
the weights are random (see :func:`randomize_`, ``family.py``, where the families' common interface
:class:`BenchModel` lives). Sizes are scaled-down, CPU-friendly versions of each family.
"""

from __future__ import annotations

import torch

from .family import BenchModel, randomize_
from .flux import Flux, FluxInputs, flux_image_ids, flux_pack_latents, flux_rope_axes, flux_shift
from .sd3 import SD3, Inputs
from .wan import Wan, WanInputs

__all__ = [
    "FAMILIES",
    "MODELS",
    "MODEL_DEFAULTS",
    "MODEL_SMOKE",
    "BenchModel",
    "FluxInputs",
    "Inputs",
    "WanInputs",
    "bench_model",
    "flux_image_ids",
    "flux_pack_latents",
    "flux_rope_axes",
    "flux_shift",
    "input_shapes",
    "randomize_",
]

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


FAMILIES: dict[str, BenchModel] = {m.name: m for m in (SD3(), Flux(), Wan())}


def bench_model(name: str) -> BenchModel:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model {name!r} is not benchmarked: choose one of {', '.join(FAMILIES)}") from None


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def input_shapes(kwargs: dict) -> dict:
    """``name -> shape`` of the tensor arguments of one transformer call (with dtypes of non-float ones)."""
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            out[name] = _shape(value) if value.dtype == torch.float32 else [*_shape(value), str(value.dtype)]
    return out
