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
6. ``report``: ``results.json`` and ``README.md`` (rendered from ``results.json`` by ``render_readme``;
   ``--render DIR`` re-renders a directory's README from its results).

Timings are medians of several repeats, with ``torch.cuda.synchronize()`` around each (kernels: Triton's
``do_bench`` medians).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
DEFAULT_OUT = ROOT / "docs" / "gpu"
COMMAND = "python benchmarks/gpu_suite.py --out docs/gpu"
INSTALL = 'pip install torch==2.13.0 && pip install -e ".[test,tensorrt]"'

STAGES = (
    "env", "kernel_tests", "kernel_speed", "sd3", "flux", "tensorrt", "stacks", "memory", "context_parallel", "report",
)  # fmt: skip
#: Seconds per stage; they sum to 480 s (8 minutes), so that a rerun fits in the device lease too.
BUDGETS = {
    "env": 5, "kernel_tests": 45, "kernel_speed": 50, "sd3": 160, "flux": 40, "tensorrt": 85, "stacks": 20,
    "memory": 40, "context_parallel": 25, "report": 10,
}  # fmt: skip
TOTAL_BUDGET_S = sum(BUDGETS.values())
REPORT_RESERVE_S = 5.0  # kept back from the other stages for writing the report

#: Datasheet peaks without sparsity (approximate): dense bf16/fp16 tensor-core TFLOP/s, memory GB/s. Matched
#: against ``torch.cuda.get_device_name()`` in this order (first substring that matches).
DEVICE_PEAKS = (
    ("H200 NVL", "H200 NVL", 835.0, 4800.0),
    ("H200", "H200 SXM", 989.0, 4800.0),
    ("H100 NVL", "H100 NVL", 835.0, 3900.0),
    ("H100 PCIE", "H100 PCIe", 756.0, 2000.0),
    ("H100", "H100 SXM", 989.0, 3350.0),
    ("A100-SXM4-40GB", "A100 SXM 40GB", 312.0, 1555.0),
    ("A100-PCIE-40GB", "A100 PCIe 40GB", 312.0, 1555.0),
    ("A100 80GB PCIE", "A100 PCIe 80GB", 312.0, 1935.0),
    ("A100", "A100 SXM 80GB", 312.0, 2039.0),
    ("L40S", "L40S", 362.0, 864.0),
    ("L4", "L4", 121.0, 300.0),
)

# ---------------------------------------------------------------------------------------------- model sizes

#: SD3-medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers) at 1024x1024; 333 text tokens
#: (77 CLIP + 256 T5, the pipeline's default).
SD3_MEDIUM = dict(
    layers=24, heads=24, head_dim=64, latent=128, text_tokens=333, joint_dim=4096, pooled_dim=2048,
    pos_embed_max_size=192, in_channels=16, patch=2,
)  # fmt: skip
SD3_TINY = dict(
    layers=2, heads=2, head_dim=32, latent=16, text_tokens=8, joint_dim=32, pooled_dim=32,
    pos_embed_max_size=16, in_channels=16, patch=2,
)  # fmt: skip
#: Flux-dev's transformer (19 double-stream + 38 single-stream blocks) at 1024x1024: 128x128 latents packed
#: 2x2 into 4096 tokens of 64 channels, 512 T5 tokens, batch 1 (guidance-distilled: no CFG batch).
FLUX_DEV = dict(
    num_layers=19, num_single_layers=38, heads=24, head_dim=128, in_channels=64, joint_dim=4096,
    pooled_dim=768, axes=(16, 56, 56), side=64, text_tokens=512,
)  # fmt: skip
FLUX_TINY = dict(
    num_layers=1, num_single_layers=2, heads=2, head_dim=16, in_channels=16, joint_dim=32, pooled_dim=32,
    axes=(4, 6, 6), side=8, text_tokens=8,
)  # fmt: skip
FLUX_DEFAULT_LAYERS = (2, 4)  # double, single blocks timed by default: the whole model does not fit the budget

SD3_LOOP = dict(sample_ratio=0.25, scheduler_start_step=4, error_reset_steps=(12, 20), num_inference_steps=28)
SD3_RATIOS = (0.5, 0.25)
TRT_CONFIG = dict(num_inference_steps=8, sample_ratio=0.5, scheduler_start_step=2, error_reset_steps=(5,))
TRT_TOLERANCE = {"onnxruntime": 1e-4, "tensorrt": 5e-2, "torch-tensorrt": 1e-2}  # rtol = atol, on latents
TRT_PART = "TensorRT engines: build_engines, TensorRTRunner generation and step times"
TTRT_PART = "torch-tensorrt: compile_torch_tensorrt, TorchTensorRTRunner generation and step times"
KERNEL_RATIOS = (0.5, 0.25)
KERNEL_DTYPES = ("bfloat16", "float16")


# ---------------------------------------------------------------------------------------------- the suite


class CutShort(Exception):
    """A stage ran past its budget; the sub-steps not yet begun are not run."""


class SkipStage(Exception):
    """The whole stage cannot run here (the message says why)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Suite:
    def __init__(self, args: argparse.Namespace, out: Path):
        self.t0 = time.perf_counter()
        self.dry = bool(args.dry_run)
        self.cuda = torch.cuda.is_available() and not self.dry
        self.device = "cuda" if self.cuda else "cpu"
        self.out = out
        self.args = args
        self.total_budget = float(args.budget_s)
        self.budgets = stage_budgets(args.budget_s, args.stage_budget)
        self.selected = set(args.stage) if args.stage else set(STAGES)
        self.selected |= {"env", "report"}
        self.results = self._initial_results()

    def _initial_results(self) -> dict:
        run = {
            "started": _now(),
            "argv": sys.argv[1:],
            "dry_run": self.dry,
            "device": self.device,
            "budget_s": self.total_budget,
            "stages": [s for s in STAGES if s in self.selected],
        }
        previous = self.out / "results.json"
        earlier = json.loads(previous.read_text()) if self.args.stage and previous.is_file() else None
        if earlier and not self.dry and earlier.get("dry_run") is False:
            results = earlier  # a rerun of some stages on a GPU: keep the others
            results.setdefault("runs", []).append(run)
        else:
            results = {"suite": "benchmarks/gpu_suite.py", "runs": [run], "stages": {}}
        results["dry_run"] = self.dry
        for name in STAGES:
            if name not in self.selected and name not in results["stages"]:
                results["stages"][name] = _stage_record("skipped", "not selected (--stage)", self.budgets[name])
        return results

    @property
    def run_index(self) -> int:
        return len(self.results["runs"]) - 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, stage: str, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {stage:<12} {message}", flush=True)

    def save(self) -> None:
        self.results["runs"][-1]["elapsed_s"] = round(self.elapsed(), 2)
        write_atomically(self.out / "results.json", json.dumps(self.results, indent=2, default=_json_default) + "\n")

    def save_readme(self) -> None:
        write_atomically(self.out / "README.md", render_readme(self.results))

    def run_stage(self, name: str, body: Callable[[Suite, Stage], None]) -> None:
        if name not in self.selected:
            return
        left = self.total_budget - self.elapsed() - (0 if name == "report" else REPORT_RESERVE_S)
        budget = max(0.0, min(self.budgets[name], left))
        stage = Stage(self, name, budget)
        self.results["stages"][name] = stage.record
        stage.record["run"] = self.run_index
        self.log(name, f"begins (budget {budget:.0f} s)")
        try:
            if budget <= 0:
                raise CutShort(f"no time left of the --budget-s {self.total_budget:g} s total")
            with torch.no_grad():
                body(self, stage)
        except CutShort as exc:
            stage.finish("cut short", str(exc))
        except SkipStage as exc:
            stage.finish("skipped", str(exc))
        except Exception as exc:  # noqa: BLE001 - record it, keep going with the next stage
            stage.record["error"] = traceback.format_exc()[-4000:]
            stage.finish("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        else:
            failed = [c["name"] for c in stage.record["checks"] if not c["passed"]]
            if failed:
                stage.finish("failed", "check(s) failed: " + "; ".join(failed))
            else:
                stage.finish("ok", None)
        finally:
            torch._dynamo.reset()
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.save()
        self.save_readme()


def _stage_record(status: str, reason: str | None, budget: float) -> dict:
    return {
        "status": status,
        "reason": reason,
        "budget_s": round(budget, 1),
        "elapsed_s": 0.0,
        "steps": [],
        "skipped": [],
        "checks": [],
        "data": {},
    }


class Stage:
    def __init__(self, suite: Suite, name: str, budget: float):
        self.suite, self.name, self.budget = suite, name, budget
        self.t0 = time.perf_counter()
        self.record = _stage_record("running", None, budget)

    @property
    def data(self) -> dict:
        return self.record["data"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        """One sub-step: refused (CutShort) when the stage's budget is spent; its time is recorded."""
        if self.elapsed() > self.budget:
            raise CutShort(f"budget of {self.budget:.3g} s spent after {self.elapsed():.3g} s, before '{label}'")
        self.suite.log(self.name, f"{label} (stage {self.elapsed():.1f}/{self.budget:.0f} s)")
        start = time.perf_counter()
        entry = {"name": label, "elapsed_s": None}
        self.record["steps"].append(entry)
        try:
            yield
        finally:
            entry["elapsed_s"] = round(time.perf_counter() - start, 3)
            self.record["elapsed_s"] = round(self.elapsed(), 2)
            self.suite.save()

    def skip_part(self, what: str, reason: str) -> None:
        self.record["skipped"].append({"what": what, "reason": reason})
        self.suite.log(self.name, f"skipped: {what}: {reason}")

    def check(self, name: str, passed: bool, detail: str) -> bool:
        self.record["checks"].append({"name": name, "passed": bool(passed), "detail": detail})
        self.suite.log(self.name, f"check {'passed' if passed else 'FAILED'}: {name}: {detail}")
        return bool(passed)

    def finish(self, status: str, reason: str | None) -> None:
        self.record["status"], self.record["reason"] = status, reason
        self.record["elapsed_s"] = round(self.elapsed(), 2)
        self.suite.log(self.name, f"{status}{': ' + reason if reason else ''} ({self.elapsed():.1f} s)")


def stage_budgets(total: float, overrides: list[str] | None) -> dict[str, float]:
    scale = float(total) / TOTAL_BUDGET_S
    budgets = {name: seconds * scale for name, seconds in BUDGETS.items()}
    for item in overrides or []:
        name, _, value = item.partition("=")
        if name not in BUDGETS or not value:
            raise ValueError(f"--stage-budget {item!r}: expected NAME=SECONDS with NAME one of {', '.join(STAGES)}")
        budgets[name] = float(value)
    return budgets


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return repr(value)


# ---------------------------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def first_call_s(fn: Callable, device: str) -> float:
    """Seconds of one call (the first call of a compiled graph: compile + run)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_interleaved(fns: dict[str, Callable], repeats: int, device: str) -> dict[str, dict]:
    """Median seconds per call of each function, after one warm-up call each; repeats are interleaved so
    that drift affects every function alike. Every call is bracketed by synchronizations."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(v), "times_s": v} for name, v in times.items()}


def peak_memory(fn: Callable, device: str) -> dict | None:
    """Peak CUDA allocator bytes during one call: absolute, and above what was allocated before it."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mib": peak / 2**20, "above_live_mib": (peak - before) / 2**20}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    scale = expected.abs().max().item()
    return (got - expected).abs().max().item() / max(scale, 1e-12)


# ---------------------------------------------------------------------------------------------- stage: env


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> dict | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    fields = "name,driver_version,memory.total,clocks.max.sm,power.limit,pci.bus_id"
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[-300:]}
    gpus = [dict(zip(fields.split(","), (v.strip() for v in line.split(",")))) for line in out.stdout.splitlines()]
    return {"gpus": gpus}


def device_peaks(name: str | None) -> dict:
    upper = (name or "").upper()
    for key, label, tflops, gbps in DEVICE_PEAKS:
        if key in upper:
            return {"device": label, "tflops_bf16_fp16": tflops, "gbps": gbps, "source": "datasheet, dense"}
    return {"device": "unknown", "tflops_bf16_fp16": None, "gbps": None, "source": "unknown device"}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (working tree modified)" if dirty.stdout.strip() else "")


def stage_env(suite: Suite, st: Stage) -> None:
    with st.step("versions, device, driver"):
        from rascompile.bench.runner import machine_info

        info = machine_info()
        info["versions"] = {
            dist: _version(dist)
            for dist in (
                "torch", "triton", "tensorrt", "torch_tensorrt", "diffusers", "onnx", "onnxruntime",
                "onnxruntime-gpu", "rascompile", "numpy", "pytest",
            )
        }  # fmt: skip
        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        info["triton_interpret_at_start"] = suite.results["runs"][-1].get("triton_interpret_at_start")
        cache = Path(tempfile.gettempdir()) / f"torchinductor_{os.environ.get('USER', '') or os.getuid()}"
        info["inductor_cache_existed"] = cache.is_dir()
        info["git_commit"] = _git_commit()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {
                "name": torch.cuda.get_device_name(0),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
                "count": torch.cuda.device_count(),
                "cudnn": torch.backends.cudnn.version(),
            }
        info["nvidia_smi"] = nvidia_smi()
        info["peaks"] = device_peaks(info.get("gpu", {}).get("name"))
        st.data.update(info)
    gpu = st.data.get("gpu", {}).get("name", "none")
    smi = st.data["nvidia_smi"]
    driver = smi["gpus"][0].get("driver_version") if smi and smi.get("gpus") else None
    versions = st.data["versions"]
    suite.log(
        "env",
        f"torch {torch.__version__}, triton {versions['triton']}, tensorrt {versions['tensorrt']}, GPU {gpu}, "
        f"driver {driver or 'n/a (no nvidia-smi)'}",
    )
    if suite.dry:
        st.skip_part("GPU properties and driver", "dry run: no CUDA device is used (nvidia-smi read if present)")


# ---------------------------------------------------------------------------------------------- stage: kernel tests


def _to_device(value, device: str):
    """``value`` on ``device`` with the same sizes, strides and storage offset (non-contiguous views stay so)."""
    if not isinstance(value, torch.Tensor) or value.device.type == device:
        return value
    base = value if value._base is None else value._base
    moved = base.to(device).as_strided(value.size(), value.stride(), value.storage_offset())
    if moved.stride() != value.stride() or not torch.equal(moved.cpu(), value):
        raise RuntimeError("could not move a strided test input to the device unchanged")
    return moved


class _PytestReport:
    """A pytest plugin that writes the outcome counts to a JSON file after every test (a killed run keeps them)."""

    def __init__(self, path: str, info: dict):
        self.path, self.info = path, info
        self.counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        self.failures: list[dict] = []
        self.collected = None

    def pytest_collection_finish(self, session) -> None:
        self.collected = len(session.items)
        self._write()

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "setup" and report.skipped:
            key = "skipped"
        elif report.failed:
            key = "failed" if report.when == "call" else "errors"
            self.failures.append({"test": report.nodeid, "when": report.when, "message": str(report.longrepr)[-800:]})
        elif report.when == "call" and report.passed:
            key = "passed"
        else:
            return
        self.counts[key] += 1
        self._write()

    def _write(self) -> None:
        data = {"collected": self.collected, **self.counts, "failures": self.failures[:20], **self.info}
        Path(self.path).write_text(json.dumps(data, indent=2))


#: The kernel test files the ``kernel_tests`` stage runs with their kernel calls on the device.
KERNEL_TEST_FILES = ("test_kernels.py", "test_kernels_quantized.py")


def _to_cpu(result):
    return tuple(t.cpu() for t in result) if isinstance(result, tuple) else result.cpu()


def kernel_tests_child(device: str, report_path: str, autotune: bool) -> int:
    """Run the kernel test files (``KERNEL_TEST_FILES``: the float8 epilogue's too) with their kernel calls on
    ``device`` (the subprocess of ``kernel_tests``).

    By default each kernel call runs one of the autotuner's configs, rotating through them, so that every
    config is run against the references and each call compiles once instead of once per config (cold Triton
    compiles would not fit the stage's budget otherwise). ``autotune``: the autotuner's own choice per call
    (then only the configs it picks are compared with the references)."""
    if device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)  # real Triton: the kernel module reads it when imported
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # the dry run: Triton's interpreter on CPU tensors
    import pytest

    import rascompile.kernels.triton_linear_scatter as kernel_module

    kernel = kernel_module._linear_scatter_kernel
    kernel_fn = getattr(kernel, "fn", kernel)
    sys.path.insert(0, str(ROOT))  # the tests package (tests.support, tests.kernels)
    from tests.kernels import test_kernels, test_kernels_quantized  # set TRITON_INTERPRET=1 at import (CPU suite)

    if device == "cuda":
        os.environ["TRITON_INTERPRET"] = "0"  # ... undone: Triton (>= 3.4) reads it again at each launch
    info = {
        "device": device,
        "kernel_object": type(kernel_fn).__name__,
        "interpreted": bool(kernel_module._interpreting()),
        "kernel_calls_on_device": 0,
    }
    reference_runs = {test_kernels: test_kernels.run_kernel, test_kernels_quantized: test_kernels_quantized.run_kernel}
    configs = list(getattr(kernel, "configs", []))
    rotate = not autotune and len(configs) > 1
    info["autotune"] = "every config of the autotuner per call" if not rotate else "one config per call, rotating"
    info["configs"] = len(configs)
    used: set[int] = set()
    info["configs_unusable"] = []
    unusable = tuple(
        getattr(errors, name)
        for errors in [importlib.import_module("triton.runtime.errors")]
        for name in ("OutOfResources", "PTXASError")
        if hasattr(errors, name)
    )

    def on_device(reference_run):
        def run_kernel_on_device(case):
            call = info["kernel_calls_on_device"]
            info["kernel_calls_on_device"] += 1
            moved = {name: _to_device(value, device) for name, value in case.items()}
            if not rotate:
                return _to_cpu(reference_run(moved))
            kernel.configs = [configs[call % len(configs)]]  # one config: the autotuner runs it without benchmarking
            try:
                result = reference_run(moved)
                used.add(call % len(configs))
                info["configs_exercised"] = len(used)
            except unusable as exc:  # as the autotuner does, skip a config the shape cannot run; autotune this call
                info["configs_unusable"].append(f"config {call % len(configs)}: {type(exc).__name__}")
                kernel.configs = configs
                result = reference_run(moved)
            finally:
                kernel.configs = configs
            return _to_cpu(result)

        return run_kernel_on_device

    for module, reference_run in reference_runs.items():
        module.run_kernel = on_device(reference_run)
    plugin = _PytestReport(report_path, info)
    files = [str(TESTS / "kernels" / name) for name in KERNEL_TEST_FILES]
    args = [*files, "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT)]
    return int(pytest.main(args, plugins=[plugin]))


def stage_kernel_tests(suite: Suite, st: Stage) -> None:
    if importlib.util.find_spec("triton") is None:
        raise SkipStage("triton is not installed (pip install -e '.[test]'); the kernel needs it on CUDA")
    if suite.dry:
        st.skip_part(
            "real Triton on a GPU",
            "dry run, no CUDA: the same harness runs the kernel tests through Triton's interpreter "
            "(TRITON_INTERPRET=1)",
        )
    report = Path(tempfile.mkdtemp(prefix="gpu_suite_kernel_tests_")) / "report.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--kernel-tests-child", suite.device, str(report)]
    cmd += ["--kernel-tests-autotune"] if suite.args.kernel_tests_autotune else []
    tests = " ".join(f"tests/kernels/{name}" for name in KERNEL_TEST_FILES)
    st.data.update({"command": f"pytest {tests} (kernel calls moved to the device)", "mode": None})
    with st.step(f"pytest {tests}, kernel calls on {suite.device}"):
        timeout = max(5.0, st.left())
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            returncode, timed_out = proc.returncode, False
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            returncode, timed_out = None, True
            tail = ((exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"))[-3000:]
    counts = json.loads(report.read_text()) if report.is_file() else {}
    shutil.rmtree(report.parent, ignore_errors=True)
    st.data.update(counts)
    st.data["returncode"] = returncode
    st.data["output_tail"] = tail
    st.data["mode"] = "Triton interpreter on CPU (dry run)" if counts.get("interpreted") else "real Triton"
    if timed_out:
        raise CutShort(f"pytest did not finish in the stage's budget ({counts.get('passed', 0)} passed so far)")
    if not counts:
        raise RuntimeError(f"pytest wrote no report (exit status {returncode}): {tail[-500:]}")
    st.check(
        "kernel tests pass",
        returncode == 0 and counts["failed"] == 0 and counts["errors"] == 0,
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped of {counts['collected']}; exit status {returncode}",
    )
    st.check(
        "the kernel ran where intended",
        counts["kernel_calls_on_device"] > 0 and counts["interpreted"] == suite.dry,
        f"{counts['kernel_calls_on_device']} kernel calls on {suite.device}, kernel object "
        f"{counts['kernel_object']}, interpreter {'on' if counts['interpreted'] else 'off'}",
    )


# ---------------------------------------------------------------------------------------------- stage: kernel speed


def load_kernel_benchmark():
    """benchmarks/kernel_speed.py as a module (it is a script, not part of the package)."""
    name = "rascompile_kernel_benchmark"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "kernel_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def kernel_shapes(kb, dry: bool) -> tuple[dict, int]:
    """The K/V projections measured, and the image tokens N. Flux-dev: to_k Linear(3072, 3072) with bias,
    per-head RMSNorm over 128 and interleaved RoPE; its cache is [B, T, H, D] with the 512 text rows first
    (placed after the image rows here, as for the other shapes: the same work)."""
    if dry:
        s = kb.Shape
        return {
            "sd3-medium": s(c_in=64, heads=4, head_dim=16, bias=True, text_tokens=8, token_axis=2),
            "sd3.5-medium": s(c_in=64, heads=4, head_dim=16, bias=True, norm="rms_norm", norm_group=16,
                              text_tokens=8, token_axis=2),
            "flux-dev": s(c_in=64, heads=4, head_dim=16, bias=True, norm="rms_norm", norm_group=16, rope=True,
                          text_tokens=8, token_axis=1),
        }, 256  # fmt: skip
    flux = kb.Shape(
        c_in=3072, heads=24, head_dim=128, bias=True, norm="rms_norm", norm_group=128, rope=True,
        text_tokens=512, token_axis=1,
    )  # fmt: skip
    return {"sd3-medium": kb.MODELS["sd3-medium"], "sd3.5-medium": kb.MODELS["sd3.5-medium"], "flux-dev": flux}, 4096


@contextlib.contextmanager
def _image_tokens(kb, n: int) -> Iterator[None]:
    """benchmarks/kernel_speed.py's N (a module constant its helpers read), set for the dry run's tiny shapes."""
    saved = kb.IMAGE_TOKENS
    kb.IMAGE_TOKENS = n
    try:
        yield
    finally:
        kb.IMAGE_TOKENS = saved


def _cpu_median_ms(fn: Callable, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure_kernel(kb, name: str, s, ratio: float, dtype: torch.dtype, n: int, device: str, peaks: dict) -> dict:
    """benchmarks/kernel_speed.py's ``measure`` on ``device`` (CUDA: do_bench medians; CPU: perf_counter medians),
    plus GB/s and the shares of the device's peaks. The correctness check's error is kept, not raised."""
    if device == "cuda":
        from triton.testing import do_bench

        timer = lambda fn: do_bench(fn, return_mode="median")  # noqa: E731
    else:
        timer = _cpu_median_ms
    k = kb.active_tokens(ratio, n)
    t = kb.make_inputs(s, k, dtype, device)
    try:
        kb.check(s, t, dtype, f"{name}, ratio {ratio}, {dtype}")
        mismatch = None
    except AssertionError as exc:
        mismatch = str(exc).splitlines()[0][:300]
    ms = {
        "fused": timer(lambda: kb.fused(s, t)),
        "unfused": timer(lambda: kb.unfused(s, t)),
        "matmul_copy": timer(lambda: kb.unfused(s, t, epilogue=False)),
    }
    elem = torch.finfo(dtype).bits // 8
    flops = kb.flops(s, k)
    bytes_ = {
        "fused": kb.fused_bytes(s, k, elem),
        "unfused": kb.unfused_bytes(s, k, elem),
        "matmul_copy": kb.unfused_bytes(s, k, elem, epilogue=False),
    }
    row = {
        "model": name, "ratio": ratio, "dtype": str(dtype).removeprefix("torch."), "k": k, "n": n,
        "batch": kb.BATCH, "c_in": s.c_in, "c_out": s.c_out, "norm": s.norm, "rope": s.rope, "flops": flops,
        "matches_unfused": mismatch is None, "mismatch": mismatch,
    }  # fmt: skip
    for variant in ms:
        row[f"{variant}_ms"] = ms[variant]
        row[f"{variant}_bytes"] = bytes_[variant]
        row[f"{variant}_tflops"] = flops / ms[variant] / 1e9
        row[f"{variant}_gbps"] = bytes_[variant] / ms[variant] / 1e6
    row["speedup_vs_unfused"] = ms["unfused"] / ms["fused"]
    # into a float8 cache with scales (kv_cache_dtype="fp8_e4m3"): the quantization in the kernel's epilogue
    row["fused_fp8_ms"] = timer(lambda: kb.fused_fp8(s, t))
    row["unfused_fp8_ms"] = timer(lambda: kb.unfused_fp8(s, t))
    row["speedup_fp8_vs_unfused"] = row["unfused_fp8_ms"] / row["fused_fp8_ms"]
    row["speedup_vs_matmul_copy"] = ms["matmul_copy"] / ms["fused"]
    tflops, gbps = peaks.get("tflops_bf16_fp16"), peaks.get("gbps")
    row["fused_pct_peak_tflops"] = 100 * row["fused_tflops"] / tflops if tflops else None
    row["fused_pct_peak_gbps"] = 100 * row["fused_gbps"] / gbps if gbps else None
    return row


def stage_kernel_speed(suite: Suite, st: Stage) -> None:
    import rascompile.kernels.linear_scatter  # noqa: F401  (registers torch.ops.rascompile.linear_scatter_)

    kb = load_kernel_benchmark()
    shapes, n = kernel_shapes(kb, suite.dry)
    peaks = device_peaks(torch.cuda.get_device_name(0) if suite.cuda else None)
    st.data.update({"batch": kb.BATCH, "image_tokens": n, "peaks": peaks, "rows": []})
    if suite.dry:
        st.skip_part(
            "the Triton kernel's speed",
            "no CUDA: on the CPU linear_scatter_ runs its plain torch version, so these tiny-shape numbers "
            "time that, not the kernel (the kernel's interpreter run is in kernel_tests)",
        )
    elif importlib.util.find_spec("triton") is None:
        raise SkipStage("triton is not installed: on CUDA linear_scatter_ would run its torch version")
    with _image_tokens(kb, n):
        for name, s in shapes.items():
            for ratio in KERNEL_RATIOS:
                for dtype_name in KERNEL_DTYPES:
                    with st.step(f"{name} ratio {ratio:g} {dtype_name}"):
                        row = measure_kernel(kb, name, s, ratio, getattr(torch, dtype_name), n, suite.device, peaks)
                        st.data["rows"].append(row)
                    suite.log(
                        st.name,
                        f"  fused {row['fused_ms']:.4f} ms, unfused {row['unfused_ms']:.4f} ms "
                        f"({row['speedup_vs_unfused']:.2f}x), mm+copy {row['matmul_copy_ms']:.4f} ms",
                    )
    bad = [f"{r['model']} {r['ratio']:g} {r['dtype']}" for r in st.data["rows"] if not r["matches_unfused"]]
    st.check(
        "fused cache equals the unfused ops' cache",
        not bad,
        f"{len(st.data['rows']) - len(bad)} of {len(st.data['rows'])} cases match"
        + (f"; mismatches: {', '.join(bad)}" if bad else ""),
    )


# ---------------------------------------------------------------------------------------------- transformers


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``rascompile.bench.runner.build_model``'s random weights, drawn on the model's device: matrices ~ N(0, 1/fan_in),
    norm scales ~ 1 + N(0, 0.02^2), biases ~ N(0, 0.02^2)."""
    with torch.no_grad():
        for i, (name, param) in enumerate(model.named_parameters()):
            gen = torch.Generator(device=param.device).manual_seed(seed * 100_003 + i)
            noise = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32)
            if param.dim() >= 2:
                noise /= math.sqrt(param[0].numel())
            elif name.endswith("weight"):
                noise = 1.0 + 0.02 * noise
            else:
                noise *= 0.02
            param.copy_(noise.to(param.dtype))
    return model


def build_sd3(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    hidden = cfg["heads"] * cfg["head_dim"]
    with torch.device(device):
        model = SD3Transformer2DModel(
            sample_size=cfg["latent"], patch_size=cfg["patch"], in_channels=cfg["in_channels"],
            num_layers=cfg["layers"], attention_head_dim=cfg["head_dim"], num_attention_heads=cfg["heads"],
            joint_attention_dim=cfg["joint_dim"], caption_projection_dim=hidden,
            pooled_projection_dim=cfg["pooled_dim"], out_channels=cfg["in_channels"],
            pos_embed_max_size=cfg["pos_embed_max_size"],
        )  # fmt: skip
    model = randomize_(model.to(device), seed)
    return model.to(dtype).eval()


def sd3_inputs(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """``rascompile.bench.runner.make_inputs`` at these sizes, on ``device`` in ``dtype``."""
    from rascompile.bench.runner import BenchSettings, Inputs, make_inputs

    settings = BenchSettings(
        latent_size=cfg["latent"], latent_channels=cfg["in_channels"], text_tokens=cfg["text_tokens"],
        joint_dim=cfg["joint_dim"], pooled_dim=cfg["pooled_dim"], seed=seed,
    )  # fmt: skip
    cpu = make_inputs(settings)
    return Inputs(*(t.to(device, dtype) for t in (cpu.latents, cpu.prompt_embeds, cpu.pooled)))


def capture_graph(model: torch.nn.Module, call: dict) -> tuple[torch.fx.GraphModule, list]:
    """The Dynamo graph of one call of ``model`` and its real inputs (parameters included); the call runs eagerly."""
    from rascompile.capture import capture_graphs

    torch._dynamo.reset()
    graphs = capture_graphs(model, lambda compiled: compiled(**call), fullgraph=True, dynamic=False)
    if len(graphs) != 1:
        raise RuntimeError(f"expected one Dynamo graph of the transformer, got {len(graphs)}")
    return graphs[0]


def new_ras_graph(gm, args, config, inner_backend: str, fused: bool | None):
    """A ``RASGraph`` of the captured graph (nothing compiled yet) and the warnings rascompile gave."""
    from rascompile import RASBackend

    backend = RASBackend(config, inner_backend=inner_backend, fused_kv_projection=fused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = backend.new_graph(gm, args)
    return graph, [str(w.message) for w in caught if "rascompile" in str(w.message)]


def fuse_summary(graph) -> dict:
    from rascompile.passes.snapshot import render_record, rewrite_records

    records = rewrite_records(graph.ras_gm) if getattr(graph, "ras_gm", None) is not None else ()
    return {
        "kv_writes": len(graph.controller.layout.kv_caches) if graph.controller is not None else 0,
        "fused_kv_writes": sum(record.kind == "fused" for record in records),
        "unfused_reasons": [render_record(record) for record in records if record.kind == "unfused"][:5],
    }


class StepCaller:
    """Calls a graph like the transformer in a denoising loop: the loop's latents and timestep replace those of
    the captured inputs (moved to the captured timestep's device and dtype)."""

    def __init__(self, fn: Callable, args: list, latents_index: int, timestep_index: int):
        self.fn, self.args = fn, args
        self.latents_index, self.timestep_index = latents_index, timestep_index

    def __call__(self, *, hidden_states, timestep, **_):
        args = list(self.args)
        like = args[self.timestep_index]
        args[self.latents_index] = hidden_states
        args[self.timestep_index] = timestep.to(like.device, like.dtype)
        return self.fn(*args)


def _mib(nbytes: float) -> float:
    return nbytes / 2**20


def active_indices(batch: int, n: int, ratios, device: str, seed: int = 100) -> dict[float, torch.Tensor]:
    """Random sorted active tokens [B, k] per sample ratio (k = N - floor((1 - ratio) N), as RASConfig)."""
    from rascompile import RASConfig
    from rascompile.bench.runner import _random_active

    return {
        r: _random_active(batch, n, n - RASConfig(sample_ratio=r).static_num_dropped(n), seed + i).to(device)
        for i, r in enumerate(ratios)
    }


class StepBench:
    """Compiles (first calls) and times the step variants of one captured transformer graph within a stage:
    ``st.data["compile_s"]`` and ``st.data["per_step"]``. ``spec`` (an SD3 ``ModelSpec``) adds the FLOP ideal."""

    def __init__(self, st: Stage, device: str, inner: str, repeats: int, n: int, spec=None):
        self.st, self.device, self.inner, self.repeats, self.n, self.spec = st, device, inner, repeats, n, spec
        self.compile_s = st.data.setdefault("compile_s", {})
        self.rows = st.data.setdefault("per_step", [])
        self.outputs: dict[str, torch.Tensor] = {}

    def compile(self, label: str, fn: Callable) -> None:
        with self.st.step(f"compile {label} ({self.inner})"):
            holder = {}
            self.compile_s[label] = first_call_s(lambda: holder.setdefault("out", fn()), self.device)
            self.outputs[label] = holder["out"][0]

    def _compile_s_of(self, label: str) -> float | None:
        return self.compile_s.get(label.replace(" (capture)", ""))

    def check_equal(self, name: str, label: str, reference: str, tolerance: float) -> None:
        got, expected = self.outputs[label].float().cpu(), self.outputs[reference].float().cpu()
        err, scale = (got - expected).abs().max().item(), expected.abs().max().item()
        passed = bool(torch.isfinite(got).all()) and err <= tolerance * scale
        relative = err / max(scale, 1e-30)
        detail = f"max |diff| {err:.3g} = {relative:.2e} x max |{reference}| ({scale:.3g}); tolerance {tolerance:g}"
        self.st.check(name, passed, detail)

    def check_output(self, label: str) -> None:
        out = self.outputs[label].float()
        finite, scale = bool(torch.isfinite(out).all()), out.abs().max().item()
        self.st.check(
            f"{label} output is finite and not zero", finite and scale > 0, f"finite {finite}, max |x| {scale:.3g}"
        )

    def time_round(self, name: str, variants: dict[str, tuple]) -> None:
        """``variants``: label -> (ratio, k, fused, fn), the dense step first; speedups against its median."""
        fns = {label: v[3] for label, v in variants.items()}
        with self.st.step(f"time per step, round {name}: {', '.join(variants)}"):
            timed = time_interleaved(fns, self.repeats, self.device)
            dense_s = timed["dense"]["median_s"]
            for label, (ratio, k, fused, fn) in variants.items():
                m = timed[label]
                row = {
                    "variant": label, "round": name, "ratio": ratio, "k": k, "fused": fused,
                    "median_ms": 1e3 * m["median_s"], "times_ms": [1e3 * t for t in m["times_s"]],
                    "speedup": dense_s / m["median_s"], "compile_s": self._compile_s_of(label),
                    "memory": peak_memory(fn, self.device),
                }  # fmt: skip
                if self.spec is not None:
                    from rascompile.bench.flops import ideal_speedup, step_flops

                    row["ideal_speedup"] = ideal_speedup(self.spec, k)
                    row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
                    row["gflop"] = step_flops(self.spec, k) / 1e9
                    row["tflops"] = row["gflop"] / row["median_ms"]
                self.rows.append(row)


def stage_sd3(suite: Suite, st: Stage) -> None:
    from rascompile import RASConfig
    from rascompile.bench.flops import ModelSpec, loop_ideal_speedup
    from rascompile.bench.runner import denoise, make_scheduler
    from rascompile.runtime.schedule import build_schedule

    dry, device = suite.dry, suite.device
    cfg = SD3_TINY if dry else SD3_MEDIUM
    dtype = torch.float32 if dry else torch.bfloat16
    inner = "aot_eager" if dry else "inductor"
    repeats = 3 if dry else suite.args.repeats
    loop_repeats = 1 if dry else 2
    n = (cfg["latent"] // cfg["patch"]) ** 2
    hidden = cfg["heads"] * cfg["head_dim"]
    spec = ModelSpec(
        hidden=hidden, layers=cfg["layers"], num_tokens=n, text_tokens=cfg["text_tokens"], batch=2,
        patch=cfg["patch"], in_channels=cfg["in_channels"], out_channels=cfg["in_channels"],
        joint_dim=cfg["joint_dim"], pooled_dim=cfg["pooled_dim"],
    )  # fmt: skip
    config = RASConfig.reference_defaults(**SD3_LOOP)  # the paper's setting: k = N - D, as the per-step ratios
    schedule = build_schedule(config, config.num_inference_steps, n)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    st.data.update(
        {
            "model": "SD3Transformer2DModel (SD3-medium architecture)" if not dry else "SD3Transformer2DModel (tiny)",
            "config": cfg, "hidden": hidden, "num_tokens": n, "batch": 2, "dtype": str(dtype).removeprefix("torch."),
            "inner_backend": inner, "device": device, "repeats": repeats, "loop_repeats": loop_repeats,
            "tolerance": tolerance,
        }
    )  # fmt: skip
    if dry:
        st.skip_part("bf16 inductor on CUDA, peak memory", "dry run, no CUDA: tiny fp32 model with aot_eager on CPU")

    with st.step("build model (random weights) and inputs"):
        model = build_sd3(cfg, device, dtype)
        inputs = sd3_inputs(cfg, device, dtype)
        st.data["parameters"] = sum(p.numel() for p in model.parameters())
        st.data["parameter_mib"] = _mib(sum(p.numel() * p.element_size() for p in model.parameters()))
    scheduler = make_scheduler()
    scheduler.set_timesteps(config.num_inference_steps)
    call = dict(
        hidden_states=torch.cat([inputs.latents, inputs.latents]),
        timestep=scheduler.timesteps[0].expand(2).to(device),
        encoder_hidden_states=inputs.prompt_embeds,
        pooled_projections=inputs.pooled,
        return_dict=False,
    )
    with st.step("trace with Dynamo (one eager call)"):
        gm, args = capture_graph(model, call)
    with st.step("RAS rewrite, fused K/V projection on"):
        g, caught = new_ras_graph(gm, args, config, inner, fused=True)
        if g.controller is None:
            st.check("the RAS rewrite applies", False, f"runs dense: {g.fallback_reason}")
            return
        st.data["fused_on"] = fuse_summary(g) | {"warnings": caught}
    batch = g.layout.batch_size
    all_idx = torch.arange(n, device=device).expand(batch, n).contiguous()
    idx = active_indices(batch, n, SD3_RATIOS, device)
    planned_k = sorted({p.num_active for p in schedule if not p.dense})
    bench = StepBench(st, device, inner, repeats, n, spec)
    run = lambda graph, i: lambda: graph.run_active(i, *args)  # noqa: E731

    k = {r: int(t.shape[1]) for r, t in idx.items()}
    # Order: the headline numbers first (dense vs RAS 0.25 per step, then the loop), so that a stage cut short
    # by its budget has measured the most important things.
    bench.compile("dense", lambda: g.run_dense(*args))
    bench.check_output("dense")
    bench.compile("RAS ratio 0.25, fused", run(g, idx[0.25]))
    bench.time_round(
        "A",
        {
            "dense": (None, n, None, lambda: g.run_dense(*args)),
            "RAS ratio 0.25, fused": (0.25, k[0.25], "fused", run(g, idx[0.25])),
        },
    )
    bench.compile("RAS k=N, fused", run(g, all_idx))
    bench.check_equal("RAS step at k=N equals dense (fused)", "RAS k=N, fused", "dense", tolerance)
    for planned in planned_k:  # the loop's RAS steps: compiled before the loop, whatever k its schedule plans
        if planned not in k.values():
            extra = active_indices(batch, n, [planned / n], device, seed=7)[planned / n]
            bench.compile(f"RAS k={planned}, fused", run(g, extra))

    with st.step(f"28-step loops: RAS vs dense ({loop_repeats} each, interleaved, after a warm-up generation)"):
        ras_caller = StepCaller(g, args, g.latents_index, g.timestep_index)
        dense_caller = StepCaller(g.run_dense, args, g.latents_index, g.timestep_index)
        g.controller.reset()
        steps = config.num_inference_steps

        def loop(fn) -> torch.Tensor:
            out = denoise(fn, make_scheduler(), inputs, steps, 7.0)
            _sync(device)
            return out

        memory = {}
        for name, fn in (("RAS", ras_caller), ("dense", dense_caller)):  # warm-up: a whole generation each
            if device == "cuda":
                memory[name] = peak_memory(lambda fn=fn: loop(fn), device)
            elif name == "RAS":
                loop(fn)
            else:  # the dry run: one dense step warms it up
                denoise(fn, make_scheduler(), inputs, 1, 7.0)
        times = {"RAS": [], "dense": []}
        for _ in range(loop_repeats):
            for name, fn in (("RAS", ras_caller), ("dense", dense_caller)):
                times[name].append(first_call_s(lambda fn=fn: loop(fn), device))
        kinds = [d.kind for d in g.controller.history]
        ras_s, dense_s = statistics.median(times["RAS"]), statistics.median(times["dense"])
        ideal = loop_ideal_speedup(spec, [p.num_active for p in schedule])
        st.data["loop"] = {
            "steps": steps, "ratio": config.sample_ratio, "start_step": config.scheduler_start_step,
            "reset_steps": list(config.error_reset_steps), "planned_ras_steps": sum(not p.dense for p in schedule),
            "run_ras_steps": kinds.count("ras"), "run_capture_steps": kinds.count("capture"),
            "run_dense_steps": kinds.count("dense"), "times_s": times, "ras_s": ras_s, "dense_s": dense_s,
            "speedup": dense_s / ras_s, "ideal_speedup": ideal, "fraction_of_ideal": dense_s / ras_s / ideal,
            "memory": memory or None,
        }  # fmt: skip
        st.check(
            "the loop ran the planned RAS steps",
            kinds.count("ras") == st.data["loop"]["planned_ras_steps"],
            f"{kinds.count('ras')} RAS, {kinds.count('capture')} capture, {kinds.count('dense')} dense steps run",
        )
    suite.log(st.name, f"  loop: RAS {ras_s:.3f} s, dense {dense_s:.3f} s, {dense_s / ras_s:.2f}x (ideal {ideal:.2f}x)")

    bench.compile("RAS ratio 0.5, fused", run(g, idx[0.5]))
    with st.step("RAS rewrite, fused K/V projection off"):
        u, caught = new_ras_graph(gm, args, config, inner, fused=False)
        st.data["fused_off"] = fuse_summary(u) | {"warnings": caught}
    bench.compile("RAS ratio 0.25, unfused", run(u, idx[0.25]))
    with st.step("check: fused and unfused RAS steps agree (same caches, same tokens)"):
        g.run_active(all_idx, *args)  # fills the fused graph's caches; the unfused graph gets copies
        fused_caches, unfused_caches = g.controller.caches(), u.controller.caches()
        source = [fused_caches[0], *fused_caches[1]]
        target = [unfused_caches[0], *unfused_caches[1]]
        if [t.shape for t in source] != [t.shape for t in target]:
            raise RuntimeError("the fused and unfused RAS graphs have caches of different shapes")
        for a, b in zip(source, target):
            b.copy_(a)
        bench.outputs["fused, ratio 0.25"] = g.run_active(idx[0.25], *args)[0]
        bench.outputs["unfused"] = u.run_active(idx[0.25], *args)[0]
        bench.check_equal("fused RAS step equals unfused (ratio 0.25)", "fused, ratio 0.25", "unfused", tolerance)
    bench.compile("RAS ratio 0.5, unfused", run(u, idx[0.5]))
    bench.time_round(
        "B",
        {
            "dense": (None, n, None, lambda: g.run_dense(*args)),
            "RAS k=N (capture), fused": (None, n, "fused", run(g, all_idx)),
            "RAS ratio 0.5, fused": (0.5, k[0.5], "fused", run(g, idx[0.5])),
            "RAS ratio 0.5, unfused": (0.5, k[0.5], "unfused", run(u, idx[0.5])),
            "RAS ratio 0.25, unfused": (0.25, k[0.25], "unfused", run(u, idx[0.25])),
        },
    )


def build_flux(cfg: dict, double: int, single: int, device: str, dtype: torch.dtype, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=cfg["in_channels"], num_layers=double, num_single_layers=single,
            attention_head_dim=cfg["head_dim"], num_attention_heads=cfg["heads"], joint_attention_dim=cfg["joint_dim"],
            pooled_projection_dim=cfg["pooled_dim"], guidance_embeds=True, axes_dims_rope=cfg["axes"],
        )  # fmt: skip
    return randomize_(model.to(device), seed).to(dtype).eval()


def flux_call(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed + 1)
    side, length = cfg["side"], cfg["text_tokens"]
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(
        hidden_states=torch.randn(1, side * side, cfg["in_channels"], generator=gen).to(device, dtype),
        encoder_hidden_states=torch.randn(1, length, cfg["joint_dim"], generator=gen).to(device, dtype),
        pooled_projections=torch.randn(1, cfg["pooled_dim"], generator=gen).to(device, dtype),
        timestep=torch.tensor([1.0], device=device, dtype=dtype),
        img_ids=img_ids.reshape(-1, 3).to(device, dtype),
        txt_ids=torch.zeros(length, 3, device=device, dtype=dtype),
        guidance=torch.tensor([3.5], device=device, dtype=dtype),
        return_dict=False,
    )


def stage_flux(suite: Suite, st: Stage) -> None:
    """What rascompile does with a Flux-dev-shaped transformer, and its step times: dense always; RAS at
    ratios 0.5 and 0.25 too where rascompile rewrites the graph (packed latents: not in the release this suite
    was written against, which runs Flux dense)."""
    from rascompile import RASConfig

    dry, device = suite.dry, suite.device
    cfg = FLUX_TINY if dry else FLUX_DEV
    double, single = (cfg["num_layers"], cfg["num_single_layers"]) if dry else tuple(suite.args.flux_layers)
    dtype = torch.float32 if dry else torch.bfloat16
    inner = "aot_eager" if dry else "inductor"
    repeats = 3 if dry else suite.args.repeats
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    st.data.update(
        {
            "model": "FluxTransformer2DModel (Flux-dev shapes)" if not dry else "FluxTransformer2DModel (tiny)",
            "config": cfg, "double_blocks": double, "single_blocks": single,
            "full_depth": [cfg["num_layers"], cfg["num_single_layers"]],
            "tokens": cfg["side"] ** 2, "text_tokens": cfg["text_tokens"], "batch": 1,
            "dtype": str(dtype).removeprefix("torch."), "inner_backend": inner, "repeats": repeats,
        }
    )  # fmt: skip
    if (double, single) != (cfg["num_layers"], cfg["num_single_layers"]):
        st.data["depth_note"] = (
            f"{double} double-stream + {single} single-stream blocks of Flux-dev's {cfg['num_layers']} + "
            f"{cfg['num_single_layers']}, so that the compiles fit the stage's budget (--flux-layers); every other "
            "size is Flux-dev's"
        )
    with st.step(f"build model ({double} + {single} blocks, random weights)"):
        model = build_flux(cfg, double, single, device, dtype)
        call = flux_call(cfg, device, dtype)
        st.data["parameters"] = sum(p.numel() for p in model.parameters())
    with st.step("trace with Dynamo (one eager call)"):
        gm, args = capture_graph(model, call)
    with st.step("what rascompile does with it (RASBackend)"):
        graph, caught = new_ras_graph(gm, args, RASConfig.reference_defaults(**SD3_LOOP), inner, fused=None)
        st.data["ras_applies"] = graph.controller is not None
        st.data["fallback_reason"] = graph.fallback_reason
        st.data["warnings"] = caught
        if graph.controller is not None:
            st.data["fused"] = fuse_summary(graph)
    verdict = "RAS applies" if graph.controller is not None else f"runs dense: {graph.fallback_reason}"
    suite.log(st.name, f"  rascompile: {verdict}")
    n = st.data["tokens"]
    bench = StepBench(st, device, inner, repeats, n)
    dense = {"dense": (None, n, None, lambda: graph.run_dense(*args))}
    bench.compile("dense", lambda: graph.run_dense(*args))
    bench.check_output("dense")
    bench.time_round("A", dense)
    if graph.controller is None:
        return
    batch, n = graph.layout.batch_size, graph.layout.num_tokens
    idx = active_indices(batch, n, SD3_RATIOS, device)
    variants = dict(dense)
    for r in (0.25, 0.5):
        i = idx[r]
        bench.compile(f"RAS ratio {r:g}", lambda i=i: graph.run_active(i, *args))
        variants[f"RAS ratio {r:g}"] = (r, int(i.shape[1]), None, lambda i=i: graph.run_active(i, *args))
    bench.time_round("B", variants)
    all_idx = torch.arange(n, device=device).expand(batch, n).contiguous()
    bench.compile("RAS k=N", lambda: graph.run_active(all_idx, *args))
    bench.check_equal("Flux: RAS step at k=N equals dense", "RAS k=N", "dense", tolerance)


# ---------------------------------------------------------------------------------------------- stage: tensorrt


def compare_generations(got, history, expected, expected_history, tol: float) -> dict:
    kinds = [d.kind for d in history]
    expected_kinds = [d.kind for d in expected_history]
    pairs = [(a, b) for a, b in zip(history, expected_history) if a.kind == b.kind == "ras"]
    same = sum(torch.equal(a.active_idx.cpu(), b.active_idx.cpu()) for a, b in pairs)
    got_f, exp_f = got.detach().float().cpu(), expected.detach().float().cpu()
    return {
        "kinds": kinds,
        "kinds_equal": kinds == expected_kinds,
        "ras_steps": kinds.count("ras"),
        "ras_steps_same_tokens": int(same),
        "max_abs_diff": (got_f - exp_f).abs().max().item(),
        "relative_error": relative_error(got_f, exp_f),
        "tolerance": tol,
        "within_tolerance": bool(torch.allclose(got_f, exp_f, rtol=tol, atol=tol)),
    }


def runner_feeds(runner, inputs: dict, active_idx: torch.Tensor | None) -> dict:
    """The feeds ``StepRunner.run_dense`` / ``run_active`` hand ``execute`` (caches: the runner's own)."""
    if active_idx is None:
        return runner.signature.feeds(inputs)
    output_cache, kv_caches = runner.controller.caches()
    return runner.signature.feeds(inputs, active_idx.to(torch.int64), output_cache, kv_caches)


def tensorrt_engine_call(runner, graph: str, feeds: dict) -> Callable:
    """One engine execution on device-resident inputs and outputs (no host copies, unlike ``execute``)."""
    from rascompile.deploy.tensorrt import _torch_dtype

    engine, context = runner.engines[graph]
    keep = []
    for name, tensor in feeds.items():
        tensor = tensor.cuda().contiguous()
        keep.append(tensor)
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    for name in runner.output_names(graph):
        out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=_torch_dtype(engine.get_tensor_dtype(name)),
                          device="cuda")  # fmt: skip
        keep.append(out)
        context.set_tensor_address(name, out.data_ptr())
    stream = torch.cuda.current_stream()

    def run():
        keep  # noqa: B018 - the buffers live as long as the closure
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {graph}.engine")

    return run


def stage_tensorrt(suite: Suite, st: Stage) -> None:
    from rascompile import RASConfig
    from rascompile.bench.runner import SMOKE, BenchSettings

    settings = BenchSettings(**SMOKE) if suite.dry else BenchSettings()
    config = RASConfig(**TRT_CONFIG)
    have = {m: importlib.util.find_spec(m) is not None for m in ("tensorrt", "torch_tensorrt")}
    st.data.update(
        {
            "model": f"SD3Transformer2DModel, {settings.layers} layers, hidden {settings.hidden} "
            f"({settings.heads} heads x {settings.head_dim}), {settings.latent_size}x{settings.latent_size} latents "
            f"= {settings.num_tokens} image tokens, {settings.text_tokens} text tokens, CFG batch 2",
            "config": dict(TRT_CONFIG), "installed": have, "generations": {}, "per_step": [],
        }
    )  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="gpu_suite_trt_"))
    try:
        _tensorrt_body(suite, st, settings, config, have, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _tensorrt_body(suite: Suite, st: Stage, settings, config, have: dict, workdir: Path) -> None:
    import rascompile
    from rascompile import OnnxRunner, RASBackend
    from rascompile.bench.runner import _random_active, build_model, denoise, make_inputs, make_scheduler

    steps = config.num_inference_steps
    repeats = 3 if suite.dry else suite.args.repeats
    gens = st.data["generations"]

    with st.step("build the mid-size model (fp32, CPU) and trace it"):
        model = build_model(settings)
        inputs = make_inputs(settings)
        backend = RASBackend(config, inner_backend="eager")
        compiled = torch.compile(model, backend=backend, dynamic=False)
        scheduler = make_scheduler()
        scheduler.set_timesteps(steps)
        compiled(
            hidden_states=torch.cat([inputs.latents, inputs.latents]), timestep=scheduler.timesteps[0].expand(2),
            encoder_hidden_states=inputs.prompt_embeds, pooled_projections=inputs.pooled, return_dict=False,
        )  # fmt: skip
        graph = backend.graphs[0]
        if graph.controller is None:
            raise RuntimeError(f"the RAS rewrite did not apply: {graph.fallback_reason}")
    with st.step("export to ONNX (rascompile.export, onnxruntime check)"):
        start = time.perf_counter()
        exported = rascompile.export(backend, workdir / "onnx")
        st.data["export_s"] = time.perf_counter() - start
        manifest = exported.manifest
        st.data["opset"] = manifest.get("opset")
    with st.step(f"PyTorch RAS generation, {steps} steps (fp32 CPU reference)"):
        graph.controller.reset()
        expected = denoise(compiled, make_scheduler(), inputs, steps, settings.guidance_scale)
        expected_history = list(graph.controller.history)
        kinds = [d.kind for d in expected_history]
        gens["pytorch (reference)"] = {"kinds": kinds, "device": "cpu", "precision": "fp32"}

    def generation(label: str, runner, tol: float, precision: str) -> None:
        got = denoise(runner, make_scheduler(), inputs, steps, settings.guidance_scale)
        result = compare_generations(got, runner.controller.history, expected, expected_history, tol)
        gens[label] = result | {"precision": precision}
        st.check(
            f"{label}: decisions identical to PyTorch",
            result["kinds_equal"] and result["ras_steps_same_tokens"] == result["ras_steps"],
            f"step kinds {'equal' if result['kinds_equal'] else 'differ'}, {result['ras_steps_same_tokens']} of "
            f"{result['ras_steps']} RAS steps select the same tokens",
        )
        st.check(
            f"{label}: image within tolerance of PyTorch",
            result["within_tolerance"],
            f"max |diff| {result['max_abs_diff']:.2e} (relative {result['relative_error']:.2e}), rtol = atol = {tol:g}",
        )

    with st.step(f"OnnxRunner generation, {steps} steps (onnxruntime CPU)"):
        generation("onnxruntime", OnnxRunner(exported.directory, config), TRT_TOLERANCE["onnxruntime"], "fp32")

    reasons = [] if suite.cuda else ["no CUDA device"]
    trt_reason = "; ".join(reasons + ([] if have["tensorrt"] else ["tensorrt is not installed"]))
    ttrt_reason = "; ".join(reasons + ([] if have["torch_tensorrt"] else ["torch_tensorrt is not installed"]))
    if not suite.cuda:
        st.skip_part(TRT_PART, trt_reason)
        st.skip_part(TTRT_PART, ttrt_reason)
        st.skip_part("PyTorch inductor step times on CUDA (the TensorRT baseline)", "no CUDA device")
        return

    from rascompile.deploy.tensorrt import k_profile

    n, batch = manifest["num_tokens"], manifest["batch_size"]
    k_opt = k_profile(manifest, config.sample_ratio)[1]
    idx = _random_active(batch, n, k_opt, 11)
    step_inputs = exported.signature.placeholder_values(graph.signature.input_names, graph.example_inputs)
    rows = st.data["per_step"]

    def add_rows(runtime: str, precision: str, timed: dict, note: str) -> None:
        for name, m in timed.items():
            k = n if name == "dense" else k_opt
            row = {"runtime": runtime, "precision": precision, "graph": name, "k": k, "note": note}
            rows.append(row | {"median_ms": 1e3 * m["median_s"]})

    if have["tensorrt"]:
        from rascompile.deploy.tensorrt import TensorRTRunner, build_engines

        with st.step("build TensorRT engines (fp16, opt k = 0.5 N)"):
            start = time.perf_counter()
            build_engines(exported.directory, opt_ratio=config.sample_ratio, fp16=True)
            st.data["engine_build_s"] = time.perf_counter() - start
        with st.step(f"TensorRTRunner generation, {steps} steps"):
            trt = TensorRTRunner(exported.directory, config)
            generation("tensorrt", trt, TRT_TOLERANCE["tensorrt"], "fp16 engines, fp32 inputs")
        with st.step("time TensorRT steps (engine only, and the runner's execute with host copies)"):
            dense_feeds, ras_feeds = runner_feeds(trt, step_inputs, None), runner_feeds(trt, step_inputs, idx)
            timed = time_interleaved(
                {"dense": tensorrt_engine_call(trt, "dense", dense_feeds),
                 f"ras k={k_opt}": tensorrt_engine_call(trt, "ras", ras_feeds)}, repeats, "cuda",
            )  # fmt: skip
            add_rows("TensorRT engine", "fp16", timed, "inputs and outputs on the GPU")
            timed = time_interleaved(
                {"dense": lambda: trt.execute("dense", dense_feeds),
                 f"ras k={k_opt}": lambda: trt.execute("ras", ras_feeds)}, repeats, "cuda",
            )  # fmt: skip
            add_rows("TensorRTRunner.execute", "fp16", timed, "host -> device -> host every step, caches included")
            del trt
    else:
        st.skip_part(TRT_PART, trt_reason)

    def inductor_rows(precision: str, dtype: torch.dtype) -> None:
        dev = suite.device
        with st.step(f"PyTorch inductor step times ({precision}, CUDA; the first calls compile)"):
            model_gpu = copy.deepcopy(model).to(dev, dtype)
            call = dict(
                hidden_states=torch.cat([inputs.latents, inputs.latents]).to(dev, dtype),
                timestep=scheduler.timesteps[0].expand(2).to(dev),
                encoder_hidden_states=inputs.prompt_embeds.to(dev, dtype),
                pooled_projections=inputs.pooled.to(dev, dtype), return_dict=False,
            )  # fmt: skip
            gm, args = capture_graph(model_gpu, call)
            g, _ = new_ras_graph(gm, args, config, "inductor", fused=None)
            output_cache, kv_caches = g.controller.caches()
            for cache in [output_cache, *kv_caches]:
                cache.zero_()
            idx_gpu = idx.to(dev)
            timed = time_interleaved(
                {"dense": lambda: g.run_dense(*args), f"ras k={k_opt}": lambda: g.run_active(idx_gpu, *args)},
                repeats, dev,
            )  # fmt: skip
            add_rows("PyTorch inductor", precision, timed, "fused K/V projection (default on CUDA)")
        torch._dynamo.reset()
        if dev == "cuda":
            torch.cuda.empty_cache()

    inductor_rows("fp16", torch.float16)  # the baseline of the fp16 TensorRT engines

    if have["torch_tensorrt"]:
        from rascompile.deploy.tensorrt import TorchTensorRTRunner, compile_torch_tensorrt

        with st.step("torch-tensorrt: compile the dense and RAS step modules"):
            start = time.perf_counter()
            compile_torch_tensorrt(backend, workdir / "torch_trt", opt_ratio=config.sample_ratio)
            st.data["torch_tensorrt_compile_s"] = time.perf_counter() - start
        with st.step(f"TorchTensorRTRunner generation, {steps} steps"):
            ttrt = TorchTensorRTRunner(workdir / "torch_trt", config, trust=True)  # written just now, by this run
            generation("torch-tensorrt", ttrt, TRT_TOLERANCE["torch-tensorrt"], "fp32 (torch-tensorrt's default)")
        with st.step("time torch-tensorrt steps (device-resident inputs)"):
            dense_feeds = [t.cuda() for t in runner_feeds(ttrt, step_inputs, None).values()]
            ras_feeds = [t.cuda() for t in runner_feeds(ttrt, step_inputs, idx).values()]
            timed = time_interleaved(
                {"dense": lambda: ttrt.modules["dense"](*dense_feeds),
                 f"ras k={k_opt}": lambda: ttrt.modules["ras"](*ras_feeds)}, repeats, "cuda",
            )  # fmt: skip
            add_rows("torch-tensorrt", "fp32", timed, "inputs and outputs on the GPU")
        inductor_rows("fp32", torch.float32)  # the baseline of torch-tensorrt's fp32 modules
    else:
        st.skip_part(TTRT_PART, ttrt_reason)


# ---------------------------------------------------------------------------------------------- stage: stacks


def stage_stacks(suite: Suite, st: Stage) -> None:
    """Offloading (model, sequential, group) and a LoRA weight change with RAS on the device, where the hooks move
    weights between the CPU and the GPU (``tests/support/stacks_on_device.py``; the CPU tests cover the same stacks
    CPU to CPU)."""
    sys.path.insert(0, str(ROOT))  # the tests package
    from tests.support.stacks_on_device import check_stacks_on

    st.data.update(
        {"model": "FluxPipeline, tiny transformer (tests/support/models.py), fp32", "inner_backend": "aot_eager"}
    )
    with st.step("offloading and LoRA stacks through rascompile.apply"):
        check_stacks_on(suite.device, "aot_eager", st.check, tolerance=1e-4)


# ---------------------------------------------------------------------------------------------- stage: memory


def stage_memory(suite: Suite, st: Stage) -> None:
    """The caches against the allocator (``torch.cuda.memory_allocated``): kept caches equal ``rascompile.plan``,
    ``rascompile.release`` and the end of a generation give the memory back, in the model dtype and float8, and
    the free-memory check reads the device (``tests/support/memory_on_device.py``)."""
    sys.path.insert(0, str(ROOT))  # the tests package
    from tests.support.memory_on_device import check_cache_memory_on

    st.data.update(
        {"model": "FluxPipeline, tiny transformer, true CFG (2 branches), fp32", "inner_backend": "aot_eager"}
    )
    with st.step("cache memory: plan, release, float8, free-memory check"):
        check_cache_memory_on(suite.device, st.check)


# ---------------------------------------------------------------------------------------------- stage: context_parallel


def stage_context_parallel(suite: Suite, st: Stage) -> None:
    """RAS under diffusers' Ulysses context parallelism on two GPUs (NCCL) against one GPU: the same latents, the
    same decisions, each rank's caches its heads (``tests/support/context_parallel_on_device.py``). The dry run runs
    it on two CPU processes (gloo)."""
    if suite.cuda and torch.cuda.device_count() < 2:
        raise SkipStage(f"needs 2 GPUs, the machine has {torch.cuda.device_count()} (the CPU suite runs it on gloo)")
    sys.path.insert(0, str(ROOT))  # the tests package
    from tests.support.context_parallel_on_device import check_context_parallel_on

    backend = "nccl" if suite.cuda else "gloo"
    st.data.update({"model": "FluxPipeline, tiny transformer, fp32", "ranks": 2, "process_group": backend})
    with st.step(f"Flux: 2 ranks ({backend}) against one process"):
        st.data["families"] = check_context_parallel_on(suite.device, st.check, timeout=max(20.0, st.left()))


# ---------------------------------------------------------------------------------------------- stage: report


def stage_report(suite: Suite, st: Stage) -> None:
    with st.step("write results.json and README.md"):
        st.data["files"] = ["results.json", "README.md"]
        suite.save()
        suite.save_readme()


# ---------------------------------------------------------------------------------------------- README


def _table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:{spec}}{suffix}"


def _stub() -> str:
    return f"""# GPU results

**No run has happened yet.** The GPU paths of rascompile (the Triton kernel, inductor on CUDA, TensorRT)
have not been measured: no CUDA device was available where they were written. This directory is written
by `benchmarks/gpu_suite.py` from its `results.json`; nothing here is typed in by hand.

On a CUDA machine (about 8 minutes):

```bash
{INSTALL}
{COMMAND}
```

Without a GPU, `python benchmarks/gpu_suite.py --dry-run` runs the same code paths at tiny sizes on the
CPU into a temporary directory (CI: `tests/kernels/test_gpu_suite.py`). `python benchmarks/gpu_suite.py --render
docs/gpu` re-renders this file from `docs/gpu/results.json`.
"""


def render_readme(results: dict | None) -> str:
    """The README of a results directory, from its ``results.json`` alone (so the docs cannot drift from
    the data). ``None``: the stub of a directory no run has written yet."""
    if not results:
        return _stub()
    stages = results.get("stages", {})
    env = stages.get("env", {}).get("data", {})
    runs = results.get("runs", [])
    dry = results.get("dry_run")
    out = ["# GPU results", ""]
    out.append(
        "<!-- Written by benchmarks/gpu_suite.py from results.json; do not edit: "
        "`python benchmarks/gpu_suite.py --render <dir>` re-renders it. -->"
    )
    out.append("")
    if dry:
        out += [
            "**DRY RUN on the CPU: tiny sizes, no CUDA. These numbers check the code paths; they are not GPU "
            "measurements.**",
            "",
        ]
    gpu = env.get("gpu", {})
    smi = env.get("nvidia_smi") or {}
    driver = (smi.get("gpus") or [{}])[0].get("driver_version") if isinstance(smi, dict) else None
    versions = env.get("versions", {})
    out += [
        f"- Device: {gpu.get('name', 'no CUDA device')}"
        + (f" (compute capability {gpu['capability']}, {gpu['memory_gib']} GiB)" if gpu else "")
        + f"; driver {driver or 'n/a'}; CUDA (torch) {env.get('torch_cuda') or 'n/a'}",
        f"- Host: {env.get('cpu', '?')}, {env.get('cores', '?')} cores; python {env.get('python', '?')}",
        "- Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None and k != "pytest")
        + "; not installed: "
        + (", ".join(k for k, v in versions.items() if v is None) or "none"),
        f"- Source: git {env.get('git_commit') or 'n/a'}",
        f"- Inductor cache warm at start: {env.get('inductor_cache_existed')}",
    ]
    for i, run in enumerate(runs):
        out.append(
            f"- Run {i}: {run.get('started')}, `python benchmarks/gpu_suite.py {' '.join(run.get('argv', []))}`, "
            f"{_f(run.get('elapsed_s'), '.0f')} s of a {_f(run.get('budget_s'), '.0f')} s budget; stages "
            + ", ".join(run.get("stages", []))
        )
    out += ["", f"Command: `{COMMAND}` (install: `{INSTALL}`).", "", "## Stages", ""]
    rows = []
    for name in STAGES:
        s = stages.get(name)
        if s is None:
            rows.append([name, "not run", "", "", ""])
            continue
        rows.append(
            [name, s["status"], s.get("run", ""), f"{_f(s.get('elapsed_s'), '.1f')} / {_f(s.get('budget_s'), '.0f')}",
             s.get("reason") or ""]
        )  # fmt: skip
    out.append(_table(["stage", "status", "run", "seconds / budget", "reason"], rows))
    checks = [(n, c) for n in STAGES for c in stages.get(n, {}).get("checks", [])]
    if checks:
        out += ["", "## Checks", ""]
        rows = [[n, c["name"], "passed" if c["passed"] else "**FAILED**", c["detail"]] for n, c in checks]
        out.append(_table(["stage", "check", "result", "detail"], rows))
    out += _render_kernel_tests(stages.get("kernel_tests"))
    out += _render_kernel_speed(stages.get("kernel_speed"))
    out += _render_sd3(stages.get("sd3"))
    out += _render_flux(stages.get("flux"))
    out += _render_tensorrt(stages.get("tensorrt"))
    skipped = [(n, s) for n in STAGES for s in stages.get(n, {}).get("skipped", [])]
    if skipped:
        out += ["", "## Skipped parts", ""]
        out.append(_table(["stage", "what", "why"], [[n, s["what"], s["reason"]] for n, s in skipped]))
    return "\n".join(out) + "\n"


def _render_kernel_tests(s: dict | None) -> list[str]:
    if not s or not s.get("data"):
        return []
    d = s["data"]
    out = ["", "## 1. Kernel correctness: " + ", ".join(f"tests/kernels/{n}" for n in KERNEL_TEST_FILES), ""]
    out.append(
        f"Mode: {d.get('mode')}; {d.get('kernel_calls_on_device', 0)} kernel calls on {d.get('device')} "
        f"(kernel object {d.get('kernel_object')}); references: the file's CPU torch computations."
    )
    out.append("")
    out.append(_table(["collected", "passed", "failed", "errors", "skipped", "exit status"],
                      [[d.get("collected"), d.get("passed"), d.get("failed"), d.get("errors"), d.get("skipped"),
                        d.get("returncode")]]))  # fmt: skip
    for f in d.get("failures", [])[:10]:
        out.append(f"- FAILED `{f['test']}` ({f['when']}): {f['message'].splitlines()[-1][:200]}")
    return out


def _render_kernel_speed(s: dict | None) -> list[str]:
    if not s or not s.get("data", {}).get("rows"):
        return []
    d = s["data"]
    peaks = d.get("peaks", {})
    out = ["", "## 2. Kernel speed: linear_scatter_ (fused K/V projection)", ""]
    out.append(
        f"B = {d.get('batch')}, N = {d.get('image_tokens')} image tokens; ms are medians "
        f"(CUDA: triton.testing.do_bench). Peaks ({peaks.get('source')}): {peaks.get('device')}, "
        f"{_f(peaks.get('tflops_bf16_fp16'), '.0f')} TFLOP/s bf16/fp16, {_f(peaks.get('gbps'), '.0f')} GB/s. "
        "fused = one linear_scatter_; unfused = F.linear, the model's norm and RoPE, index_put_; "
        "mm+copy = F.linear + index_put_. GB/s counts each variant's lower-bound bytes."
    )
    out.append("")
    rows = [
        [r["model"], _f(r["ratio"], "g"), r["dtype"], r["k"], _f(r["fused_ms"], ".4f"), _f(r["unfused_ms"], ".4f"),
         _f(r["matmul_copy_ms"], ".4f"), _f(r["speedup_vs_unfused"], ".2f", "x"),
         _f(r["speedup_vs_matmul_copy"], ".2f", "x"), _f(r["fused_tflops"], ".1f"),
         _f(r.get("fused_pct_peak_tflops"), ".0f", " %"), _f(r["fused_gbps"], ".0f"),
         _f(r.get("fused_pct_peak_gbps"), ".0f", " %"), "yes" if r["matches_unfused"] else "**NO**"]
        for r in d["rows"]
    ]  # fmt: skip
    out.append(_table(["model", "ratio", "dtype", "k", "fused ms", "unfused ms", "mm+copy ms", "vs unfused",
                       "vs mm+copy", "TFLOP/s", "% peak", "GB/s", "% peak BW", "matches"], rows))  # fmt: skip
    fp8 = [
        [r["model"], _f(r["ratio"], "g"), r["dtype"], r["k"], _f(r.get("fused_fp8_ms"), ".4f"),
         _f(r.get("unfused_fp8_ms"), ".4f"), _f(r.get("speedup_fp8_vs_unfused"), ".2f", "x")]
        for r in d["rows"]
    ]  # fmt: skip
    out += ["", "Into a float8 cache with per-row scales (`kv_cache_dtype=\"fp8_e4m3\"`): one "
            "linear_scatter_quantized_ (quantization in the epilogue) against the unfused ops, the quantization "
            "and two index_put_.", ""]  # fmt: skip
    out.append(_table(["model", "ratio", "dtype", "k", "fused fp8 ms", "unfused fp8 ms", "vs unfused"], fp8))
    return out


def _memory_cell(m: dict | None) -> str:
    return "n/a" if not m else f"{m['peak_mib']:.0f} ({m['above_live_mib']:+.0f})"


def _per_step_table(rows: list[dict] | None) -> list[str]:
    if not rows:
        return []
    ideal = any("ideal_speedup" in r for r in rows)
    headers = ["variant", "round", "k", "ms", "speedup"]
    headers += ["ideal", "meas/ideal", "TFLOP/s"] if ideal else []
    headers += ["compile s", "peak MiB"]
    cells = []
    for r in rows:
        row = [r["variant"], r["round"], r["k"], _f(r["median_ms"], ".2f"), _f(r["speedup"], ".2f", "x")]
        if ideal:
            row += [_f(r.get("ideal_speedup"), ".2f", "x"), _f(r.get("fraction_of_ideal"), ".2f"),
                    _f(r.get("tflops"), ".1f")]  # fmt: skip
        row += [_f(r.get("compile_s"), ".1f"), _memory_cell(r.get("memory"))]
        cells.append(row)
    return ["", _table(headers, cells)]


def _render_sd3(s: dict | None) -> list[str]:
    if not s or not s.get("data", {}).get("config"):
        return []
    d = s["data"]
    c = d["config"]
    out = ["", "## 3. Full-size transformer: SD3", ""]
    out.append(
        f"{d['model']}: {c['layers']} layers, {c['heads']} heads x {c['head_dim']}, patch {c['patch']}, "
        f"{c['in_channels']} latent channels, joint_attention_dim {c['joint_dim']}, pooled {c['pooled_dim']}, "
        f"{c['latent']}x{c['latent']} latents = {d['num_tokens']} image tokens, {c['text_tokens']} text tokens, "
        f"CFG batch {d['batch']}, random weights, {d['dtype']}, {d['inner_backend']} on {d['device']}; "
        f"medians of {d['repeats']}. Speedups are against the dense step of the same timing round; ideal = "
        "FLOPs(dense) / FLOPs(k) (rascompile.bench.flops). Memory: peak MiB of the CUDA allocator during one call "
        "(in brackets: above what was allocated before it)."
    )
    for key, label in (("fused_on", "fused on"), ("fused_off", "fused off")):
        f = d.get(key)
        if f:
            out.append(f"- {label}: {f['fused_kv_writes']} of {f['kv_writes']} K/V cache writes fused"
                       + (f"; unfused: {'; '.join(f['unfused_reasons'])}" if f["unfused_reasons"] else ""))  # fmt: skip
    out += _per_step_table(d.get("per_step"))
    if d.get("compile_s"):
        out += ["", "Compile (first call) seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in d["compile_s"].items())]
    loop = d.get("loop")
    if loop:
        out += ["", f"### {loop['steps']}-step loop", ""]
        out.append(
            f"Ratio {loop['ratio']:g}, scheduler_start_step {loop['start_step']}, error_reset_steps "
            f"{tuple(loop['reset_steps'])}: {loop['planned_ras_steps']} RAS steps planned; run: "
            f"{loop['run_ras_steps']} RAS, {loop['run_capture_steps']} capture, {loop['run_dense_steps']} dense."
        )
        out.append("")
        mem = loop.get("memory") or {}
        out.append(_table(
            ["variant", "total s", "ms/step", "speedup", "ideal", "meas/ideal", "peak MiB"],
            [["dense", _f(loop["dense_s"], ".3f"), _f(1e3 * loop["dense_s"] / loop["steps"], ".1f"), "1.00x",
              "", "", _memory_cell(mem.get("dense"))],
             ["RAS", _f(loop["ras_s"], ".3f"), _f(1e3 * loop["ras_s"] / loop["steps"], ".1f"),
              _f(loop["speedup"], ".2f", "x"), _f(loop["ideal_speedup"], ".2f", "x"),
              _f(loop["fraction_of_ideal"], ".2f"), _memory_cell(mem.get("RAS"))]],
        ))  # fmt: skip
    return out


def _render_flux(s: dict | None) -> list[str]:
    if not s or not s.get("data", {}).get("config"):
        return []
    d = s["data"]
    c = d["config"]
    out = ["", "## 3b. Flux", ""]
    out.append(
        f"{d['model']}: {d['double_blocks']} double-stream + {d['single_blocks']} single-stream blocks, "
        f"{c['heads']} heads x {c['head_dim']}, {d['tokens']} packed image tokens of {c['in_channels']} channels, "
        f"{d['text_tokens']} text tokens, batch {d['batch']}, random weights, {d['dtype']}, {d['inner_backend']}."
    )
    if d.get("depth_note"):
        out.append(f"Depth: {d['depth_note']}.")
    if "ras_applies" in d:
        out.append("rascompile: " + ("RAS applies." if d["ras_applies"] else f"runs dense: {d['fallback_reason']}."))
    if d.get("fused"):
        f = d["fused"]
        out.append(f"K/V cache writes fused: {f['fused_kv_writes']} of {f['kv_writes']}.")
    out += _per_step_table(d.get("per_step"))
    return out


def _render_tensorrt(s: dict | None) -> list[str]:
    if not s or not s.get("data", {}).get("model"):
        return []
    d = s["data"]
    out = ["", "## 4. TensorRT", ""]
    out.append(
        f"{d['model']}, random weights, exported in fp32 (`rascompile.export`"
        + (f", {d['export_s']:.1f} s, opset {d.get('opset')}" if d.get("export_s") else "")
        + f"). Generations: {d['config']['num_inference_steps']} steps, ratio {d['config']['sample_ratio']}, "
        f"start {d['config']['scheduler_start_step']}, resets {tuple(d['config']['error_reset_steps'])}, "
        "against the PyTorch RAS generation (fp32, CPU)."
        + (f" Engine build: {d['engine_build_s']:.1f} s." if d.get("engine_build_s") else "")
        + (f" torch-tensorrt compile: {d['torch_tensorrt_compile_s']:.1f} s." if d.get("torch_tensorrt_compile_s")
           else "")
    )  # fmt: skip
    gens = {k: v for k, v in d.get("generations", {}).items() if "kinds_equal" in v}
    if gens:
        out.append("")
        out.append(_table(
            ["runtime", "precision", "step kinds equal", "RAS steps with the same tokens", "max abs diff",
             "relative", "tolerance", "within"],
            [[k, v["precision"], "yes" if v["kinds_equal"] else "**no**",
              f"{v['ras_steps_same_tokens']} of {v['ras_steps']}", _f(v["max_abs_diff"], ".2e"),
              _f(v["relative_error"], ".2e"), _f(v["tolerance"], "g"), "yes" if v["within_tolerance"] else "**no**"]
             for k, v in gens.items()],
        ))  # fmt: skip
    if d.get("per_step"):
        base = {
            (r["precision"], r["graph"]): r["median_ms"] for r in d["per_step"] if r["runtime"] == "PyTorch inductor"
        }
        rows = []
        for r in d["per_step"]:
            ref = base.get((r["precision"], r["graph"]))
            speedup = _f(ref / r["median_ms"], ".2f", "x") if ref else "n/a"
            rows.append(
                [r["runtime"], r["precision"], r["graph"], r["k"], _f(r["median_ms"], ".2f"), speedup, r["note"]]
            )
        out.append("")
        out.append(
            _table(["runtime", "precision", "graph", "k", "ms", "vs PyTorch inductor (same precision)", "note"], rows)
        )
    return out


# ---------------------------------------------------------------------------------------------- main


BODIES = {
    "env": stage_env,
    "kernel_tests": stage_kernel_tests,
    "kernel_speed": stage_kernel_speed,
    "sd3": stage_sd3,
    "flux": stage_flux,
    "tensorrt": stage_tensorrt,
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
