"""The small text-to-image model rascompile ships: an SD3 MMDiT over the shapes data set.

- Latent space: a fixed, invertible space-to-depth transform of the 32 x 32 RGB image
  (``pixel_unshuffle`` by 2: [12, 16, 16]); no VAE.
- Text: caption tokens embedded by a learned table (``CaptionEncoder``) into ``prompt_embeds`` and
  a pooled embedding, so no text encoder is needed.
- Transformer: diffusers' ``SD3Transformer2DModel`` (6 layers, hidden 192, patch 2: 64 image
  tokens), trained with rectified flow; sampled by ``StableDiffusion3Pipeline`` with
  ``FlowMatchEulerDiscreteScheduler``, so the real RAS compile path runs on it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import MAX_CAPTION_TOKENS, VOCABULARY, tokenize

WEIGHTS = Path(__file__).resolve().parent / "weights" / "shapes_dit.safetensors"
LATENT_SCALE = 2  # space-to-depth factor
PIXELS_PER_LATENT = 8  # StableDiffusion3Pipeline without a VAE maps height / 8 to latent rows


@dataclass(frozen=True)
class ShapesModelConfig:
    layers: int = 6
    heads: int = 6
    head_dim: int = 32
    text_dim: int = 64
    patch_size: int = 2
    latent_size: int = 16
    latent_channels: int = 12

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def token_grid(self) -> int:
        """Image tokens along each side of the (square) token grid."""
        return self.latent_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Image tokens per image."""
        return self.token_grid**2


class CaptionEncoder(torch.nn.Module):
    """Token ids [B, L] -> (prompt_embeds [B, L, D], pooled [B, D]): a learned table plus positions."""

    def __init__(self, dim: int):
        super().__init__()
        self.tokens = torch.nn.Embedding(len(VOCABULARY), dim)
        self.positions = torch.nn.Parameter(torch.zeros(MAX_CAPTION_TOKENS, dim))
        torch.nn.init.normal_(self.tokens.weight, std=0.5)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        present = (ids != 0).unsqueeze(-1).float()
        embeds = (self.tokens(ids) + self.positions) * present
        pooled = embeds.sum(1) / present.sum(1).clamp(min=1.0)
        return embeds, pooled


class ShapesModel(torch.nn.Module):
    def __init__(self, config: ShapesModelConfig | None = None):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.config = c = config or ShapesModelConfig()
        self.captions = CaptionEncoder(c.text_dim)
        self.transformer = SD3Transformer2DModel(
            sample_size=c.latent_size,
            patch_size=c.patch_size,
            in_channels=c.latent_channels,
            num_layers=c.layers,
            attention_head_dim=c.head_dim,
            num_attention_heads=c.heads,
            joint_attention_dim=c.text_dim,
            caption_projection_dim=c.hidden,
            pooled_projection_dim=c.text_dim,
            out_channels=c.latent_channels,
            pos_embed_max_size=c.token_grid,
        )

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The rectified-flow velocity (noise - data) at noise level ``sigma`` in [0, 1]."""
        embeds, pooled = self.captions(ids)
        return self.transformer(
            hidden_states=latents,
            timestep=sigma * 1000,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def save(self, path: str | Path, metadata: dict | None = None, dtype: torch.dtype = torch.float16) -> None:
        """Save the weights as ``dtype`` (float16 halves the file; ``load`` returns float32)."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        meta = {"config": json.dumps(asdict(self.config))} | {k: str(v) for k, v in (metadata or {}).items()}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path = WEIGHTS) -> ShapesModel:
        """Load weights saved by ``save`` (as float32).

        The file is checked before anything is allocated: it must be a safetensors file whose ``config`` metadata
        names :class:`ShapesModelConfig` fields with values in :data:`CONFIG_LIMITS`, and whose tensors have the
        names and shapes that config needs. A file that fails raises ``ValueError`` naming the file and the field
        or tensor (``FileNotFoundError`` when it does not exist).
        """
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: train the model first (python -m rascompile.demo.shapes.train)"
            )
        if not path.is_file():
            raise ValueError(f"shapes model weights {path} are not a file")
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
                shapes = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"shapes model weights {path} are not a readable safetensors file: {exc}") from None
        config = _config_from_metadata(path, metadata)
        _check_tensors(path, config, shapes)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"shapes model weights {path} cannot be read: {exc}") from None
        for name, value in tensors.items():
            if not torch.isfinite(value).all():
                raise ValueError(f"shapes model weights {path}: tensor {name} holds NaN or infinite values")
        model = cls(config)
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
        return model.eval()


