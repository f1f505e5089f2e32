"""The diffusion transformers rascompile is tested on: one entry per model, with what RAS does on it.

Each ``Case`` names the diffusers transformer (and pipeline) class, builds a tiny seeded model, gives the
keyword arguments its pipeline passes at one denoising step (batch 2) and says whether the passes rewrite
it (RAS) or why it runs dense. ``tests/integration/test_model_zoo.py`` checks every entry against the model-agnostic
invariants; ``python -m tests.support.zoo`` prints the README's supported-models table from this list, and a test
keeps the README's copy equal to it.
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
from tests.support import models_image_newer as newer
from tests.support import models_pieces as pieces
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
        reason="no image-token source found",
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
        reason="no attention reads the image tokens",
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
    """The README's table, from ``CASES``."""
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
