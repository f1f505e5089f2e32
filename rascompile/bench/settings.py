"""The benchmark's settings: sizes of the model and of the run (:class:`BenchSettings`), per family
(:func:`settings_for`), and what ``--smoke`` changes (:data:`SMOKE`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import RASConfig
from .flops import ModelSpec
from .models import MODEL_DEFAULTS, bench_model

__all__ = ["SMOKE", "BenchSettings", "settings_for"]


@dataclass(frozen=True)
class BenchSettings:
    """The benchmark's sizes and run settings. The defaults are the SD3 ones; :func:`settings_for` gives another
    family's (``bench_models.MODEL_DEFAULTS``)."""

    model: str = "sd3"  # the family: sd3, flux or wan (rascompile.bench.models)
    heads: int = 12
    head_dim: int = 64
    layers: int = 4  # sd3: joint blocks; flux: double-stream blocks; wan: blocks
    single_layers: int = 0  # flux: single-stream blocks
    frames: int = 1  # wan: latent frames
    latent_size: int = 64  # latent height = width (flux: before the pipeline's 2x2 packing)
    latent_channels: int = 16
    patch: int = 2  # flux: the pipeline's 2x2 packing; wan: the spatial patch (temporal 1)
    text_tokens: int = 77
    joint_dim: int = 768  # width of the text embeddings (wan: text_dim)
    pooled_dim: int = 768
    ratios: tuple[float, ...] = (0.75, 0.5, 0.25, 0.125)
    steps: int = 28
    start_step: int = 4
    reset_steps: tuple[int, ...] = (12, 20)
    loop_ratio: float = 0.25
    repeats: int = 5
    loop_repeats: int | None = None  # None: same as repeats
    inner_backend: str = "inductor"
    fused_kv_projection: bool | None = None  # None: the backend's default (fused on CUDA)
    eager_loop: bool = True
    threads: int | None = None
    seed: int = 0
    guidance_scale: float = 7.0
    progress: bool = True
    smoke: bool = False
    json_path: str | None = None

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def num_tokens(self) -> int:
        """N: image (video) tokens per image."""
        return self.frames * (self.latent_size // self.patch) ** 2

    @property
    def batch(self) -> int:
        """The batch of one transformer call: 2 for SD3 (classifier-free guidance batched), 1 for Flux
        (guidance-distilled) and Wan (one call per guidance branch)."""
        return 2 if self.model == "sd3" else 1

    def spec(self) -> ModelSpec:
        """The analytic FLOP model's sizes (SD3 only)."""
        if self.model != "sd3":
            raise ValueError(f"the analytic FLOP model is SD3's; --model {self.model} has its FLOPs measured")
        return ModelSpec(
            hidden=self.hidden,
            layers=self.layers,
            num_tokens=self.num_tokens,
            text_tokens=self.text_tokens,
            batch=self.batch,
            patch=self.patch,
            in_channels=self.latent_channels,
            out_channels=self.latent_channels,
            joint_dim=self.joint_dim,
            pooled_dim=self.pooled_dim,
        )

    def loop_config(self) -> RASConfig:
        # The reference's selection (high_ratio 1.0) drops exactly D tokens, so the loop's RAS steps run the
        # per-step figures' k = N - D (rascompile's default high_ratio rounds one token more in for some N).
        return RASConfig.reference_defaults(
            sample_ratio=self.loop_ratio,
            scheduler_start_step=self.start_step,
            error_reset_steps=self.reset_steps,
            num_inference_steps=self.steps,
        )


def settings_for(model: str, **changes) -> BenchSettings:
    """The default settings of ``model`` (a family of ``bench_models``), then ``changes``."""
    bench_model(model)  # refuse an unknown family
    return replace(BenchSettings(model=model), **{**MODEL_DEFAULTS[model], **changes})


#: What ``--smoke`` changes: a tiny model and a short run, for tests (``bench_models.MODEL_SMOKE`` adds a
#: family's own changes).
SMOKE = dict(
    heads=2,
    head_dim=16,
    layers=2,
    latent_size=16,
    text_tokens=8,
    joint_dim=32,
    pooled_dim=32,
    steps=6,
    start_step=2,
    reset_steps=(4,),
    repeats=1,
    loop_repeats=1,
    inner_backend="eager",
)
