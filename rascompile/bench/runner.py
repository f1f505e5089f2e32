"""Speed benchmark of RAS against dense execution: ``rascompile bench`` / ``benchmarks/speed.py``.

A mid-size transformer of one diffusers family (``--model``: ``sd3``, the default, an SD3-shaped
``SD3Transformer2DModel`` with a classifier-free-guidance batch of 2; ``flux``, a ``FluxTransformer2DModel``
with packed latents, batch 1; ``wan``, a ``WanTransformer3DModel`` on video latents, batch 1 per guidance
branch; see :mod:`rascompile.bench.models`), random weights, runs on the current device in fp32 under
``torch.no_grad()`` with the inputs its pipeline passes. Everything is compiled with the same inner backend
(inductor by default). Reported:

1. **Per-step time**: one dense step of the compiled original graph, one "capture" step (the RAS graph
   over all N tokens, which the dense steps of a RAS generation run to fill the caches) and one RAS step
   at each sample ratio, each beside its *ideal speedup* FLOPs(dense) / FLOPs(k). For ``sd3`` the FLOPs
   come from the analytic model (:func:`step_flops`); for the other families they are measured with
   ``FlopCounterMode`` (:func:`rascompile.bench.flops.count_flops`): the eager model for a dense step, the
   rewritten RAS graph run eagerly at k for a RAS step. ``sd3`` reports the measured FLOPs beside the
   analytic ones.
2. **Whole denoising loop** (28 steps, scheduler start 4, error resets 12 and 20, ratio 0.25 -- the
   paper's SD3 setting, for every family): RAS compiled against dense compiled and dense eager, with the
   loop's ideal speedup from the per-step FLOPs and the schedule.
3. **Controller overhead**: ``RASController.decide`` (token metric, selection, bookkeeping) per RAS step,
   as a share of the RAS step time.
4. **Memory**: the bytes of the caches the controller holds between steps, and the peak of the torch CPU
   allocations live during one dense, capture and RAS step (profiler memory events; CPU has no allocator
   peak statistics like ``torch.cuda.max_memory_allocated``).

Every timing is the median of ``--repeats`` runs after warm-up (the first call of each graph compiles
and is reported as compile time, not timed). "Dense compiled" calls the Dynamo graph of the transformer
compiled by the inner backend directly (what ``torch.compile(backend="inductor")`` runs, without
Dynamo's guard check, which costs microseconds); RAS runs through ``torch.compile`` and its controller.

When the backend cannot rewrite the model's graph (it runs dense and warns with the reason), the report says
so, with the reason, and times the dense step only: no RAS numbers, no speedups.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .._extras import require_extra
from ..cli.main import check_output_file, echo, positive_int, ratio, ratio_list
from ..config import RASConfig
from ..passes import render_record, rewrite_records
from ..runtime.backend import INNER_BACKENDS, RASBackend, RASGraph
from ..runtime.controller import RASController
from ..runtime.schedule import build_schedule
from ..runtime.steps import TimestepSteps
from .flops import ModelSpec, count_flops, ideal_speedup, loop_ideal_speedup, measured_loop_ideal_speedup, step_flops
from .models import MODEL_DEFAULTS, MODEL_SMOKE, MODELS, Inputs, bench_model, input_shapes
from .report import format_report

__all__ = [
    "BenchSettings",
    "Inputs",
    "MODELS",
    "ModelSpec",
    "SMOKE",
    "add_arguments",
    "build_model",
    "denoise",
    "dense_step_flops",
    "ras_step_flops",
    "settings_for",
    "format_report",
    "ideal_speedup",
    "loop_ideal_speedup",
    "machine_info",
    "main_from_args",
    "make_inputs",
    "run_bench",
    "settings_from_args",
    "step_flops",
]


# ============================================================================================ settings


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
        return RASConfig(
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


# ============================================================================================ machine, model


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except Exception:  # pragma: no cover - diffusers is a dependency
        diffusers_version = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def build_model(settings: BenchSettings) -> torch.nn.Module:
    """The transformer of ``settings.model`` at the benchmark's size with seeded random weights, in eval mode.

    Every parameter is redrawn (diffusers zero-initialises some layers): matrices ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.02^2), biases ~ N(0, 0.02^2).
    """
    return bench_model(settings.model).build(settings)


def make_inputs(settings: BenchSettings):
    """The pipeline inputs of one image (for ``sd3`` an :class:`Inputs`: latents [1, C, H, W], prompt embeddings
    and pooled embeddings [negative; positive])."""
    return bench_model(settings.model).make_inputs(settings)


def make_scheduler():
    """SD3's scheduler (flow matching, shift 3)."""
    return bench_model("sd3").make_scheduler(None)


