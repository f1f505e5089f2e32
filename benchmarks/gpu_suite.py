#!/usr/bin/env python
"""The GPU paths, measured: one command that checks and times rascompile's CUDA paths and writes docs/gpu.

On a fresh CUDA machine (this script installs nothing itself):

    python3 -m venv .venv && . .venv/bin/activate
    pip install torch==2.13.0                          # the CUDA build for the machine's driver
    pip install -e ".[test,tensorrt]"                  # pytest, triton, tensorrt, torch-tensorrt
    python benchmarks/gpu_suite.py --out docs/gpu      # ~8 minutes; writes results.json and README.md

Where the machine has no network, bring a prepared environment. This workplace's H200 image (no network)
has python3 3.12 with torch 2.11 + triton 3.6, onnx and onnxruntime, but not diffusers, tensorrt or
torch-tensorrt; there, carry diffusers' wheel (see /work/.library/device/README.md on carrying wheels) and
install this checkout without dependencies, e.g.
``pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site &&
pip install -q --no-deps --no-build-isolation -e . && python3 benchmarks/gpu_suite.py --out $OUT/gpu``
and copy $OUT/gpu back to docs/gpu. TensorRT's wheels are far over the carry limit, so the TensorRT parts
are skipped there with the reason (the ONNX export and the inductor baseline still run). That recipe, and
rascompile on torch 2.11 (pyproject asks for 2.13), are untested: no GPU was lent where this was written.

Without a GPU, ``--dry-run`` runs the same code paths at tiny sizes on the CPU (into a temporary directory,
never docs/gpu), skipping what needs CUDA or TensorRT with the reason; ``tests/kernels/test_gpu_suite.py`` runs it
in CI.

Time budget. A device machine is lent for about 15 minutes in all, start-up included: one prepared run and
one rerun. The stages below have their own budgets, which sum to 480 s by default (``--budget-s`` scales
them; ``--stage-budget NAME=SECONDS`` sets one). Between sub-steps a stage checks its clock; a stage past its
budget stops and is recorded as "cut short" (a single sub-step, such as one inductor compile, cannot be
interrupted, so a stage can overrun its budget by one sub-step). ``results.json`` is rewritten after every
sub-step and the README after every stage, so a run that is cut short, or killed, still reports what
finished. To rerun stages that were cut short, with more time, into the same directory (the other stages'
results are kept; each stage records the run it comes from):

    python benchmarks/gpu_suite.py --out docs/gpu --stage sd3 tensorrt --stage-budget sd3=300 tensorrt=150

A rerun on the same, still-held machine finds inductor's and Triton's on-disk caches warm, so its compile
times are cache hits (``env`` records whether the caches existed when the run began).

Stages, in order:

1. ``kernel_tests``: ``tests/kernels/test_kernels.py`` and ``test_kernels_quantized.py`` (the float8 epilogue)
   with real Triton on the GPU. Those files set
   ``TRITON_INTERPRET=1`` when imported and build their inputs on the CPU, so a plain
   ``pytest tests/kernels/test_kernels.py`` runs the interpreter whatever the environment says. The suite runs
   pytest in a subprocess without ``TRITON_INTERPRET`` that imports the Triton kernel first (so it is
   compiled for the GPU), undoes the file's setting, and moves each kernel call's inputs to the GPU (strides
   kept), comparing against the file's CPU torch references. Each kernel call runs one of the autotuner's
   configs, rotating through them, so every config meets the references and a cold run compiles once per
   call, not once per config (``--kernel-tests-autotune``: the autotuner's own pick). Counts are recorded.
2. ``kernel_speed``: ``linear_scatter_`` against ``F.linear`` + ``index_put_`` and against the model's
   norm/RoPE run separately (``benchmarks/kernel_speed.py``'s functions) for the K/V projections of
   SD3-medium, SD3.5-medium and Flux-dev at 1024x1024, ratios 0.5 and 0.25, bf16 and fp16; TFLOP/s and
   GB/s against the device's datasheet peaks.
3. ``sd3``: SD3-medium's architecture (24 layers, 24 heads x 64, random weights, bf16) at 1024x1024 with a
   CFG batch of 2, inductor: per-step dense vs RAS at ratios 0.5 and 0.25 with the fused K/V projection on
   and off, the 28-step loop at the paper's schedule against dense and the FLOP ideal, peak memory,
   compile times. ``flux``: a Flux-dev-shaped transformer (fewer blocks, see ``--flux-layers``): what
   rascompile reports for it (dense and the reason, in releases without packed-latent support), the dense
   step time, and RAS at ratios 0.5 and 0.25 where rascompile rewrites it.
4. ``tensorrt``: an SD3-shaped mid-size model (``rascompile bench``'s) exported to ONNX; TensorRT engines
   (fp16) and an 8-step RAS generation with ``TensorRTRunner``, the same with torch-tensorrt, compared with
   PyTorch (decisions, images) and timed per step against PyTorch inductor.
5. ``stacks``: offloading (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``, block-level group
   offloading) and a LoRA weight change after compiling, with ``rascompile.apply`` on the tiny Flux pipeline:
   RAS kept where the CPU tests keep it, dense with a warning that names the stack elsewhere, each image compared.
6. ``memory``: the RAS caches against the CUDA allocator (``rascompile.plan``, ``rascompile.release``, float8
   caches, the free-memory check), with ``tests/support/memory_on_device.py``.
7. ``context_parallel``: RAS under diffusers' Ulysses context parallelism on two GPUs (NCCL) against one GPU
   (``tests/support/context_parallel_on_device.py``; skipped with one GPU; the dry run: two gloo CPU processes).
8. ``report``: ``results.json`` and ``README.md`` (rendered from ``results.json`` by ``render_readme``;
   ``--render DIR`` re-renders a directory's README from its results).

Timings are medians of several repeats, with ``torch.cuda.synchronize()`` around each (kernels: Triton's
``do_bench`` medians).

This file is the command line; the stages are the modules of ``benchmarks/gpu/`` (see its ``__init__.py``). They
build the models and inputs, capture and rewrite the graphs, and time and measure them with ``rascompile.bench``
(``rascompile bench``'s code, given the suite's device and dtype), so the CPU bench and the GPU suite measure alike.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks.gpu (a namespace folder, as benchmarks/ has no __init__.py)

from benchmarks.gpu.config import (  # noqa: E402
    BUDGETS,
    DEFAULT_OUT,
    FLUX_DEFAULT_LAYERS,
    STAGES,
    TOTAL_BUDGET_S,
    stage_budgets,
)
from benchmarks.gpu.env import device_peaks, stage_env  # noqa: E402
from benchmarks.gpu.kernel_tests import kernel_tests_child, stage_kernel_tests  # noqa: E402
from benchmarks.gpu.on_device import stage_context_parallel, stage_memory, stage_stacks  # noqa: E402
from benchmarks.gpu.readme import render_readme, stage_report  # noqa: E402
from benchmarks.gpu.suite import Stage, Suite, _stage_record, write_atomically  # noqa: E402

#: What tests/kernels/test_gpu_suite.py uses of the suite, besides the command line (parse_args, main).
__all__ = [
    "BODIES",
    "BUDGETS",
    "STAGES",
    "Stage",
    "Suite",
    "_stage_record",
    "device_peaks",
    "main",
    "parse_args",
    "render_readme",
    "stage_budgets",
]


def imported_when_run(name: str) -> Callable[[Suite, Stage], None]:
    """The body of stage ``name``, whose module (``benchmarks/gpu/<name>.py``) is imported when the stage runs.

    Those modules import rascompile, and so ``torch._dynamo`` and with it Triton, which makes its own ``@jit``
    helpers at import as ``TRITON_INTERPRET`` then says: ``main`` settles that variable first (real Triton on a
    GPU), and the kernel tests' subprocess sets it before its own imports (the interpreter in the dry run); the
    modules imported above import none of that."""

    def body(suite: Suite, st: Stage) -> None:
        getattr(importlib.import_module(f"benchmarks.gpu.{name}"), f"stage_{name}")(suite, st)

    body.__name__ = f"stage_{name}"
    return body


#: The body of each stage, in ``STAGES`` order; ``main`` looks each up here when it runs it.
BODIES = {
    "env": stage_env,
    "kernel_tests": stage_kernel_tests,
    "kernel_speed": imported_when_run("kernel_speed"),
    "sd3": imported_when_run("sd3"),
    "flux": imported_when_run("flux"),
    "tensorrt": imported_when_run("tensorrt"),
    "stacks": stage_stacks,
    "memory": stage_memory,
    "context_parallel": stage_context_parallel,
    "report": stage_report,
}


def _layers(text: str) -> tuple[int, int]:
    try:
        double, single = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected DOUBLE,SINGLE block counts, got {text!r}") from None
    if double < 1 or single < 0:
        raise argparse.ArgumentTypeError(f"block counts must be >= 1 and >= 0, got {text!r}")
    return double, single


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Stages: {', '.join(STAGES)}; default budgets (s): "
        + ", ".join(f"{k} {v}" for k, v in BUDGETS.items()),
    )  # fmt: skip
    add = parser.add_argument
    add("--dry-run", action="store_true", help="tiny sizes on the CPU; skips what needs CUDA/TensorRT, saying why")
    add("--out", type=Path, default=None, help="results directory (default docs/gpu; a temporary one with --dry-run)")
    add("--stage", nargs="+", choices=[s for s in STAGES if s not in ("env", "report")], default=None,
        help="run only these stages (env and report always run); in an existing --out, replace only those")  # fmt: skip
    add("--budget-s", type=float, default=TOTAL_BUDGET_S, help=f"total seconds (default {TOTAL_BUDGET_S}); scales "
        "every stage's budget")  # fmt: skip
    add("--stage-budget", nargs="+", metavar="NAME=SECONDS", default=None, help="one stage's budget, in seconds")
    add("--flux-layers", type=_layers, default=FLUX_DEFAULT_LAYERS, metavar="DOUBLE,SINGLE",
        help="Flux blocks to build (default 2,4; Flux-dev has 19,38)")  # fmt: skip
    add("--repeats", type=int, default=10, help="timed repeats per step measurement on CUDA (default 10)")
    add("--kernel-tests-autotune", action="store_true", help="kernel tests: let the autotuner pick each call's "
        "config (default: rotate through the configs, one compile per call)")  # fmt: skip
    add("--render", type=Path, metavar="DIR", default=None, help="only re-render DIR/README.md from DIR/results.json")
    add("--kernel-tests-child", nargs=2, metavar=("DEVICE", "REPORT"), default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.kernel_tests_child:
        return kernel_tests_child(*args.kernel_tests_child, args.kernel_tests_autotune)
    if args.render is not None:
        path = args.render / "results.json"
        results = json.loads(path.read_text()) if path.is_file() else None
        write_atomically(args.render / "README.md", render_readme(results))
        print(f"wrote {args.render / 'README.md'} from {path if results else 'no results (the stub)'}")
        return 0
    try:
        stage_budgets(args.budget_s, args.stage_budget)
    except ValueError as exc:
        print(f"gpu_suite: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        out = args.out or Path(tempfile.mkdtemp(prefix="gpu_suite_dry_"))
        if out.resolve() == DEFAULT_OUT.resolve():
            print("gpu_suite: error: --dry-run never writes docs/gpu (give another --out)", file=sys.stderr)
            return 2
    else:
        if not torch.cuda.is_available():
            print("gpu_suite: error: no CUDA device; nothing was measured (use --dry-run to check the code paths "
                  "on the CPU)", file=sys.stderr)  # fmt: skip
            return 2
        out = args.out or DEFAULT_OUT
    interpret = os.environ.get("TRITON_INTERPRET")
    if not args.dry_run:
        os.environ.pop("TRITON_INTERPRET", None)  # real Triton for the kernels (read when they are compiled)
    with contextlib.suppress(Exception):  # quiet diffusers' dtype-cast notice for random-weight models
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
    suite = Suite(args, out)
    suite.results["runs"][-1]["triton_interpret_at_start"] = interpret
    mode = "DRY RUN (CPU, tiny sizes)" if suite.dry else f"CUDA: {torch.cuda.get_device_name(0)}"
    suite.log("suite", f"{mode}; out {out}; budget {suite.total_budget:g} s")
    for name in STAGES:
        suite.run_stage(name, BODIES[name])
    statuses = {name: suite.results["stages"][name]["status"] for name in STAGES}
    suite.log("suite", "done: " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    print(f"wrote {out / 'results.json'} and {out / 'README.md'}", flush=True)
    return 1 if "failed" in statuses.values() else 0


if __name__ == "__main__":
    sys.exit(main())
