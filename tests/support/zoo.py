"""The diffusion transformers rascompile is tested on: one entry per model, with what RAS does on it.

Each ``Case`` names the diffusers transformer (and pipeline) class, builds a tiny seeded model, gives the
keyword arguments its pipeline passes at one denoising step (batch 2) and says whether the passes rewrite
it (RAS) or why it runs dense. ``tests/integration/test_model_zoo.py`` checks every entry against the model-agnostic
invariants; ``python -m tests.support.zoo`` prints docs/supported.md's model table from this list, and a test
keeps that copy equal to it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.support import models, models_video, pipelines_pieces
from tests.support import models_classic as classic
from tests.support import models_image as image
from tests.support import models_image_more as image_more
from tests.support import models_image_newer as newer
from tests.support import models_layouts as layouts
from tests.support import models_pieces as pieces
from tests.support import models_video_more as video_more
from tests.support import models_video_other as video_other
from tests.support import models_wan_family as wan_family

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIR = ROOT / "docs" / "bench"


@dataclass(frozen=True)
class Case:
    key: str
    model: str  # the name people use
    transformer_class: str
    pipeline_class: str | None
    transformer: Callable  # (seed) -> tiny transformer
    call_kwargs: Callable | None  # (batch, seed) -> the pipeline's transformer kwargs at one step (zoo tests)
    ras: bool  # the passes rewrite it
    reason: str = ""  # dense: words of the reason rascompile gives; RAS: what the table adds
    pipeline: Callable | None = None  # (transformer) -> download-free pipeline
    pipeline_kwargs: Callable | None = None  # () -> the pipeline's call kwargs
    per_branch: bool = False  # the pipeline calls the transformer once per guidance branch
    timestep_scale: float = 1000.0  # the timestep the transformer sees at sigma = 1
    latents_key: str = "hidden_states"
    timestep_key: str = "timestep"
    bench: str | None = None  # ``rascompile bench --model`` name
    layout: str = "image"
    note: str = ""  # dense: what in the model keeps RAS out, for the table
    zoo_tests: bool = True  # False: covered by tests/integration/test_passes.py, test_packed_models.py
    pieces: bool = False  # RAS across the graphs Dynamo splits it into (``graph_pieces=True``; test_pieces_models.py)


CASES: list[Case] = [
    Case(
        "sd3",
        "Stable Diffusion 3 / 3.5",
        "SD3Transformer2DModel",
        "StableDiffusion3Pipeline",
        lambda seed=0: models.tiny_sd3_transformer(seed),
        None,
        ras=True,
        reason="equals the paper's reference code",
        bench="sd3",
        zoo_tests=False,
    ),
    Case(
        "lumina",
        "Lumina-Next",
        "LuminaNextDiT2DModel",
        "LuminaPipeline",
        lambda seed=0: models.tiny_lumina_transformer(seed),
        None,
        ras=True,
        reason="equals the paper's reference code",
        zoo_tests=False,
    ),
    Case(
        "flux",
        "FLUX.1",
        "FluxTransformer2DModel",
        "FluxPipeline",
        lambda seed=0: models.tiny_flux_transformer(seed),
        None,
        ras=True,
        reason="joint RoPE table and joint K/V caches; true CFG per branch",
        timestep_scale=1.0,
        bench="flux",
        layout="packed",
        zoo_tests=False,
    ),
    Case(
        "qwen-image",
        "Qwen-Image",
        "QwenImageTransformer2DModel",
        "QwenImagePipeline",
        lambda seed=0: models.tiny_qwen_image_transformer(seed),
        lambda batch=2, seed=0: models.qwen_image_call_kwargs(batch=batch, seed=seed),
        ras=True,
        reason="text mask over joint keys; true CFG per branch",
        pipeline=lambda transformer=None: models.tiny_qwen_image_pipeline(transformer),
        pipeline_kwargs=lambda: models.qwen_image_pipeline_kwargs(),
        per_branch=True,
        timestep_scale=1.0,
        layout="packed",
    ),
    Case(
        "wan",
        "Wan 2.1",
        "WanTransformer3DModel",
        "WanPipeline",
        lambda seed=0: models.tiny_wan_transformer(seed),
        lambda batch=2, seed=0: models.wan_call_kwargs(batch=batch, seed=seed),
        ras=True,
        reason="RoPE written in place; one call per guidance branch",
        pipeline=lambda transformer=None: models.tiny_wan_pipeline(transformer),
        pipeline_kwargs=lambda: models.wan_pipeline_kwargs(),
        per_branch=True,
        bench="wan",
        layout="video",
    ),
    Case(
        "skyreels-v2",
        "SkyReels-V2",
        "SkyReelsV2Transformer3DModel",
        "SkyReelsV2Pipeline",
        wan_family.tiny_skyreels_v2_transformer,
        wan_family.skyreels_v2_call_kwargs,
        ras=True,
        reason="Wan 2.1 blocks; one call per guidance branch",
        pipeline=wan_family.tiny_skyreels_v2_pipeline,
        pipeline_kwargs=wan_family.skyreels_v2_pipeline_kwargs,
        per_branch=True,
        layout="video",
    ),
    Case(
        "cogvideox",
        "CogVideoX (5B, RoPE)",
        "CogVideoXTransformer3DModel",
        "CogVideoXPipeline",
        lambda seed=0: models_video.tiny_cogvideox_transformer(seed),
        lambda batch=2, seed=0: models_video.cogvideox_call_kwargs(batch=batch, seed=seed),
        ras=True,
        reason="[B, F, C, H, W] latents; RoPE written in place into the image rows",
        pipeline=lambda transformer=None: models_video.tiny_cogvideox_pipeline(transformer),
        pipeline_kwargs=lambda: models_video.cogvideox_pipeline_kwargs(),
        layout="video",
    ),
    Case(
        "cogvideox-sincos",
        "CogVideoX (2B, sin-cos)",
        "CogVideoXTransformer3DModel",
        "CogVideoXPipeline",
        lambda seed=0: models_video.tiny_cogvideox_transformer(seed, rope=False),
        lambda batch=2, seed=0: models_video.cogvideox_call_kwargs(batch=batch, seed=seed, rope=False),
        ras=True,
        reason="position table over the joint [text; image] sequence",
        layout="video",
    ),
    Case(
        "hunyuan-video",
        "HunyuanVideo",
        "HunyuanVideoTransformer3DModel",
        "HunyuanVideoPipeline",
        lambda seed=0: models_video.tiny_hunyuan_video_transformer(seed),
        lambda batch=2, seed=0: models_video.hunyuan_video_call_kwargs(batch=batch, seed=seed),
        ras=True,
        reason="single-stream blocks, joint mask",
        pipeline=lambda transformer=None: models_video.tiny_hunyuan_video_pipeline(transformer),
        pipeline_kwargs=lambda: models_video.hunyuan_video_pipeline_kwargs(),
        layout="video",
    ),
    Case(
        "ltx",
        "LTX-Video",
        "LTXVideoTransformer3DModel",
        "LTXPipeline",
        lambda seed=0: models_video.tiny_ltx_transformer(seed),
        lambda batch=2, seed=0: models_video.ltx_call_kwargs(batch=batch, seed=seed),
        ras=True,
        reason="packed video tokens, RoPE cos/sin tables",
        pipeline=lambda transformer=None: models_video.tiny_ltx_pipeline(transformer),
        pipeline_kwargs=lambda: models_video.ltx_pipeline_kwargs(),
        layout="packed",
    ),
    Case(
        "ltx2",
        "LTX-2 (video tokens; audio whole)",
        "LTX2VideoTransformer3DModel",
        "LTX2Pipeline",
        video_other.tiny_ltx2_transformer,
        video_other.ltx2_call_kwargs,
        ras=True,
        reason="RAS over the video tokens; the audio tokens run whole and read the video K/V from the caches",
        layout="packed",
    ),
    Case(
        "wan-vace",
        "Wan-VACE",
        "WanVACETransformer3DModel",
        "WanVACEPipeline",
        video_more.tiny_wan_vace_transformer,
        video_more.wan_vace_call_kwargs,
        ras=True,
        reason="control blocks over the image tokens; one call per guidance branch",
        pipeline=video_more.tiny_wan_vace_pipeline,
        pipeline_kwargs=video_more.wan_vace_pipeline_kwargs,
        per_branch=True,
        layout="video",
    ),
    Case(
        "chronoedit",
        "ChronoEdit",
        "ChronoEditTransformer3DModel",
        "ChronoEditPipeline",
        video_more.tiny_chronoedit_transformer,
        video_more.chronoedit_call_kwargs,
        ras=True,
        reason="Wan image-to-video blocks, condition channels in the latents; one call per guidance branch",
        pipeline=video_more.tiny_chronoedit_pipeline,
        pipeline_kwargs=video_more.chronoedit_pipeline_kwargs,
        per_branch=True,
        layout="video",
    ),
    Case(
        "helios",
        "Helios",
        "HeliosTransformer3DModel",
        "HeliosPipeline",
        video_more.tiny_helios_transformer,
        video_more.helios_call_kwargs,
        ras=True,
        reason="history tokens joined before the image tokens; one call per guidance branch",
        pipeline=video_more.tiny_helios_pipeline,
        pipeline_kwargs=video_more.helios_pipeline_kwargs,
        per_branch=True,
        layout="video",
    ),
    Case(
        "cosmos",
        "Cosmos 1.0",
        "CosmosTransformer3DModel",
        "CosmosTextToWorldPipeline",
        video_more.tiny_cosmos_transformer,
        video_more.cosmos_call_kwargs,
        ras=True,
        reason="AdaLN-LoRA blocks, learned position table; one call per guidance branch",
        pipeline=video_more.tiny_cosmos_pipeline,
        pipeline_kwargs=video_more.cosmos_pipeline_kwargs,
        per_branch=True,
        timestep_scale=1.0,  # EDM: the transformer sees 0.25 * ln(sigma); this only drives the guided loop
        layout="video",
    ),
    Case(
        "cosmos2",
        "Cosmos Predict2 (text to image)",
        "CosmosTransformer3DModel",
        "Cosmos2TextToImagePipeline",
        video_more.tiny_cosmos2_transformer,
        video_more.cosmos2_call_kwargs,
        ras=True,
        reason="one latent frame, its patchify read by replaying it; the timestep projection cast to the tokens' "
        "dtype; one call per guidance branch",
        pipeline=video_more.tiny_cosmos2_pipeline,
        pipeline_kwargs=video_more.cosmos2_pipeline_kwargs,
        per_branch=True,
        timestep_scale=1.0,
        layout="video",
    ),
    Case(
        "allegro",
        "Allegro",
        "AllegroTransformer3DModel",
        "AllegroPipeline",
        video_other.tiny_allegro_transformer,
        video_other.allegro_call_kwargs,
        ras=True,
        reason="3-axis RoPE positions from the pipeline, text cross-attention with a mask, a squeeze of the token axis",
        pipeline=video_other.tiny_allegro_pipeline,
        pipeline_kwargs=video_other.allegro_pipeline_kwargs,
        layout="video",
    ),
    Case(
        "easyanimate",
        "EasyAnimate",
        "EasyAnimateTransformer3DModel",
        "EasyAnimatePipeline",
        video_other.tiny_easyanimate_transformer,
        video_other.easyanimate_call_kwargs,
        ras=True,
        reason="MMDiT and joint [text; image] blocks, RoPE written in place into the image rows",
        pipeline=video_other.tiny_easyanimate_pipeline,
        pipeline_kwargs=video_other.easyanimate_pipeline_kwargs,
        layout="video",
    ),
    Case(
        "consisid",
        "ConsisID",
        "ConsisIDTransformer3DModel",
        "ConsisIDPipeline",
        video_other.tiny_consisid_transformer,
        video_other.consisid_call_kwargs,
        ras=True,
        reason="CogVideoX blocks plus a cross-attention of the image tokens to face tokens",
        pipeline=video_other.tiny_consisid_pipeline,
        pipeline_kwargs=video_other.consisid_pipeline_kwargs,
        layout="video",
    ),
    Case(
        "sana-wm-refiner",
        "SANA-WM refiner (stage 2)",
        "SanaWMLTX2RefinerTransformer3DModel",
        "SanaWMLTX2Refiner",
        video_more.tiny_sana_wm_refiner_transformer,
        video_more.sana_wm_refiner_call_kwargs,
        ras=True,
        reason="packed tokens, per-token timesteps, attention-sink K/V; in `SanaWMLTX2Refiner` its K/V-capture calls "
        "return active tokens, which RAS cannot rewrite, so that pipeline runs dense, with a warning",
        layout="packed",
    ),
    Case(
        "anyflow",
        "AnyFlow",
        "AnyFlowTransformer3DModel",
        "AnyFlowPipeline",
        layouts.tiny_anyflow_transformer,
        layouts.anyflow_call_kwargs,
        ras=True,
        reason="[B, F, C, H, W] latents read through the permute before the patch Conv3d; a timestep per frame, "
        "expanded to a per-token modulation that follows the active tokens",
        pipeline=layouts.tiny_anyflow_pipeline,
        pipeline_kwargs=layouts.anyflow_pipeline_kwargs,
        layout="video",
    ),
    Case(
        "kandinsky5",
        "Kandinsky 5",
        "Kandinsky5Transformer3DModel",
        "Kandinsky5T2VPipeline",
        layouts.tiny_kandinsky5_transformer,
        layouts.kandinsky5_call_kwargs,
        ras=True,
        reason="channel-last [B, F, H, W, C] latents cut into tokens by view, permute and a linear (read by replaying "
        "them); the tokens go back onto the grid for the output layer, so the cache holds the last hidden states; one "
        "call per guidance branch",
        pipeline=layouts.tiny_kandinsky5_pipeline,
        pipeline_kwargs=layouts.kandinsky5_pipeline_kwargs,
        per_branch=True,
        layout="video",
    ),
    Case(
        "kandinsky6",
        "Kandinsky 6",
        "Kandinsky6Transformer3DModel",
        "Kandinsky6TI2VAPipeline",
        video_other.tiny_kandinsky6_transformer,
        video_other.kandinsky6_call_kwargs,
        ras=True,
        reason="as Kandinsky 5, with condition channels in the latents; RAS over the video tokens, the audio tokens "
        "run whole and read the video K/V from the caches; one call per guidance branch",
        pipeline=video_other.tiny_kandinsky6_pipeline,
        pipeline_kwargs=video_other.kandinsky6_pipeline_kwargs,
        per_branch=True,
        layout="video",
    ),
    Case(
        "sd35",
        "Stable Diffusion 3.5",
        "SD3Transformer2DModel",
        "StableDiffusion3Pipeline",
        classic.tiny_sd35_transformer,
        classic.sd35_call_kwargs,
        ras=True,
        reason="RMS q/k norm, dual attention blocks",
        pipeline=classic.tiny_sd35_pipeline,
        pipeline_kwargs=classic.sd35_pipeline_kwargs,
    ),
    Case(
        "pixart",
        "PixArt-Sigma",
        "PixArtTransformer2DModel",
        "PixArtSigmaPipeline",
        classic.tiny_pixart_transformer,
        classic.pixart_call_kwargs,
        ras=True,
        reason="self-attention plus cross-attention to text",
        pipeline=classic.tiny_pixart_pipeline,
        pipeline_kwargs=classic.pixart_pipeline_kwargs,
    ),
    Case(
        "hunyuan-dit",
        "HunyuanDiT",
        "HunyuanDiT2DModel",
        "HunyuanDiTPipeline",
        classic.tiny_hunyuan_dit_transformer,
        classic.hunyuan_dit_call_kwargs,
        ras=True,
        reason="RoPE tables from the pipeline, long skips",
        pipeline=classic.tiny_hunyuan_dit_pipeline,
        pipeline_kwargs=classic.hunyuan_dit_pipeline_kwargs,
    ),
    Case(
        "dit",
        "DiT",
        "DiTTransformer2DModel",
        "DiTPipeline",
        classic.tiny_dit_transformer,
        classic.dit_call_kwargs,
        ras=True,
        reason="class-conditional",
        pipeline=classic.tiny_dit_pipeline,
        pipeline_kwargs=classic.dit_pipeline_kwargs,
    ),
    Case(
        "flux2",
        "FLUX.2",
        "Flux2Transformer2DModel",
        "Flux2Pipeline",
        image.tiny_flux2_transformer,
        image.flux2_call_kwargs,
        ras=True,
        reason="joint RoPE table, single-stream blocks",
        pipeline=image.tiny_flux2_pipeline,
        pipeline_kwargs=image.flux2_pipeline_kwargs,
        timestep_scale=1.0,
        layout="packed",
    ),
    Case(
        "ovis-image",
        "Ovis-Image",
        "OvisImageTransformer2DModel",
        "OvisImagePipeline",
        newer.tiny_ovis_image_transformer,
        newer.ovis_image_call_kwargs,
        ras=True,
        reason="FLUX.1-style joint RoPE, single-stream blocks; one call per guidance branch",
        pipeline=newer.tiny_ovis_image_pipeline,
        pipeline_kwargs=newer.ovis_image_pipeline_kwargs,
        per_branch=True,
        timestep_scale=1.0,
        layout="packed",
    ),
    Case(
        "bria",
        "Bria 3.2",
        "BriaTransformer2DModel",
        "BriaPipeline",
        newer.tiny_bria_transformer,
        newer.bria_call_kwargs,
        ras=True,
        reason="FLUX.1-style joint RoPE, single-stream blocks; guidance batched",
        pipeline=newer.tiny_bria_pipeline,
        pipeline_kwargs=newer.bria_pipeline_kwargs,
        layout="packed",
    ),
    Case(
        "prx",
        "PRX",
        "PRXTransformer2DModel",
        "PRXPipeline",
        newer.tiny_prx_transformer,
        newer.prx_call_kwargs,
        ras=True,
        reason="text keys joined at attention, boolean text mask; guidance batched",
        pipeline=newer.tiny_prx_pipeline,
        pipeline_kwargs=newer.prx_pipeline_kwargs,
        timestep_scale=1.0,
    ),
    Case(
        "flux3",
        "FLUX.3",
        "Flux3Transformer2DModel",
        "Flux3ModularPipeline",
        image_more.tiny_flux3_transformer,
        image_more.flux3_call_kwargs,
        ras=True,
        reason="per-mode blocks, then single-stream blocks over [text; image]; one call per guidance branch (the "
        "modular pipeline needs the transformer compiled in place: `pipe.transformer.compile(backend='ras')`)",
        per_branch=True,
        timestep_scale=1.0,
        layout="packed",
    ),
    Case(
        "longcat-image",
        "LongCat-Image",
        "LongCatImageTransformer2DModel",
        "LongCatImagePipeline",
        image_more.tiny_longcat_image_transformer,
        image_more.longcat_image_call_kwargs,
        ras=True,
        reason="FLUX.1-style joint RoPE, single-stream blocks; one call per guidance branch",
        pipeline=image_more.tiny_longcat_image_pipeline,
        pipeline_kwargs=image_more.longcat_image_pipeline_kwargs,
        per_branch=True,
        timestep_scale=1.0,
        layout="packed",
    ),
    Case(
        "bria-fibo",
        "Bria FIBO",
        "BriaFiboTransformer2DModel",
        "BriaFiboPipeline",
        image_more.tiny_bria_fibo_transformer,
        image_more.bria_fibo_call_kwargs,
        ras=True,
        reason="per-block text-encoder layers, boolean key mask; guidance batched",
        pipeline=image_more.tiny_bria_fibo_pipeline,
        pipeline_kwargs=image_more.bria_fibo_pipeline_kwargs,
        layout="packed",
    ),
    Case(
        "krea2",
        "Krea 2",
        "Krea2Transformer2DModel",
        "Krea2Pipeline",
        image_more.tiny_krea2_transformer,
        image_more.krea2_call_kwargs,
        ras=True,
        reason="single-stream [text; image] blocks, text fusion, boolean key mask; one call per guidance branch",
        pipeline=image_more.tiny_krea2_pipeline,
        pipeline_kwargs=image_more.krea2_pipeline_kwargs,
        per_branch=True,
        timestep_scale=1.0,
        layout="packed",
    ),
    Case(
        "ernie-image",
        "ERNIE-Image",
        "ErnieImageTransformer2DModel",
        "ErnieImagePipeline",
        layouts.tiny_ernie_image_transformer,
        layouts.ernie_image_call_kwargs,
        ras=True,
        reason="sequence-first [S, B, C] joint sequence: the final linear's image rows merged after the transpose, "
        "the modulation expanded along the sequence cut to its length; guidance batched",
        pipeline=layouts.tiny_ernie_image_pipeline,
        pipeline_kwargs=layouts.ernie_image_pipeline_kwargs,
    ),
    Case(
        "chroma",
        "Chroma",
        "ChromaTransformer2DModel",
        "ChromaPipeline",
        image.tiny_chroma_transformer,
        image.chroma_call_kwargs,
        ras=True,
        reason="joint mask rows gathered; one call per guidance branch",
        pipeline=image.tiny_chroma_pipeline,
        pipeline_kwargs=image.chroma_pipeline_kwargs,
        per_branch=True,
        timestep_scale=1.0,
        layout="packed",
    ),
    Case(
        "cogview4",
        "CogView4",
        "CogView4Transformer2DModel",
        "CogView4Pipeline",
        image.tiny_cogview4_transformer,
        image.cogview4_call_kwargs,
        ras=True,
        reason="RoPE written in place into the image rows; one call per guidance branch",
        pipeline=image.tiny_cogview4_pipeline,
        pipeline_kwargs=image.cogview4_pipeline_kwargs,
        per_branch=True,
    ),
    Case(
        "cogview3plus",
        "CogView3-Plus",
        "CogView3PlusTransformer2DModel",
        "CogView3PlusPipeline",
        image.tiny_cogview3plus_transformer,
        image.cogview3plus_call_kwargs,
        ras=True,
        reason="text and image joined in the patch embedding",
        pipeline=image.tiny_cogview3plus_pipeline,
        pipeline_kwargs=image.cogview3plus_pipeline_kwargs,
    ),
    Case(
        "auraflow",
        "AuraFlow",
        "AuraFlowTransformer2DModel",
        "AuraFlowPipeline",
        image.tiny_auraflow_transformer,
        image.auraflow_call_kwargs,
        ras=True,
        reason="register tokens, single-stream blocks",
        pipeline=image.tiny_auraflow_pipeline,
        pipeline_kwargs=image.auraflow_pipeline_kwargs,
        timestep_scale=1.0,
    ),
    Case(
        "hunyuan-image",
        "HunyuanImage-2.1 (without the glyph encoder)",
        "HunyuanImageTransformer2DModel",
        "HunyuanImagePipeline",
        lambda seed=0: image.tiny_hunyuan_image_transformer(seed, glyph=False),
        lambda batch=2, seed=0: _without_glyph(image.hunyuan_image_call_kwargs(batch=batch, seed=seed)),
        ras=True,
        reason="joint [image; text] sequence, key mask; one call per guidance branch",
        pipeline=lambda transformer=None: image.tiny_hunyuan_image_pipeline(transformer),
        pipeline_kwargs=image.hunyuan_image_pipeline_kwargs,
        per_branch=True,
    ),
    Case(
        "hunyuan-image-glyph",
        "HunyuanImage-2.1",
        "HunyuanImageTransformer2DModel",
        "HunyuanImagePipeline",
        lambda seed=0: image.tiny_hunyuan_image_transformer(seed, glyph=True),
        image.hunyuan_image_call_kwargs,
        ras=False,
        pieces=True,
        reason="a layer of HunyuanImageTransformer2DModel",
        note="graph breaks: the glyph text is reordered per row with boolean indexing (`text_2[text_mask_2]`)",
        pipeline=lambda transformer=None: image.tiny_hunyuan_image_pipeline(transformer),
        pipeline_kwargs=image.hunyuan_image_pipeline_kwargs,
        per_branch=True,
    ),
    Case(
        "lumina2",
        "Lumina-Image 2.0",
        "Lumina2Transformer2DModel",
        "Lumina2Pipeline",
        classic.tiny_lumina2_transformer,
        classic.lumina2_call_kwargs,
        ras=False,
        pieces=True,
        reason="no image-token source found",
        note="graph breaks at `attention_mask.sum(1).tolist()`: patchify and patch embedding sit in different "
        "graphs, the joint sequence is built and unpatchified row by row (prompts of different lengths in one "
        "batch, whose image rows start at a different offset in each row, stay dense)",
        pipeline=classic.tiny_lumina2_pipeline,
        pipeline_kwargs=classic.lumina2_pipeline_kwargs,
        per_branch=True,
        timestep_scale=1.0,  # the pipeline passes 1 - t / 1000: timesteps in [0, 1] (0 = noise)
    ),
    Case(
        "hidream",
        "HiDream-I1",
        "HiDreamImageTransformer2DModel",
        "HiDreamImagePipeline",
        classic.tiny_hidream_transformer,
        classic.hidream_call_kwargs,
        ras=False,
        reason="a layer of HiDreamImageTransformer2DModel",
        note="mixture-of-experts routing (`bincount`) breaks the graph inside the block loop; its expert dispatch "
        "flattens the tokens of all rows and sorts them by expert between graphs, so no piece hands on image tokens "
        "(dense with `graph_pieces=True` too; docs/ARCHITECTURE.md argues it)",
    ),
    Case(
        "qwen-image-2.1",
        "Qwen-Image 2.1",
        "QwenImage21Transformer2DModel",
        "QwenImage21Pipeline",
        pieces.tiny_qwen_image21_transformer,
        pieces.qwen_image21_call_kwargs,
        ras=False,
        pieces=True,
        reason="no attention reads the image tokens",
        note="`repeat_interleave`, `.tolist()`, `nonzero` and `.item()` on its masks split the forward into 11 graphs; "
        "the image tokens are written into the joint sequence in place between two of them, and the one holding the "
        "blocks takes the joint sequence and returns it whole",
        pipeline=pipelines_pieces.tiny_qwen_image21_pipeline,
        pipeline_kwargs=pipelines_pieces.qwen_image21_pipeline_kwargs,
        per_branch=True,
    ),
    Case(
        "fibo2",
        "Bria FIBO 2",
        "BriaFibo2Transformer2DModel",
        "BriaFibo2Pipeline",
        pieces.tiny_fibo2_transformer,
        pieces.fibo2_call_kwargs,
        ras=False,
        pieces=True,
        reason="no image-token source found",
        note="`encoder_attention_mask.sum(1).tolist()` after the noise refiner: the refiner's attention and the main "
        "layers' sit in different graphs",
        pipeline=pipelines_pieces.tiny_fibo2_pipeline,
        pipeline_kwargs=pipelines_pieces.fibo2_pipeline_kwargs,
        per_branch=True,
    ),
    Case(
        "hunyuanvideo-1.5",
        "HunyuanVideo 1.5",
        "HunyuanVideo15Transformer3DModel",
        "HunyuanVideo15Pipeline",
        pieces.tiny_hunyuan_video15_transformer,
        pieces.hunyuan_video15_call_kwargs,
        ras=False,
        pieces=True,
        reason="no final projection",
        note="a per-row boolean reorder of text and image (`image[image_mask]`): the rest of the forward runs "
        "eagerly, each block its own graph, `proj_out` in none",
        layout="video",
        pipeline=pipelines_pieces.tiny_hunyuan_video15_pipeline,
        pipeline_kwargs=pipelines_pieces.hunyuan_video15_pipeline_kwargs,
        per_branch=True,
    ),
    Case(
        "mochi",
        "Mochi",
        "MochiTransformer3DModel",
        "MochiPipeline",
        pieces.tiny_mochi_transformer,
        pieces.mochi_call_kwargs,
        ras=False,
        pieces=True,
        reason="no image-token source found",
        note="`nonzero` on the text mask in each row of its attention processor: the forward and the attention run "
        "eagerly, layer by layer, the patch embedding per frame (with `graph_pieces=True` the attention stays eager, "
        "over all tokens: the skipped ones take their last inputs to it)",
        layout="video",
        pipeline=pipelines_pieces.tiny_mochi_pipeline,
        pipeline_kwargs=pipelines_pieces.mochi_pipeline_kwargs,
    ),
    Case(
        "nucleusmoe-image",
        "NucleusMoE-Image",
        "NucleusMoEImageTransformer2DModel",
        "NucleusMoEImagePipeline",
        image_more.tiny_nucleusmoe_image_transformer,
        image_more.nucleusmoe_image_call_kwargs,
        ras=False,
        reason="a layer of NucleusMoEImageTransformer2DModel, not the whole transformer",
        note="mixture-of-experts with expert-choice routing (each expert takes its top tokens over the sequence, so a "
        "token's output depends on the others); `num_tokens_per_expert.tolist()` breaks the graph in every MoE block",
        timestep_scale=1.0,
        layout="packed",
    ),
    Case(
        "glm-image",
        "GLM-Image",
        "GlmImageTransformer2DModel",
        "GlmImagePipeline",
        image_more.tiny_glm_image_transformer,
        image_more.glm_image_call_kwargs,
        ras=False,
        reason="no image-token source found",
        note="a graph break at `prior_embedding[prior_token_drop] *= 0.0` (boolean indexing): the graph of the blocks "
        "takes patchified tokens",
    ),
    Case(
        "omnigen",
        "OmniGen",
        "OmniGenTransformer2DModel",
        "OmniGenPipeline",
        image_more.tiny_omnigen_transformer,
        image_more.omnigen_call_kwargs,
        ras=False,
        reason="no image-token source found",
        note="a graph break in its RoPE (`if torch.max(position_ids) + 1 > original_max_position_embeddings`): patch "
        "embedding and blocks sit in different graphs",
    ),
    Case(
        "dreamlite",
        "DreamLite",
        "DreamLiteTransformer2DModel",
        "DreamLitePipeline",
        image_more.tiny_dreamlite_transformer,
        image_more.dreamlite_call_kwargs,
        ras=False,
        reason="no [B, N, C] tensor with N = H*W/p^2 after 'norm'",
        note="a transformer inside UNet blocks: group norm over all positions of the feature map, 1x1 convolutions",
    ),
    Case(
        "motif-video",
        "Motif-Video",
        "MotifVideoTransformer3DModel",
        "MotifVideoPipeline",
        video_other.tiny_motif_video_transformer,
        video_other.motif_video_call_kwargs,
        ras=False,
        reason="joins two runs of image tokens in one sequence",
        note="its decoder layers attend over their own image tokens and the encoder's, joined in one sequence",
        layout="video",
    ),
    Case(
        "hunyuan-video-framepack",
        "HunyuanVideo Framepack",
        "HunyuanVideoFramepackTransformer3DModel",
        "HunyuanVideoFramepackPipeline",
        video_other.tiny_framepack_transformer,
        video_other.framepack_call_kwargs,
        ras=False,
        reason="no final projection",
        note="graph breaks in a per-row mask loop (`attention_mask[i, : effective_sequence_length[i]] = True`); the "
        "noisy tokens are packed after the clean history tokens, so no piece embeds the latents as tokens (dense with "
        "`graph_pieces=True` too)",
        layout="video",
    ),
    Case(
        "minimax-h3",
        "MiniMax-H3",
        "MiniMaxH3Transformer3DModel",
        None,
        video_other.tiny_minimax_h3_transformer,
        video_other.minimax_h3_call_kwargs,
        ras=False,
        reason="no final projection",
        note="the video rows are scattered into a packed [text; audio; video] sequence by `index_copy` and read back "
        "by `index_select` after `proj_out` over the whole sequence",
        timestep_scale=1.0,
        layout="packed",
    ),
    Case(
        "joyimage-edit",
        "JoyImage-Edit",
        "JoyImageEditTransformer3DModel",
        "JoyImageEditPipeline",
        image_more.tiny_joyimage_edit_transformer,
        image_more.joyimage_edit_call_kwargs,
        ras=False,
        reason="no 4-D or 5-D floating-point model input",
        note="6-D latents `[B, items, C, T, H, W]` (reference image, then target); the transformer moves the target "
        "to the front and folds the items into frames: tokens [target; reference]",
        pipeline=image_more.tiny_joyimage_edit_pipeline,
        pipeline_kwargs=image_more.joyimage_edit_pipeline_kwargs,
        per_branch=True,
    ),
    Case(
        "joyimage-edit-plus",
        "JoyImage-Edit-Plus",
        "JoyImageEditPlusTransformer3DModel",
        "JoyImageEditPlusPipeline",
        image_more.tiny_joyimage_edit_plus_transformer,
        image_more.joyimage_edit_plus_call_kwargs,
        ras=False,
        reason="no 4-D or 5-D floating-point model input",
        note="the pipeline patchifies the latents itself, `[B, P, C, 1, 2, 2]`: target patches, then each reference "
        "image's, zero-padded; RoPE per row from a Python `shape_list`, key mask over [patches; text]",
        pipeline=image_more.tiny_joyimage_edit_plus_pipeline,
        pipeline_kwargs=image_more.joyimage_edit_plus_pipeline_kwargs,
    ),
    Case(
        "kandinsky6-sr",
        "Kandinsky 6 SR",
        "Kandinsky6SRTransformer3DModel",
        "Kandinsky6SRPipeline",
        video_other.tiny_kandinsky6_sr_transformer,
        video_other.kandinsky6_sr_call_kwargs,
        ras=False,
        reason="no [B, N, C] tensor with N = H*W/p^2 after 'visual_embeddings'",
        note="channels-last latents `[B, T, H, W, C]`; sparse attention builds a block mask from the queries' and "
        "keys' block means (sort, in-place `cumsum_`) for flex attention",
        layout="video",
    ),
    Case(
        "wan-animate",
        "Wan 2.2 Animate",
        "WanAnimateTransformer3DModel",
        "WanAnimatePipeline",
        video_more.tiny_wan_animate_transformer,
        video_more.wan_animate_call_kwargs,
        ras=False,
        reason="(unflatten @ face_adapter.0) fails on the rewritten shapes",
        note="the face adapter regroups the image tokens by frame (each frame attends to its own face features)",
        pipeline=video_more.tiny_wan_animate_pipeline,
        pipeline_kwargs=video_more.wan_animate_pipeline_kwargs,
        per_branch=True,
        layout="video",
    ),
    Case(
        "wan-animate-2",
        "Wan-Animate-2",
        "WanAnimate2Transformer3DModel",
        None,
        video_more.tiny_wan_animate2_transformer,
        video_more.wan_animate2_call_kwargs,
        ras=False,
        reason="no image-token source found",
        note="lists of per-video latents, a reference K/V cache read through a flex BlockMask, graph breaks",
        per_branch=True,
        layout="video",
    ),
    Case(
        "cosmos3",
        "Cosmos 3",
        "Cosmos3OmniTransformer",
        "Cosmos3OmniPipeline",
        video_more.tiny_cosmos3_transformer,
        lambda batch=2, seed=0: video_more.cosmos3_call_kwargs(seed=seed),
        ras=False,
        reason="no [B, N, C] tensor with N = H*W/p^2 after 'proj_in'",
        note="one joint text and vision sequence without a batch axis, the vision patches scattered in by index",
        per_branch=True,
        layout="video",
    ),
    Case(
        "sana-wm",
        "SANA-WM",
        "SanaWMTransformer3DModel",
        "SanaWMPipeline",
        video_more.tiny_sana_wm_transformer,
        video_more.sana_wm_call_kwargs,
        ras=False,
        reason="(reshape @ blocks.0) fails on the rewritten shapes",
        note="per-frame adaLN (tokens regrouped by frame) and a gated delta rule scanned over frames",
        pipeline=video_more.tiny_sana_wm_pipeline,
        pipeline_kwargs=video_more.sana_wm_pipeline_kwargs,
        layout="video",
    ),
    Case(
        "z-image",
        "Z-Image",
        "ZImageTransformer2DModel",
        "ZImagePipeline",
        layouts.tiny_z_image_transformer,
        layouts.z_image_call_kwargs,
        ras=True,
        reason="latents as a list of per-row tensors, patchified and joined row by row ([image; caption], "
        "`pad_sequence`); run one generation before compiling: its first call builds the RoPE table under "
        "`with torch.device('cpu')`, which splits a graph compiled then at a graph break for good",
        pipeline=layouts.tiny_z_image_pipeline,
        pipeline_kwargs=layouts.z_image_pipeline_kwargs,
        timestep_scale=1.0,
        latents_key="x",
        timestep_key="t",
        layout="video",  # each row [C, F = 1, H, W]: stacked, 5-D latents of one frame
    ),
    Case(
        "ideogram4",
        "Ideogram 4",
        "Ideogram4Transformer2DModel",
        "Ideogram4Pipeline",
        layouts.tiny_ideogram4_transformer,
        layouts.ideogram4_call_kwargs,
        ras=True,
        reason="packed [pad; text; image] sequence, segment mask; its text rows (zero latents) are never selected, as "
        "reference tokens are; a second transformer runs the unconditional branch",
        pipeline=layouts.tiny_ideogram4_pipeline,
        pipeline_kwargs=layouts.ideogram4_pipeline_kwargs,
        timestep_scale=1.0,
        layout="packed",
    ),
    Case(
        "latte",
        "Latte",
        "LatteTransformer3DModel",
        "LattePipeline",
        layouts.tiny_latte_transformer,
        layouts.latte_call_kwargs,
        ras=True,
        reason="frames folded into the batch (spatial blocks `[B*F, HW, C]`, temporal `[B*HW, F, C]`): a token is a "
        "spatial site across all frames, so the temporal attention stays exact and needs no cache",
        pipeline=layouts.tiny_latte_pipeline,
        pipeline_kwargs=layouts.latte_pipeline_kwargs,
        layout="video",
    ),
    Case(
        "anyflow-far",
        "AnyFlow-FAR",
        "AnyFlowFARTransformer3DModel",
        "AnyFlowFARPipeline",
        layouts.tiny_anyflow_far_transformer,
        layouts.anyflow_far_call_kwargs,
        ras=False,
        reason="runs through flex_attention",
        note="chunk-wise K/V cache; flex attention over queries, keys and values zero-padded to a multiple of 128 "
        "(the pad keys are not masked, so every query's softmax depends on the query count)",
        pipeline=layouts.tiny_anyflow_far_pipeline,
        pipeline_kwargs=layouts.anyflow_far_pipeline_kwargs,
        layout="video",
    ),
    Case(
        "sana-video",
        "Sana-Video",
        "SanaVideoTransformer3DModel",
        "SanaVideoPipeline",
        video_more.tiny_sana_video_transformer,
        video_more.sana_video_call_kwargs,
        ras=False,
        reason="reduces or reorders along the token axis",
        note="linear attention sums over all tokens; the feed-forward convolves over the grid and across frames",
        layout="video",
    ),
    Case(
        "sana",
        "Sana",
        "SanaTransformer2DModel",
        "SanaPipeline",
        classic.tiny_sana_transformer,
        classic.sana_call_kwargs,
        ras=False,
        reason="contracts over the token axis",
        note="linear attention sums over all tokens; the feed-forward is a 3x3 convolution over the grid",
    ),
]


def _without_glyph(kwargs: dict) -> dict:
    """HunyuanImage's call without the ByT5 glyph inputs (a model built without ``text_embed_2_dim``)."""
    return {k: v for k, v in kwargs.items() if k not in ("encoder_hidden_states_2", "encoder_attention_mask_2")}