def denoise(transformer: Callable, scheduler, inputs: Inputs, steps: int, guidance_scale: float, on_step=None):
    """A Stable Diffusion 3 denoising loop with classifier-free guidance; returns the final latents.
    (Other families: ``bench_models.bench_model(name).denoise``.)"""
    sd3 = bench_model("sd3")
    settings = replace(BenchSettings(), guidance_scale=guidance_scale)
    scheduler.set_timesteps(steps)
    x = inputs.latents
    for t in scheduler.timesteps:
        out = transformer(**sd3.call_kwargs(settings, inputs, x, t))[0]
        x = scheduler.step(sd3.combine(settings, [out]), t, x, return_dict=False)[0]
        if on_step is not None:
            on_step()
    return x


class _Capture:
    """A Dynamo backend wrapping a ``RASBackend`` that keeps each graph's real example inputs."""

    def __init__(self, backend: RASBackend):
        self.backend = backend
        self.example_inputs: list[list] = []

    def __call__(self, gm, example_inputs, **kwargs):
        graph = self.backend(gm, example_inputs, **kwargs)
        self.example_inputs.append(list(example_inputs))
        return graph


class _GraphCaller:
    """Calls a compiled graph like the transformer: the tensors of each call (latents, timestep, the branch's text)
    take the places in the captured graph inputs where the first call's tensors of those names were (the graph's
    other inputs, parameters included, stay those of the first call)."""

    def __init__(self, fn: Callable, args: list, first_call: dict):
        self.fn, self.args = fn, args
        self.places = {}
        for name, value in first_call.items():
            if isinstance(value, torch.Tensor):
                found = [i for i, a in enumerate(args) if a is value]
                if found:
                    self.places[name] = found[0]

    def __call__(self, **kwargs):
        args = list(self.args)
        for name, index in self.places.items():
            if name in kwargs:
                args[index] = kwargs[name]
        return self.fn(*args)


# ============================================================================================ measurement


def _timed(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _progress(settings: BenchSettings, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not settings.progress, leave=False, file=sys.stderr)


def _random_active(batch: int, num_tokens: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_tokens, generator=gen)[:k].sort().values for _ in range(batch)]
    return torch.stack(rows).contiguous()


def _step_peak_bytes(fn: Callable) -> int | None:
    """Peak bytes of torch CPU allocations live during ``fn()`` beyond those live before it, from the profiler's
    memory events (every allocation and free of the CPU allocator, in time order). ``None`` if unavailable."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = prof.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except Exception:  # profiler internals differ between torch versions: report n/a, don't fail the run
        return None
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


class _LoadMonitor:
    """Average number of cores that *other* processes kept busy during the run (from /proc/stat), so that a
    report taken on a shared machine says so. ``None`` where /proc/stat is unavailable."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
        own = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.monotonic()

    def stop(self) -> dict | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self.start, end))
        return {"other_processes_cores": max(0.0, (busy - own) / wall), "wall_s": wall}


def _cache_bytes(controller: RASController, branch: int = 0) -> int:
    """Bytes of one guidance branch's output and K/V caches (0 if that branch has none)."""
    if branch >= len(controller.branch_caches):
        return 0
    output, kv = controller.branch_caches[branch]
    tensors = [output, *kv]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _controller_overhead(
    settings: BenchSettings, graph: RASGraph, inputs, timesteps: torch.Tensor, repeats: int
) -> dict:
    """Median time of ``RASController.decide`` per RAS step (all of the step's calls: one per guidance branch
    for a pipeline that calls the transformer per branch) over whole generations, on a fresh controller with
    the graph's layout (a first generation warms up and is not timed). The latents move by random noise."""
    family = bench_model(settings.model)
    config = settings.loop_config()
    layout = graph.controller.layout
    controller = RASController(config, layout, TimestepSteps(settings.steps), graph.controller.device)
    gen = torch.Generator().manual_seed(settings.seed + 2)
    shape = tuple(inputs.latents.shape)  # the pipeline's latents of one image
    x = torch.randn(shape, generator=gen)
    calls = []  # per step: (latents, timestep) of each of its transformer calls
    for t in timesteps:
        step = []
        for branch in range(family.calls_per_step):
            kwargs = family.call_kwargs(settings, inputs, x, t, branch)
            step.append((kwargs["hidden_states"], kwargs["timestep"]))
        calls.append(step)
        x = x + 0.05 * torch.randn(shape, generator=gen)
    times: list[float] = []
    for generation in range(repeats + 1):
        for step in calls:
            start = time.perf_counter()
            decisions = [controller.decide(latents, t) for latents, t in step]
            elapsed = time.perf_counter() - start
            if generation > 0 and decisions[0].kind == "ras":
                times.append(elapsed)
    return {
        "decide_s": _median(times) if times else None,
        "samples": len(times),
        "calls_per_step": family.calls_per_step,
        "latents_shape": list(calls[0][0][0].shape),
    }


