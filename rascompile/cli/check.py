"""``rascompile check PIPELINE``: the checks of ``rascompile.check`` on a local diffusers pipeline (for CI)."""

from __future__ import annotations

import argparse
import sys

import torch

from ..check import check
from ..runtime.backend import INNER_BACKENDS
from .export import _side, load_pipeline
from .main import finite_float, int_at_least, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="local directory of a diffusers pipeline (DiffusionPipeline.from_pretrained)")
    parser.add_argument("--height", type=_side, default=None, help="image height in pixels (default: the pipeline's)")
    parser.add_argument("--width", type=_side, default=None, help="image width in pixels (default: the pipeline's)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help="prompt (needs the text encoders; default empty)")
    prompt.add_argument(
        "--embeddings",
        metavar="FILE",
        default=None,
        help="safetensors file of prompt embeddings named after the pipeline's call arguments (prompt_embeds, "
        "pooled_prompt_embeds, negative_prompt_embeds, ...), one row per prompt, as for rascompile export",
    )
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=None,
        help="classifier-free guidance scale; > 1 doubles the batch (default: the pipeline's)",
    )
    parser.add_argument("--num-images-per-prompt", type=positive_int, default=1, help="images per prompt (default 1)")
    parser.add_argument(
        "--seed", type=int_at_least(0), default=0, help="seed of the latents and the random token orders (default 0)"
    )
    parser.add_argument(
        "--inner-backend",
        choices=INNER_BACKENDS,
        default="eager",
        help="how the RAS graphs run: eager (the default: the rewrite itself), aot_eager, or inductor (as "
        "backend='ras' runs them; one compile per k)",
    )
    parser.add_argument("--require-ras", action="store_true", help="fail when a graph runs dense")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")


def main_from_args(args: argparse.Namespace) -> int:
    """Exit status: 0 every check passed, 1 a check failed (or a graph runs dense with --require-ras), 2 bad
    input or the check could not run (one line ``error: ...`` on stderr)."""
    from .main import quiet_third_party

    quiet_third_party()
    try:
        pipe, call_kwargs = load_pipeline(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        call_kwargs["generator"] = torch.Generator().manual_seed(args.seed)
        print(f"checking {type(pipe.transformer).__name__} of {type(pipe).__name__} ...", file=sys.stderr)
        report = check(
            pipe, call_kwargs, require_ras=args.require_ras, seed=args.seed, inner_backend=args.inner_backend
        )
    except ValueError as exc:  # InputError, CheckError
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.format())
    return 0 if report.passed else 1
