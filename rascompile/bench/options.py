"""The options of ``rascompile bench`` and the :class:`BenchSettings` they give (:func:`settings_from_args`)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from ..cli.main import echo, int_at_least, positive_int, ratio, ratio_list
from ..runtime.backend import INNER_BACKENDS
from .models import MODEL_SMOKE, MODELS
from .settings import SMOKE, BenchSettings, settings_for

__all__ = ["add_arguments", "settings_from_args"]


_floats = ratio_list(include_one=False)  # the per-step table's ratios, each in (0, 1)
_positive = positive_int


def _ratio(text: str) -> float:
    return ratio(text, include_one=False)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {echo(text)}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"steps are counted from 0, got {echo(text)}")
    return values


def _defaults(field: str) -> str:
    """The per-family defaults of a ``BenchSettings`` field, for the help: ``sd3 4, flux 2, wan 4``."""
    values = [(name, getattr(settings_for(name), field)) for name in MODELS]
    if len({v for _, v in values}) == 1:
        return str(values[0][1])
    return ", ".join(f"{name} {value}" for name, value in values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``rascompile bench`` (defaults: the benchmark of the project's issue)."""
    parser.description = (
        "time RAS against dense execution on a mid-size transformer of one diffusers family (--model sd3, flux "
        "or wan): per step against the FLOP ideal, whole loop, overhead, memory"
    )
    d = BenchSettings()
    model = parser.add_argument_group(
        "model (random weights, fp32, the inputs its diffusers pipeline passes; defaults per --model)"
    )
    model.add_argument(
        "--model",
        choices=MODELS,
        default="sd3",
        help="the transformer: sd3 (SD3Transformer2DModel, CFG batch 2), flux (FluxTransformer2DModel: "
        "double- and single-stream blocks, packed latents, guidance-distilled, batch 1) or wan "
        "(WanTransformer3DModel: video latents, self- and cross-attention, one call of batch 1 per guidance "
        "branch) (default sd3)",
    )
    model.add_argument(
        "--layers",
        type=_positive,
        default=None,
        help=f"sd3: joint blocks; flux: double-stream blocks; wan: blocks (default {_defaults('layers')})",
    )
    model.add_argument(
        "--single-layers",
        type=_positive,
        default=None,
        help=f"flux only: single-stream blocks (default {settings_for('flux').single_layers})",
    )
    model.add_argument("--heads", type=_positive, default=None, help=f"attention heads (default {d.heads})")
    model.add_argument("--head-dim", type=_positive, default=None, help=f"channels per head (default {d.head_dim})")
    model.add_argument(
        "--latent-size",
        type=_positive,
        default=None,
        help=f"latent height = width (flux: before the 2x2 packing) (default {_defaults('latent_size')})",
    )
    model.add_argument(
        "--frames",
        type=_positive,
        default=None,
        help=f"wan only: latent frames (4 (F - 1) + 1 video frames) (default {settings_for('wan').frames})",
    )
    model.add_argument(
        "--text-tokens", type=_positive, default=None, help=f"prompt tokens (default {_defaults('text_tokens')})"
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--ratios",
        type=_floats,
        default=None,
        help="comma-separated sample ratios of the per-step table (default 0.75,0.5,0.25,0.125)",
    )
    run.add_argument("--steps", type=_positive, default=None, help=f"denoising steps of the loop (default {d.steps})")
    run.add_argument(
        "--start-step", type=_positive, default=None, help=f"scheduler_start_step (default {d.start_step})"
    )
    run.add_argument(
        "--reset-steps", type=_ints, default=None, help="comma-separated error_reset_steps (default 12,20)"
    )
    run.add_argument(
        "--loop-ratio", type=_ratio, default=None, help=f"sample ratio of the loop, in (0, 1) (default {d.loop_ratio})"
    )
    run.add_argument(
        "--repeats", type=_positive, default=None, help=f"timed repeats per measurement; median (default {d.repeats})"
    )
    run.add_argument(
        "--loop-repeats", type=_positive, default=None, help="timed repeats of each whole loop (default: --repeats)"
    )
    run.add_argument(
        "--inner-backend",
        choices=INNER_BACKENDS,
        default=None,
        help=f"backend compiling both dense and RAS graphs (default {d.inner_backend})",
    )
    run.add_argument(
        "--fused-kv-projection",
        choices=("auto", "on", "off"),
        default="auto",
        help="fuse K/V projections into rascompile::linear_scatter_: auto (on for CUDA), on or off (default auto)",
    )
    run.add_argument("--no-eager-loop", action="store_true", help="skip the dense eager loop")
    run.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads (default: torch's)")
    run.add_argument("--seed", type=int, default=None, help=f"seed of weights and inputs (default {d.seed})")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bars (on stderr)")
    run.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model (2 layers, 16x16 latents; flux 1+1 blocks; wan 2x8x8 latents), eager inner backend, "
        "1 repeat, 6 steps: a quick check",
    )
    run.add_argument("--json", dest="json_path", metavar="PATH", default=None, help="also write the numbers here")
    run.add_argument(
        "--context-parallel",
        type=int_at_least(2, " (a degree of 1 is the single-process bench: leave the option out)"),
        default=None,
        metavar="P",
        help="run under diffusers' Ulysses context parallelism of degree P (--model flux or wan), one process per "
        "rank: launch with torchrun --nproc-per-node P -m rascompile bench ... --context-parallel P; "
        "rank 0 prints every rank's dense and RAS step times and cache bytes",
    )


