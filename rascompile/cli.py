"""The ``rascompile`` command line.

Subcommands are registered in :data:`COMMANDS` as ``name -> (help, module, add_arguments, run)``: the
function ``module.add_arguments(parser)`` fills the subcommand's parser and ``module.run(args) -> int`` executes
it, returning the exit status. Adding a subcommand (``demo``, ``export``) is one entry here plus its module.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: name -> (one-line help, module, function adding the options, function running it)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "bench": (
        "time RAS against dense execution on an SD3-shaped transformer (per step, whole loop, overhead, memory)",
        "rascompile.bench",
        "add_arguments",
        "main_from_args",
    ),
    "demo": (
        "the shipped shapes model, dense and with RAS: images, time, speedup, quality, heatmaps (PNG)",
        "rascompile.demo",
        "add_arguments",
        "main_from_args",
    ),
    "export": (
        "export a diffusers pipeline's transformer as ONNX dense and RAS step graphs (and TensorRT engines)",
        "rascompile.export_cli",
        "add_arguments",
        "main_from_args",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rascompile",
        description="Region-Adaptive Sampling (RAS) for diffusers diffusion transformers, as a torch.compile backend.",
    )
    from rascompile import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, module, add_arguments, run) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        getattr(importlib.import_module(module), add_arguments)(command)
        command.set_defaults(_module=module, _run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    run = getattr(importlib.import_module(args._module), args._run)
    return int(run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
