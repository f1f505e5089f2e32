"""Tiny, seeded, download-free video DiTs of the Wan 2.1 family beyond Wan itself: SkyReels-V2.

Sizes as ``models.tiny_wan_transformer``: two blocks, hidden 16 (2 heads x 8), patch (1, 2, 2), 4 latent channels;
the pipelines run without VAE (temporal factor 4, spatial 8) or text encoder, 5 frames of 64x64 pixels: latents
``[B, 4, 2, 8, 8]``, N = 32 tokens. The call kwargs are read from the real pipeline's first transformer call
(``capture.transformer_call_kwargs``).

SkyReels-V2 (text to video) calls its transformer once per guidance branch, with an int64 timestep per row.
"""

from __future__ import annotations

from tests.support.capture import transformer_call_kwargs
from tests.support.models import TINY_WAN_CONFIG, _reinit_, wan_pipeline_kwargs


def tiny_skyreels_v2_transformer(seed: int = 0):
    from diffusers import SkyReelsV2Transformer3DModel

    model = SkyReelsV2Transformer3DModel(**TINY_WAN_CONFIG)
    return _reinit_(model, seed, std=0.15, qk_std=0.3).eval()


def tiny_skyreels_v2_pipeline(transformer=None):
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

    pipe = SkyReelsV2Pipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=transformer if transformer is not None else tiny_skyreels_v2_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def skyreels_v2_pipeline_kwargs(batch: int = 1, steps: int = 8, seed: int = 0) -> dict:
    """As ``models.wan_pipeline_kwargs``: ``batch`` prompts with negative prompts (two calls per step)."""
    return wan_pipeline_kwargs(batch=batch, steps=steps, seed=seed)


def skyreels_v2_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """The first transformer call of ``SkyReelsV2Pipeline`` for ``batch`` prompts (its positive branch)."""
    return transformer_call_kwargs(tiny_skyreels_v2_pipeline(), skyreels_v2_pipeline_kwargs(batch, steps=4, seed=seed))
