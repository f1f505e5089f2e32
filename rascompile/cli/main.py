"""The ``rascompile`` command line.

Subcommands are registered in :data:`COMMANDS` as ``name -> (help, module, add_arguments, run)``: the
function ``module.add_arguments(parser)`` fills the subcommand's parser and ``module.run(args) -> int`` executes
it, returning the exit status. Adding a subcommand (``demo``, ``export``) is one entry here plus its module.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

#: name -> (one-line help, module, function adding the options, function running it)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "bench": (
        "time RAS against dense on a mid-size SD3, Flux or Wan transformer (per step, loop, overhead, memory)",
        "rascompile.bench.runner",
        "add_arguments",
        "main_from_args",
    ),
    "check": (
        "check that RAS computes what the model computes on a pipeline's transformer graphs (for CI)",
        "rascompile.cli.check",
        "add_arguments",
        "main_from_args",
    ),
    "demo": (
        "the shipped shapes model, dense and with RAS: images, time, speedup, quality, heatmaps (PNG)",
        "rascompile.cli.demo",
        "add_arguments",
        "main_from_args",
    ),
    "plan": (
        "the memory a RAS generation needs (weights, caches, activations) before any run, without the weights",
        "rascompile.cli.plan",
        "add_arguments",
        "main_from_args",
    ),
    "export": (
        "export a diffusers pipeline's transformer as ONNX dense and RAS step graphs (and TensorRT engines)",
        "rascompile.cli.export",
        "add_arguments",
        "main_from_args",
    ),
}


# ============================================================================================ option helpers
# Shared by the subcommands: argparse ``type=`` functions (argparse prints their message as one line naming the
# option, with exit status 2) and the checks of output paths that run before any slow work.

#: Longest user text echoed back in an error message; longer text is cut, with its length.
ECHO_LIMIT = 80


def echo(text: str, limit: int = ECHO_LIMIT) -> str:
    """``repr(text)``, cut to ``limit`` characters with an ellipsis and the full length when longer."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def int_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an int ``>= minimum`` (``why`` explains the minimum in the message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {echo(text)}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{why}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


positive_int = int_at_least(1)


def finite_float(text: str) -> float:
    """An argparse type: a finite float (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {echo(text)}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {echo(text)}")
    return value


def ratio(text: str, *, include_one: bool = True) -> float:
    """An argparse type: a sample ratio in (0, 1] (or (0, 1) without ``include_one``)."""
    value = finite_float(text)
    if not (0.0 < value < 1.0 or (include_one and value == 1.0)):
        allowed = "(0, 1]" if include_one else "(0, 1)"
        raise argparse.ArgumentTypeError(f"must be in {allowed}, got {echo(text)}")
    return value


def ratio_list(include_one: bool = True) -> Callable[[str], tuple[float, ...]]:
    """An argparse type: comma-separated sample ratios, each in (0, 1] (or (0, 1) without ``include_one``)."""

    def parse(text: str) -> tuple[float, ...]:
        parts = [part for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated ratios, got {echo(text)}")
        try:
            return tuple(ratio(part.strip(), include_one=include_one) for part in parts)
        except argparse.ArgumentTypeError as exc:
            if len(parts) == 1:
                raise
            raise argparse.ArgumentTypeError(f"{exc} (in {echo(text)})") from None

    parse.__name__ = "ratios"
    return parse


def _directory_problem(path: Path) -> str | None:
    """Why the directory ``path`` can neither be used nor created and written in, or None when it can."""
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a directory"
    ancestor = path
    while not ancestor.exists():
        if ancestor.is_symlink():
            return f"{ancestor} is a broken symbolic link"
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    try:
        # Create and remove a temporary directory: the one reliable test (``os.access`` says yes to root on
        # /proc and on read-only bind mounts).
        os.rmdir(tempfile.mkdtemp(prefix=".rascompile-probe-", dir=ancestor))
    except OSError as exc:
        return (
            f"cannot {'write in' if ancestor == path else 'create directories in'} {ancestor} ({exc.strerror or exc})"
        )
    return None


def check_output_directory(path: str | os.PathLike, option: str) -> Path:
    """Check, before any slow work, that ``path`` is a directory that exists or can be created, and is writable.

    Raises ``ValueError`` naming ``option``, the path and the problem. Creates nothing that stays."""
    path = Path(path)
    problem = _directory_problem(path)
    if problem is not None:
        raise ValueError(f"{option} {path}: {problem}")
    return path


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Check, before any slow work, that the file ``path`` can be written: not a directory, its directory exists
    or can be created, and is writable. Raises ``ValueError`` naming ``option``, the path and the problem."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a directory; give a file name")
    problem = _directory_problem(path.parent)
    if problem is None and path.exists():
        try:
            with open(path, "a"):
                pass
        except OSError as exc:
            problem = f"cannot write it ({exc.strerror or exc})"
    if problem is not None:
        raise ValueError(f"{option} {path}: {problem}")
    return path


#: The logger transformers' lazy imports write their notices to (``transformers.utils.import_utils``).
TRANSFORMERS_IMPORT_LOGGER = "transformers.utils.import_utils"


class _TorchvisionFallbackNotice(logging.Filter):
    """Drops transformers' notice that an image processor falls back to its PIL backend without torchvision:
    importing diffusers' pipelines loads those processors whatever the pipeline, and the fallback computes
    the same thing, so the notice says nothing about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_third_party() -> None:
    """Silence third-party output that does not concern the run (every command calls it before importing
    diffusers' pipelines): transformers' torchvision fallback notices. Every other transformers warning, such
    as one about the weights of the user's text encoder, still shows."""
    logger = logging.getLogger(TRANSFORMERS_IMPORT_LOGGER)
    if not any(isinstance(f, _TorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(_TorchvisionFallbackNotice())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rascompile",
        description="Region-Adaptive Sampling (RAS) for diffusers diffusion transformers, as a torch.compile backend.",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, module, add_arguments, run) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module), add_arguments)(command)
        command.set_defaults(_module=module, _run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .._extras import MissingExtra

    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    run = getattr(importlib.import_module(args._module), args._run)
    try:
        return int(run(args) or 0)
    except MissingExtra as exc:  # a subcommand used without its optional dependencies: one line, which extra
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