def dense_step_flops(model: torch.nn.Module, call: dict) -> int:
    """Measured FLOPs of one dense step: the eager ``model(**call)`` under ``FlopCounterMode``."""
    with torch.no_grad():
        return count_flops(lambda: model(**call))


def ras_step_flops(graph: RASGraph, args: list, active_idx: torch.Tensor) -> int:
    """Measured FLOPs of one RAS step over the tokens ``active_idx`` [B, k]: the rewritten graph (what the inner
    backend compiles) run eagerly under ``FlopCounterMode`` with the controller's caches (which it writes)."""
    output_cache, kv_caches = graph.controller.caches(0)
    with torch.no_grad():
        return count_flops(graph.ras_gm, *args, active_idx, output_cache, *kv_caches)


def _whole_graph(backend: RASBackend) -> tuple[RASGraph | None, str | None]:
    """The one RAS graph of the transformer, or ``None`` and why RAS does not apply."""
    if len(backend.graphs) != 1:
        return None, (
            f"Dynamo split the transformer into {len(backend.graphs)} graphs (graph breaks); the benchmark needs "
            "the whole transformer as one graph"
        )
    graph = backend.graphs[0]
    if graph.controller is None:
        return graph, graph.fallback_reason or "the backend runs this graph dense"
    return graph, None


def _dense_only(settings: BenchSettings, model, compiled, call: dict, dense_flops: int) -> list[dict]:
    """Per-step times of the dense model when RAS does not apply: compiled (``torch.compile`` with the ras
    backend, which runs the dense graph) and eager."""
    variants = [("dense compiled", lambda: compiled(**call)), ("dense eager", lambda: model(**call))]
    rows = []
    for name, fn in variants:
        compile_s = _timed(fn)
        _timed(fn)
        rows.append({"name": name, "ratio": None, "k": settings.num_tokens, "first_call_s": compile_s, "times_s": []})
    for _ in range(settings.repeats):
        for row, (_, fn) in zip(rows, variants):
            row["times_s"].append(_timed(fn))
    for row in rows:
        row["median_s"] = _median(row["times_s"])
        row["flops"] = dense_flops
    return rows