#: Options that apply to one family only: option -> (settings field, family)
_FAMILY_OPTIONS = {"--single-layers": ("single_layers", "flux"), "--frames": ("frames", "wan")}


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The family's defaults, then ``--smoke``'s changes, then the options given explicitly."""
    name = getattr(args, "model", None) or "sd3"
    for option, (field, family) in _FAMILY_OPTIONS.items():
        if getattr(args, field, None) is not None and name != family:
            raise ValueError(f"{option} applies to --model {family} only, not --model {name}")
    settings = settings_for(name, smoke=bool(args.smoke))
    if args.smoke:
        settings = replace(settings, **{**SMOKE, **MODEL_SMOKE[name]})
    given = {
        field: getattr(args, field)
        for field in (
            "layers",
            "single_layers",
            "heads",
            "head_dim",
            "latent_size",
            "frames",
            "text_tokens",
            "ratios",
            "steps",
            "start_step",
            "reset_steps",
            "loop_ratio",
            "repeats",
            "loop_repeats",
            "inner_backend",
            "threads",
            "seed",
            "json_path",
        )
        if getattr(args, field, None) is not None
    }
    settings = replace(settings, **given)
    fused = getattr(args, "fused_kv_projection", "auto")
    settings = replace(settings, fused_kv_projection={"auto": None, "on": True, "off": False}[fused])
    if args.no_eager_loop:
        settings = replace(settings, eager_loop=False)
    if args.no_progress:
        settings = replace(settings, progress=False)
    if settings.latent_size % settings.patch:
        raise ValueError(f"--latent-size={settings.latent_size} must be a multiple of the patch size {settings.patch}")
    if settings.model != "sd3" and (settings.head_dim < 8 or settings.head_dim % 2):
        raise ValueError(
            f"--head-dim={settings.head_dim}: --model {settings.model} splits each head's channels over three RoPE "
            "axes; give an even --head-dim of at least 8"
        )
    if settings.start_step >= settings.steps:
        raise ValueError(
            f"--steps {settings.steps} leaves no RAS step: it must be greater than --start-step "
            f"({settings.start_step}; the steps before it are dense)"
        )
    beyond = [step for step in settings.reset_steps if step >= settings.steps]
    if beyond:
        raise ValueError(
            f"--reset-steps (error_reset_steps) {','.join(map(str, settings.reset_steps))}: step(s) "
            f"{','.join(map(str, beyond))} are not steps of a --steps {settings.steps} loop (0 to {settings.steps - 1})"
        )
    settings.loop_config().validate_for(settings.steps, settings.num_tokens)  # fail before compiling anything
    return settings
