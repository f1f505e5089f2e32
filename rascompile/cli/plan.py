"""``rascompile plan MODEL``: the memory a RAS generation needs (weights, caches, activations), before any run.

MODEL is a local pipeline or transformer directory (only its ``config.json`` is read) or the name of a published
checkpoint (``rascompile.published_configs``); the model is built on the meta device, so nothing is allocated or
downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .main import int_at_least, positive_int

DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..published_configs import PUBLISHED

    parser.add_argument(
        "model", help=f"a pipeline or transformer directory, or a published model: {', '.join(PUBLISHED)}"
    )
    parser.add_argument("--height", type=positive_int, default=None, help="pixels (default: the model's default)")
    parser.add_argument("--width", type=positive_int, default=None, help="pixels (default: the model's default)")
    parser.add_argument("--frames", type=positive_int, default=None, help="video frames (video models)")
    parser.add_argument("--batch", type=positive_int, default=None, help="rows per transformer call (CFG batch: 2)")
    parser.add_argument(
        "--branches", type=int_at_least(1), default=None, help="transformer calls per step (per-branch guidance: 2)"
    )
    parser.add_argument("--text-tokens", type=positive_int, default=None, help="text length (default: the pipeline's)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weights and caches (default bfloat16)")
    parser.add_argument(
        "--kv-cache-dtype", choices=("fp8_e4m3",), default=None, help="float8 K/V caches (RASConfig.kv_cache_dtype)"
    )
    parser.add_argument("--budget-gib", type=float, default=None, help="memory budget (default: free CUDA memory)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def main_from_args(args: argparse.Namespace) -> int:
    """Exit status 0 with the plan printed (1 when it does not fit the budget), 2 on bad input."""
    import torch

    from ..memory_plan import plan
    from ..published_configs import PUBLISHED, build_on_meta
    from .main import quiet_third_party

    quiet_third_party()
    dtype = getattr(torch, args.dtype)
    defaults = PUBLISHED.get(args.model)
    try:
        if args.budget_gib is not None and not args.budget_gib > 0:
            raise ValueError(f"--budget-gib {args.budget_gib} is invalid: must be > 0")
        if defaults is None and not Path(args.model).is_dir():
            raise ValueError(
                f"{args.model} is neither a directory nor a published model rascompile knows: {', '.join(PUBLISHED)}"
            )
        model = build_on_meta(args.model, dtype) if defaults is not None else args.model
        if defaults is None and (args.height is None or args.width is None):
            raise ValueError(f"--height and --width are required for {args.model} (no published default size)")
        result = plan(
            model,
            height=args.height or defaults.height,
            width=args.width or defaults.width,
            frames=args.frames or (defaults.frames if defaults else None),
            batch=args.batch or (defaults.batch if defaults else 1),
            branches=args.branches or (defaults.branches if defaults else None),
            text_tokens=args.text_tokens,
            dtype=dtype,
            budget_bytes=None if args.budget_gib is None else int(args.budget_gib * (1 << 30)),
            kv_cache_dtype=args.kv_cache_dtype,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.format())
    return 1 if result.fits is False else 0