BY_KEY = {case.key: case for case in CASES}


def bench_results() -> dict:
    """Per-step results at ratio 0.25 of ``rascompile bench --model NAME --json docs/bench/NAME.json``, by name."""
    results = {}
    for path in sorted(BENCH_DIR.glob("*.json")):
        run = json.loads(path.read_text())
        rows = [r for r in run.get("per_step", []) if r.get("ratio") == 0.25 and r.get("fraction_of_ideal")]
        if rows:
            results[run["model"]["name"]] = {**rows[0], "machine": run["machine"]}
    return results


def _speedup(case: Case, results: dict) -> str:
    result = results.get(case.bench or "")
    if not result:
        return ""
    return f"{result['speedup']:.2f}x ({result['fraction_of_ideal']:.2f} of ideal)"


def supported_models_table() -> str:
    """docs/supported.md's model table, from ``CASES``."""
    results = bench_results()
    lines = [
        "| Model | Transformer | Pipeline | RAS | Notes | Per-step speedup at ratio 0.25 (CPU bench) |",
        "|---|---|---|---|---|---|",
    ]
    for case in CASES:
        status = "RAS" if case.ras else ("dense; RAS with `graph_pieces=True`" if case.pieces else "dense")
        notes = case.reason if case.ras else f'{case.note} (rascompile: "{case.reason}")'
        if case.pieces:
            notes += "; with `graph_pieces=True` RAS runs across its graphs, the invariants exact"
        pipeline = f"`{case.pipeline_class}`" if case.pipeline_class else ""
        lines.append(
            f"| {case.model} | `{case.transformer_class}` | {pipeline} | {status} | {notes} | "
            f"{_speedup(case, results)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(supported_models_table())
