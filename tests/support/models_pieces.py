"""Tiny, seeded configs of transformers whose forward Dynamo splits into several graphs ("pieces").

Qwen-Image 2.1, Bria FIBO 2, HunyuanVideo 1.5 and Mochi read their text masks with data-dependent Python
(``.tolist()``, ``nonzero``, boolean indexing, ``.item()``), so one call is several Dynamo graphs
(``docs/design/graph-pieces.md`` maps them). Each builder returns an eval-mode model with every parameter re-drawn
(``tests.support.models._reinit_``); each ``*_call_kwargs(batch, seed)`` gives the transformer's keyword arguments
as its pipeline passes them at one step, the second prompt padded so that the masks differ per row.
"""

from __future__ import annotations

import torch

from tests.support.models import _reinit_


def _gen(offset: int, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(60_000 + 100 * offset + seed)


def _padded_mask(batch: int, length: int, valid_last: int, dtype=torch.bool) -> torch.Tensor:
    """All tokens valid, except the last row's after ``valid_last``."""
    mask = torch.ones(batch, length, dtype=dtype)
    mask[-1, valid_last:] = 0
    return mask


def tiny_qwen_image21_transformer(seed: int = 0):
    """Qwen-Image 2.1: two blocks, hidden 16 (2 heads x 8), packed latents of 16 channels (patch 1), text width 24."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21Transformer2DModel

    model = QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        context_in_dim=24,
        mlp_ratio=3,
        axes_dims_rope=(2, 2, 4),
    )
    return _reinit_(model, seed, std=0.15).eval()


def qwen_image21_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """Text to image: 8x8 packed latents (N = 64), 6 text tokens; the image mask has one slot per 4 tokens."""
    gen = _gen(0, seed)
    text, tokens = 6, 64
    image_mask = torch.cat(
        [torch.zeros(batch, text, dtype=torch.bool), torch.ones(batch, tokens // 4, dtype=torch.bool)], dim=1
    )
    return dict(
        hidden_states=torch.randn(batch, tokens, 16, generator=gen),
        encoder_hidden_states=torch.randn(batch, text, 24, generator=gen),
        timestep=torch.full((batch,), 0.75),
        img_shapes=[[(1, 8, 8)]] * batch,
        img_mask=image_mask,
        encoder_hidden_states_mask=_padded_mask(batch, text, 4),
        return_dict=False,
    )


def tiny_fibo2_transformer(seed: int = 0):
    """Bria FIBO 2: one refiner and two main layers (the second injects text), hidden 24 (2 heads x 12), a one-layer
    perceiver of 4 to 8 gist tokens, patch 2, 4 latent channels. Hidden 24 is the least that gives the feed-forward
    layers a width (diffusers rounds ``dim * 8 // 3`` down to a multiple of 64: 0 at 16)."""
    from diffusers.models.transformers.transformer_bria_fibo2 import BriaFibo2Transformer2DModel

    model = BriaFibo2Transformer2DModel(
        in_channels=4,
        patch_size=2,
        dim=24,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        cap_feat_dim=16,
        injection_layer_ids=(1,),
        perceiver_num_layers=1,
        min_num_gist_tokens=4,
        max_num_gist_tokens=8,
        gist_step=4,
        gist_min_text_len=4,
        gist_max_text_len=8,
        axes_dims=(4, 4, 4),
        axes_lens=(32, 16, 16),
    )
    _reinit_(model, seed, std=0.15)
    with torch.no_grad():
        # its timestep embedder reads 256 sinusoids through a 1024-wide layer: at std 0.15 the high frequencies make
        # the embedding change completely from one step to the next; scaled as if 16 wide, as the other tiny
        # models' embedders are (models_image._smooth_timestep_embedding_)
        first, last = model.t_embedder.mlp[0], model.t_embedder.mlp[2]
        first.weight.mul_((16 / first.in_features) ** 0.5)
        last.weight.mul_((16 / last.in_features) ** 0.5)
    return model.eval()


def fibo2_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """16x16 latents (N = 64), two text layers of 6 tokens."""
    gen = _gen(1, seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 16, 16, generator=gen),
        timestep=torch.full((batch,), 0.75),
        encoder_hidden_states=torch.randn(batch, 2, 6, 16, generator=gen),
        encoder_attention_mask=_padded_mask(batch, 6, 4),
        return_dict=False,
    )


def tiny_hunyuan_video15_transformer(seed: int = 0):
    """HunyuanVideo 1.5, text to video: one block and one refiner block, hidden 16 (2 heads x 8), patch 1, 9 input
    channels (latents, condition, mask) and 4 output channels."""
    from diffusers import HunyuanVideo15Transformer3DModel

    model = HunyuanVideo15Transformer3DModel(
        in_channels=9,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_refiner_layers=1,
        text_embed_dim=24,
        text_embed_2_dim=12,
        image_embed_dim=12,
        rope_axes_dim=(4, 2, 2),
        task_type="t2v",
    )
    return _reinit_(model, seed, std=0.15).eval()


def hunyuan_video15_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """2 latent frames of 8x8 (N = 128), 6 text and 4 glyph tokens, zero image embeddings (text to video)."""
    gen = _gen(2, seed)
    glyph_mask = torch.zeros(batch, 4, dtype=torch.int64)
    glyph_mask[0, :3] = 1
    return dict(
        hidden_states=torch.randn(batch, 9, 2, 8, 8, generator=gen),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, 6, 24, generator=gen),
        encoder_attention_mask=_padded_mask(batch, 6, 4, dtype=torch.int64),
        encoder_hidden_states_2=torch.randn(batch, 4, 12, generator=gen),
        encoder_attention_mask_2=glyph_mask,
        image_embeds=torch.zeros(batch, 4, 12),
        return_dict=False,
    )


def tiny_mochi_transformer(seed: int = 0):
    """Mochi: two blocks, hidden 16 (2 heads x 8), patch 2, 4 latent channels, text width 16 (up to 6 tokens)."""
    from diffusers import MochiTransformer3DModel

    model = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        text_embed_dim=16,
        time_embed_dim=32,
        max_sequence_length=6,
    )
    return _reinit_(model, seed, std=0.15).eval()


def mochi_call_kwargs(batch: int = 2, seed: int = 0) -> dict:
    """2 latent frames of 8x8 (N = 2 * 4 * 4 = 32), 6 text tokens."""
    gen = _gen(3, seed)
    return dict(
        hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=gen),
        encoder_hidden_states=torch.randn(batch, 6, 16, generator=gen),
        timestep=torch.full((batch,), 500),
        encoder_attention_mask=_padded_mask(batch, 6, 4),
        return_dict=False,
    )