def run_bench(settings: BenchSettings, log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark and return its numbers (see :func:`format_report`)."""
    require_extra("demo", "tqdm", feature="rascompile bench")  # its progress bars
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    s = settings
    family = bench_model(s.model)
    spec = s.spec() if s.model == "sd3" else None  # the analytic FLOP model: SD3 only
    n = s.num_tokens
    loop_repeats = s.loop_repeats or s.repeats
    model_info = {"name": s.model, "class": family.class_name, "description": family.describe(s)}
    model_info |= (asdict(spec) if spec is not None else {}) | family.shapes(s)
    model_info["calls_per_step"] = family.calls_per_step
    results: dict = {
        "machine": machine_info(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "model": model_info,
    }
    load = _LoadMonitor()
    model = build_model(s)
    inputs = make_inputs(s)
    results["memory"] = {"parameters_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}

    backend = RASBackend(s.loop_config(), inner_backend=s.inner_backend, fused_kv_projection=s.fused_kv_projection)
    capture = _Capture(backend)
    compiled = torch.compile(model, backend=capture)
    scheduler = family.make_scheduler(s)
    family.set_timesteps(s, scheduler, s.steps)
    timesteps = scheduler.timesteps.clone()
    first = family.call_kwargs(s, inputs, inputs.latents, timesteps[0], 0)  # the generation's first call
    model_info["inputs"] = input_shapes(first)

    with torch.no_grad():
        # ------------------------------------------------------------------ first call: trace, rewrite, compile
        log(f"tracing and compiling the graphs the loop's schedule runs (k=N={n} and RAS) with {s.inner_backend} ...")
        first_call_s = _timed(lambda: compiled(**first))
        results["first_call_s"] = first_call_s
        graph, reason = _whole_graph(backend)
        results["ras"] = {"applies": reason is None, "reason": reason}
        log("counting the FLOPs of a dense step (FlopCounterMode, eager model) ...")
        dense_flops = dense_step_flops(model, first)
        if reason is not None:
            log(f"RAS does not apply to {family.class_name}: {reason}; timing the dense step only")
            results["per_step"] = _dense_only(s, model, compiled, first, dense_flops)
            results["flops"] = {"source": "measured", "dense_measured": dense_flops}
            results["background_load"] = load.stop()
            return results
        records = rewrite_records(graph.ras_gm)
        results["fused_kv_writes"] = sum(record.kind == "fused" for record in records)
        results["unfused_kv_reasons"] = [render_record(record) for record in records if record.kind == "unfused"]
        results["kv_writes"] = len(graph.controller.layout.kv_caches)
        args = capture.example_inputs[0]
        if graph.timestep_index is None:
            raise RuntimeError("the graph has no timestep input")

        # ------------------------------------------------------------------ per-step times
        variants: list[tuple[str, float | None, int, torch.Tensor | None, Callable]] = [
            ("dense compiled", None, n, None, graph.run_dense)
        ]
        all_idx = torch.arange(n).expand(s.batch, n).contiguous()
        variants.append(("RAS capture step (k=N)", None, n, all_idx, lambda *a: graph.run_active(all_idx, *a)))
        ratios = s.ratios if s.loop_ratio in s.ratios else (*s.ratios, s.loop_ratio)
        for i, ratio in enumerate(ratios):
            k = n - RASConfig(sample_ratio=ratio).static_num_dropped(n)
            idx = _random_active(s.batch, n, k, s.seed + 100 + i)
            if ratio == s.loop_ratio:
                loop_idx = idx
            variants.append((f"RAS ratio {ratio:g}", ratio, k, idx, lambda *a, idx=idx: graph.run_active(idx, *a)))

        # FLOPs: the dense step on the eager model; a RAS step as the rewritten graph run eagerly at k
        log("counting the FLOPs of the RAS graph at each k (FlopCounterMode, graph run eagerly) ...")
        measured = [dense_flops if idx is None else ras_step_flops(graph, args, idx) for _, _, _, idx, _ in variants]

        per_step = []
        bar = _progress(s, len(variants) * (s.repeats + 2), "per-step")
        for (name, ratio, k, _, fn), flops in zip(variants, measured):
            bar.set_description(f"per-step: compiling {name}")
            compile_s = _timed(lambda fn=fn: fn(*args))  # the first call of a graph compiles it
            _timed(lambda fn=fn: fn(*args))  # warm-up
            bar.update(2)
            row = {"name": name, "ratio": ratio, "k": k, "first_call_s": compile_s, "times_s": []}
            row["measured_flops"] = flops
            row["measured_ideal_speedup"] = dense_flops / flops
            if spec is not None:
                row["ideal_speedup"] = ideal_speedup(spec, k)
                row["flops"] = step_flops(spec, k)
            else:
                row["ideal_speedup"] = row["measured_ideal_speedup"]
                row["flops"] = flops
            per_step.append(row)
        bar.set_description("per-step: timing")
        for _ in range(s.repeats):  # interleaved, so that drift affects every variant alike
            for row, (_, _, _, _, fn) in zip(per_step, variants):
                row["times_s"].append(_timed(lambda fn=fn: fn(*args)))
                bar.update()
        bar.close()
        for row in per_step:
            row["median_s"] = _median(row["times_s"])
        dense_s = per_step[0]["median_s"]
        for row in per_step:
            row["speedup"] = dense_s / row["median_s"]
            row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
        results["per_step"] = per_step
        flops_info: dict = {"dense_measured": dense_flops}
        if spec is not None:
            flops_info["source"] = "analytic"
            # how far the generic measurement is from the analytic model, over the per-step rows
            flops_info["measured_vs_analytic_max_relative_difference"] = max(
                abs(r["measured_flops"] / r["flops"] - 1) for r in per_step
            )
        else:
            flops_info["source"] = "measured"
        results["flops"] = flops_info
        results["compile_count_after_per_step"] = graph.compile_count

        # ------------------------------------------------------------------ whole loops
        schedule = build_schedule(s.loop_config(), s.steps, n)
        active_per_step = [p.num_active for p in schedule]
        num_ras = sum(not p.dense for p in schedule)
        dense_caller = _GraphCaller(graph.run_dense, args, first)
        loops: dict[str, Callable] = {"RAS compiled": compiled, "dense compiled": dense_caller}
        if s.eager_loop:
            loops["dense eager"] = model
        loop_times: dict[str, list[float]] = {name: [] for name in loops}
        total = (loop_repeats + 1) * s.steps + (len(loops) - 1) * (loop_repeats * s.steps + 1)
        bar = _progress(s, total, "loops")

        def run_loop(name: str) -> float:
            bar.set_description(f"loop: {name}")
            return _timed(lambda: family.denoise(loops[name], s, inputs, s.steps, bar.update))

        # The first call above began a generation; forget it, so the warm-up loop (whose first call repeats that
        # call's latents and timestep) begins its own instead of looking like a second call for the same step.
        graph.controller.reset()
        run_loop("RAS compiled")  # warm-up: a whole generation (compiles any missing variant)
        for name, fn in loops.items():
            if name != "RAS compiled":  # warm-up: one step
                family.denoise(fn, s, inputs, 1, bar.update)
        kinds: list[str] = []
        for _ in range(loop_repeats):
            for name in loops:  # interleaved, so that drift affects every variant alike
                loop_times[name].append(run_loop(name))
                if name == "RAS compiled":
                    kinds = [d.kind for d in graph.controller.history]
        bar.close()
        if spec is not None:
            loop_ideal = loop_ideal_speedup(spec, active_per_step)
        else:
            flops_at = {row["k"]: row["measured_flops"] for row in per_step[2:]} | {n: dense_flops}
            loop_ideal = measured_loop_ideal_speedup(flops_at, n, active_per_step)
        loop = {
            "steps": s.steps,
            "calls_per_step": family.calls_per_step,
            "ratio": s.loop_ratio,
            "start_step": s.start_step,
            "reset_steps": list(s.reset_steps),
            "planned_ras_steps": num_ras,
            "run_ras_steps": kinds.count("ras"),
            "run_capture_steps": kinds.count("capture"),
            "run_dense_steps": kinds.count("dense"),
            "ideal_speedup": loop_ideal,
            "times_s": loop_times,
            "median_s": {name: _median(v) for name, v in loop_times.items()},
        }
        ras_row = next(r for r in per_step if r["ratio"] == s.loop_ratio)
        calls = family.calls_per_step
        loop["predicted_ras_s"] = calls * (
            kinds.count("capture") * per_step[1]["median_s"]
            + kinds.count("dense") * dense_s
            + kinds.count("ras") * ras_row["median_s"]
        )
        loop["predicted_dense_s"] = calls * s.steps * dense_s
        results["loop"] = loop
        results["compile_count"] = graph.compile_count

        # ------------------------------------------------------------------ controller overhead
        overhead = _controller_overhead(s, graph, inputs, timesteps, max(s.repeats, 1))
        if overhead["decide_s"] is not None:
            overhead["ras_step_s"] = calls * ras_row["median_s"]
            overhead["ras_step_ratio"] = ras_row["ratio"]
            overhead["percent_of_ras_step"] = 100.0 * overhead["decide_s"] / overhead["ras_step_s"]
        results["controller"] = overhead

        # ------------------------------------------------------------------ memory
        memory = results["memory"]
        memory["ras_caches_bytes"] = sum(_cache_bytes(graph.controller, b) for b in range(calls))
        memory["dense_step_peak_bytes"] = _step_peak_bytes(lambda: graph.run_dense(*args))
        memory["capture_step_peak_bytes"] = _step_peak_bytes(lambda: graph.run_active(all_idx, *args))
        memory["ras_step_ratio"] = s.loop_ratio
        memory["ras_step_peak_bytes"] = _step_peak_bytes(lambda: graph.run_active(loop_idx, *args))
        memory["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results["background_load"] = load.stop()
    return results


def main_from_args(args: argparse.Namespace) -> int:
    """``rascompile bench``: run, print the report, write ``--json``. Returns the exit status."""
    try:
        settings = settings_from_args(args)
        if settings.json_path:
            check_output_file(settings.json_path, "--json")  # before the run, not after it
    except ValueError as exc:
        print(f"rascompile bench: error: {exc}", file=sys.stderr)
        return 2
    results = run_bench(settings)
    print(format_report(results), flush=True)
    if settings.json_path:
        path = Path(settings.json_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2, default=str))
        except OSError as exc:  # the path was writable when the run began
            print(f"rascompile bench: error: --json {path}: cannot write it ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(f"\nwrote {settings.json_path}")
    return 0