#: Bounds ``ShapesModel.load`` accepts for each config field: 1 to 8 x the shipped model's value. A file asking
#: for more is corrupt or not a shapes model, and building it would allocate for minutes before failing.
CONFIG_LIMITS = {name: (1, 8 * value) for name, value in asdict(ShapesModelConfig()).items()}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _config_from_metadata(path: Path, metadata: dict) -> ShapesModelConfig:
    """The model config stored in a weights file's metadata, checked field by field."""
    if "config" not in metadata:
        raise ValueError(f"shapes model weights {path} have no 'config' metadata: not saved by ShapesModel.save")
    try:
        fields = json.loads(metadata["config"])
    except ValueError as exc:
        raise ValueError(f"shapes model weights {path}: the 'config' metadata is not valid JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"shapes model weights {path}: the 'config' metadata is not a JSON object")
    unknown = sorted(set(fields) - set(CONFIG_LIMITS))
    if unknown:
        raise ValueError(
            f"shapes model weights {path}: the 'config' metadata has unknown field(s) {', '.join(unknown)}; "
            f"the fields are {', '.join(CONFIG_LIMITS)}"
        )
    for name, value in fields.items():
        low, high = CONFIG_LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"shapes model weights {path}: config field {name}={value!r} is not an int")
        if not low <= value <= high:
            raise ValueError(f"shapes model weights {path}: config field {name}={value} is outside [{low}, {high}]")
    config = ShapesModelConfig(**fields)
    if config.latent_size % config.patch_size:
        raise ValueError(
            f"shapes model weights {path}: config field latent_size={config.latent_size} is not a multiple of "
            f"patch_size={config.patch_size}"
        )
    return config


def _check_tensors(path: Path, config: ShapesModelConfig, shapes: dict[str, tuple[list[int], str]]) -> None:
    """Compare the file's tensor names, shapes and dtypes with those ``config`` needs, without allocating:
    the expected state dict comes from a model built on the meta device."""
    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in ShapesModel(config).state_dict().items()}
    where = f"shapes model weights {path}"
    described = ", ".join(f"{k}={v}" for k, v in asdict(config).items())
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise ValueError(f"{where}: the tensors do not match the metadata config ({described}): {'; '.join(parts)}")
    for name, shape in expected.items():
        got, dtype = shapes[name]
        if got != shape:
            raise ValueError(
                f"{where}: tensor {name} has shape {got}, but the metadata config ({described}) needs {shape}"
            )
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where}: tensor {name} has dtype {dtype}; expected a float type")


def initialize_adaln_zero(transformer) -> None:
    """DiT's initialisation ("adaLN-Zero") for a transformer trained from scratch.

    diffusers builds ``SD3Transformer2DModel`` with PyTorch's default initialisation, which suits loading
    weights, not training. DiT (Peebles and Xie, 2023) found that starting every block as the identity
    trains much faster: the adaptive-norm modulations (shift, scale and gate) and the output projection
    start at zero, other linear layers are Xavier-uniform with zero bias, and the timestep MLP is N(0, 0.02).
    ``train`` applies it to every new model unless ``weight_init="default"`` asks for diffusers' initialisation.
    """
    for module in transformer.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
    patch = transformer.pos_embed.proj
    torch.nn.init.xavier_uniform_(patch.weight.view(patch.weight.shape[0], -1))
    torch.nn.init.zeros_(patch.bias)
    timestep = transformer.time_text_embed.timestep_embedder
    for linear in (timestep.linear_1, timestep.linear_2):
        torch.nn.init.normal_(linear.weight, std=0.02)
    zeroed = [transformer.norm_out.linear, transformer.proj_out]
    for block in transformer.transformer_blocks:
        zeroed += [block.norm1.linear, block.norm1_context.linear]
    for linear in zeroed:
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)


def to_latents(images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [-1, 1] -> latents [B, 12, 16, 16]."""
    return F.pixel_unshuffle(images, LATENT_SCALE)


def to_images(latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, 12, 16, 16] -> images [B, 3, 32, 32], clamped to [-1, 1]."""
    return F.pixel_shuffle(latents, LATENT_SCALE).clamp(-1, 1)


def make_pipeline(model: ShapesModel):
    """A ``StableDiffusion3Pipeline`` over the model's transformer (no VAE, no text encoders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=model.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(
    model: ShapesModel, captions: list[str], *, steps: int = 20, guidance_scale: float = 4.0, seed: int = 0
) -> dict:
    """Arguments of ``pipe(**...)`` generating one image per caption, with classifier-free guidance."""
    ids = torch.tensor([tokenize(c) for c in captions])
    with torch.no_grad():
        embeds, pooled = model.captions(ids)
        empty_embeds, empty_pooled = model.captions(torch.zeros_like(ids))
    size = model.config.latent_size * PIXELS_PER_LATENT
    return dict(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=empty_embeds,
        negative_pooled_prompt_embeds=empty_pooled,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )
