"""Speed benchmark of RAS against dense execution: ``rascompile bench`` / ``benchmarks/speed.py``.

A mid-size SD3-shaped MMDiT (diffusers ``SD3Transformer2DModel``, random weights) runs on the current
device in fp32 under ``torch.no_grad()`` with a classifier-free-guidance batch of 2. Everything is
compiled with the same inner backend (inductor by default). Reported:

1. **Per-step time**: one dense step of the compiled original graph, one "capture" step (the RAS graph
   over all N tokens, which the dense steps of a RAS generation run to fill the caches) and one RAS step
   at each sample ratio, each beside its *ideal speedup* from the analytic FLOP model
   (:func:`step_flops`).
2. **Whole denoising loop** (28 steps, scheduler start 4, error resets 12 and 20, ratio 0.25 -- the
   paper's SD3 setting): RAS compiled against dense compiled and dense eager, with the loop's ideal
   speedup from the per-step FLOPs and the schedule.
3. **Controller overhead**: ``RASController.decide`` (token metric, selection, bookkeeping) per RAS step,
   as a share of the RAS step time.
4. **Memory**: the bytes of the caches the controller holds between steps, and the peak of the torch CPU
   allocations live during one dense, capture and RAS step (profiler memory events; CPU has no allocator
   peak statistics like ``torch.cuda.max_memory_allocated``).

Every timing is the median of ``--repeats`` runs after warm-up (the first call of each graph compiles
and is reported as compile time, not timed). "Dense compiled" calls the Dynamo graph of the transformer
compiled by the inner backend directly (what ``torch.compile(backend="inductor")`` runs, without
Dynamo's guard check, which costs microseconds); RAS runs through ``torch.compile`` and its controller.
"""

from __future__ import annotations

import argparse
import json
import math
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

from .backend import INNER_BACKENDS, RASBackend, RASGraph
from .bench_report import format_report
from .cli import check_output_file, echo, positive_int, ratio, ratio_list
from .config import RASConfig
from .controller import RASController
from .flops import ModelSpec, ideal_speedup, loop_ideal_speedup, step_flops
from .schedule import build_schedule
from .steps import TimestepSteps

__all__ = [
    "BenchSettings",
    "ModelSpec",
    "SMOKE",
    "add_arguments",
    "build_model",
    "denoise",
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
    heads: int = 12
    head_dim: int = 64
    layers: int = 4
    latent_size: int = 64  # latent height = width
    latent_channels: int = 16
    patch: int = 2
    text_tokens: int = 77
    joint_dim: int = 768
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
        return (self.latent_size // self.patch) ** 2

    @property
    def batch(self) -> int:
        return 2  # classifier-free guidance

    def spec(self) -> ModelSpec:
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


#: What ``--smoke`` changes: a tiny model and a short run, for tests.
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``rascompile bench`` (defaults: the benchmark of the project's issue)."""
    d = BenchSettings()
    model = parser.add_argument_group("model (SD3Transformer2DModel, random weights, fp32, CFG batch 2)")
    model.add_argument("--layers", type=_positive, default=None, help=f"joint blocks (default {d.layers})")
    model.add_argument("--heads", type=_positive, default=None, help=f"attention heads (default {d.heads})")
    model.add_argument("--head-dim", type=_positive, default=None, help=f"channels per head (default {d.head_dim})")
    model.add_argument(
        "--latent-size", type=_positive, default=None, help=f"latent height = width (default {d.latent_size})"
    )
    model.add_argument("--text-tokens", type=_positive, default=None, help=f"prompt tokens (default {d.text_tokens})")
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
        help="tiny model (2 layers, 16x16 latents), eager inner backend, 1 repeat, 6 steps: a quick check",
    )
    run.add_argument("--json", dest="json_path", metavar="PATH", default=None, help="also write the numbers here")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """Defaults, then ``--smoke``'s changes, then the options given explicitly."""
    settings = BenchSettings(smoke=bool(args.smoke))
    if args.smoke:
        settings = replace(settings, **SMOKE)
    given = {
        name: getattr(args, name)
        for name in (
            "layers",
            "heads",
            "head_dim",
            "latent_size",
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
        if getattr(args, name, None) is not None
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
    """An ``SD3Transformer2DModel`` of the benchmark's size with seeded random weights, in eval mode.

    Every parameter is redrawn (diffusers zero-initialises some layers): matrices ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.02^2), biases ~ N(0, 0.02^2).
    """
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=settings.latent_size,
        patch_size=settings.patch,
        in_channels=settings.latent_channels,
        num_layers=settings.layers,
        attention_head_dim=settings.head_dim,
        num_attention_heads=settings.heads,
        joint_attention_dim=settings.joint_dim,
        caption_projection_dim=settings.hidden,
        pooled_projection_dim=settings.pooled_dim,
        out_channels=settings.latent_channels,
        pos_embed_max_size=max(96, settings.latent_size // settings.patch),
    )
    gen = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() >= 2:
                value = noise / math.sqrt(param[0].numel())
            elif name.endswith("weight"):
                value = 1.0 + 0.02 * noise
            else:
                value = 0.02 * noise
            param.copy_(value.to(param.dtype))
    return model.eval()


@dataclass
class Inputs:
    latents: torch.Tensor  # [1, C, H, W]: one image, duplicated for CFG
    prompt_embeds: torch.Tensor  # [2, L, joint_dim]: negative; positive
    pooled: torch.Tensor  # [2, pooled_dim]


def make_inputs(settings: BenchSettings) -> Inputs:
    gen = torch.Generator().manual_seed(settings.seed + 1)
    s = settings
    return Inputs(
        latents=torch.randn(1, s.latent_channels, s.latent_size, s.latent_size, generator=gen),
        prompt_embeds=torch.randn(2, s.text_tokens, s.joint_dim, generator=gen),
        pooled=torch.randn(2, s.pooled_dim, generator=gen),
    )


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def denoise(transformer: Callable, scheduler, inputs: Inputs, steps: int, guidance_scale: float, on_step=None):
    """A Stable Diffusion 3 denoising loop with classifier-free guidance; returns the final latents."""
    scheduler.set_timesteps(steps)
    x = inputs.latents
    for t in scheduler.timesteps:
        out = transformer(
            hidden_states=torch.cat([x, x]),
            timestep=t.expand(2),
            encoder_hidden_states=inputs.prompt_embeds,
            pooled_projections=inputs.pooled,
            return_dict=False,
        )[0]
        uncond, cond = out.chunk(2)
        x = scheduler.step(uncond + guidance_scale * (cond - uncond), t, x, return_dict=False)[0]
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
    """Calls a compiled graph like the transformer, swapping the loop's latents and timestep into the captured
    graph inputs (the prompt embeddings and parameters stay those of the first call)."""

    def __init__(self, fn: Callable, args: list, latents_index: int, timestep_index: int):
        self.fn, self.args = fn, args
        self.latents_index, self.timestep_index = latents_index, timestep_index

    def __call__(self, *, hidden_states, timestep, **_):
        args = list(self.args)
        args[self.latents_index] = hidden_states
        args[self.timestep_index] = timestep
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


def _cache_bytes(controller: RASController) -> int:
    tensors = [controller.output_cache, *controller.kv_caches]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _controller_overhead(settings: BenchSettings, graph: RASGraph, timesteps: torch.Tensor, repeats: int) -> dict:
    """Median time of ``RASController.decide`` on the RAS steps of whole generations, on a fresh controller
    with the graph's layout (a first generation warms up and is not timed)."""
    config = settings.loop_config()
    layout = graph.controller.layout
    controller = RASController(config, layout, TimestepSteps(settings.steps), graph.controller.device)
    gen = torch.Generator().manual_seed(settings.seed + 2)
    shape = (1, settings.latent_channels, settings.latent_size, settings.latent_size)
    x = torch.randn(shape, generator=gen)
    trajectory = []
    for _ in range(settings.steps):
        trajectory.append(torch.cat([x, x]))
        x = x + 0.05 * torch.randn(shape, generator=gen)
    times: list[float] = []
    for generation in range(repeats + 1):
        for latents, t in zip(trajectory, timesteps):
            t2 = t.expand(2)
            start = time.perf_counter()
            decision = controller.decide(latents, t2)
            elapsed = time.perf_counter() - start
            if generation > 0 and decision.kind == "ras":
                times.append(elapsed)
    return {
        "decide_s": _median(times) if times else None,
        "samples": len(times),
        "latents_shape": [2, *shape[1:]],
    }


def run_bench(settings: BenchSettings, log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark and return its numbers (see :func:`format_report`)."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if settings.threads:
        torch.set_num_threads(settings.threads)
    s = settings
    spec = s.spec()
    n = s.num_tokens
    loop_repeats = s.loop_repeats or s.repeats
    results: dict = {
        "machine": machine_info(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
        "model": asdict(spec) | {"heads": s.heads, "head_dim": s.head_dim, "latent_size": s.latent_size},
    }
    load = _LoadMonitor()
    model = build_model(s)
    inputs = make_inputs(s)
    results["memory"] = {"parameters_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}

    backend = RASBackend(s.loop_config(), inner_backend=s.inner_backend, fused_kv_projection=s.fused_kv_projection)
    capture = _Capture(backend)
    compiled = torch.compile(model, backend=capture)
    scheduler = make_scheduler()
    scheduler.set_timesteps(s.steps)
    timesteps = scheduler.timesteps.clone()
    x2 = torch.cat([inputs.latents, inputs.latents])

    with torch.no_grad():
        # ------------------------------------------------------------------ first call: trace, rewrite, compile
        log(f"tracing and compiling the graphs the loop's schedule runs (k=N={n} and RAS) with {s.inner_backend} ...")
        first_call_s = _timed(
            lambda: compiled(
                hidden_states=x2,
                timestep=timesteps[0].expand(2),
                encoder_hidden_states=inputs.prompt_embeds,
                pooled_projections=inputs.pooled,
                return_dict=False,
            )
        )
        if len(backend.graphs) != 1:
            raise RuntimeError(f"expected one Dynamo graph of the transformer, got {len(backend.graphs)}")
        graph = backend.graphs[0]
        if graph.controller is None:
            raise RuntimeError(f"the RAS rewrite did not apply: {graph.fallback_reason}")
        fuse_lines = [line for line in graph.summary.splitlines() if line.startswith("fuse: ")]
        results["fused_kv_writes"] = sum("stays unfused" not in line for line in fuse_lines)
        results["unfused_kv_reasons"] = [line for line in fuse_lines if "stays unfused" in line]
        results["kv_writes"] = len(graph.controller.layout.kv_caches)
        args = capture.example_inputs[0]
        if graph.timestep_index is None:
            raise RuntimeError("the graph has no timestep input")

        # ------------------------------------------------------------------ per-step times
        variants: list[tuple[str, float | None, int, Callable]] = [("dense compiled", None, n, graph.run_dense)]
        all_idx = torch.arange(n).expand(s.batch, n).contiguous()
        variants.append(("RAS capture step (k=N)", None, n, lambda *a: graph.run_active(all_idx, *a)))
        ratios = s.ratios if s.loop_ratio in s.ratios else (*s.ratios, s.loop_ratio)
        for i, ratio in enumerate(ratios):
            k = n - RASConfig(sample_ratio=ratio).static_num_dropped(n)
            idx = _random_active(s.batch, n, k, s.seed + 100 + i)
            if ratio == s.loop_ratio:
                loop_idx = idx
            variants.append((f"RAS ratio {ratio:g}", ratio, k, lambda *a, idx=idx: graph.run_active(idx, *a)))

        per_step = []
        bar = _progress(s, len(variants) * (s.repeats + 2), "per-step")
        for name, ratio, k, fn in variants:
            bar.set_description(f"per-step: compiling {name}")
            compile_s = _timed(lambda fn=fn: fn(*args))  # the first call of a graph compiles it
            _timed(lambda fn=fn: fn(*args))  # warm-up
            bar.update(2)
            per_step.append(
                {
                    "name": name,
                    "ratio": ratio,
                    "k": k,
                    "first_call_s": compile_s,
                    "times_s": [],
                    "ideal_speedup": ideal_speedup(spec, k),
                    "flops": step_flops(spec, k),
                }
            )
        bar.set_description("per-step: timing")
        for _ in range(s.repeats):  # interleaved, so that drift affects every variant alike
            for row, (_, _, _, fn) in zip(per_step, variants):
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
        results["first_call_s"] = first_call_s
        results["compile_count_after_per_step"] = graph.compile_count

        # ------------------------------------------------------------------ whole loops
        schedule = build_schedule(s.loop_config(), s.steps, n)
        active_per_step = [p.num_active for p in schedule]
        num_ras = sum(not p.dense for p in schedule)
        dense_caller = _GraphCaller(graph.run_dense, args, graph.latents_index, graph.timestep_index)
        loops: dict[str, Callable] = {"RAS compiled": compiled, "dense compiled": dense_caller}
        if s.eager_loop:
            loops["dense eager"] = model
        loop_times: dict[str, list[float]] = {name: [] for name in loops}
        total = (loop_repeats + 1) * s.steps + (len(loops) - 1) * (loop_repeats * s.steps + 1)
        bar = _progress(s, total, "loops")

        def run_loop(name: str) -> float:
            bar.set_description(f"loop: {name}")
            sched = make_scheduler()
            return _timed(lambda: denoise(loops[name], sched, inputs, s.steps, s.guidance_scale, bar.update))

        # The first call above began a generation; forget it, so the warm-up loop (whose first call repeats that
        # call's latents and timestep) begins its own instead of looking like a second call for the same step.
        graph.controller.reset()
        run_loop("RAS compiled")  # warm-up: a whole generation (compiles any missing variant)
        for name, fn in loops.items():
            if name != "RAS compiled":  # warm-up: one step
                denoise(fn, make_scheduler(), inputs, 1, s.guidance_scale, bar.update)
        kinds: list[str] = []
        for _ in range(loop_repeats):
            for name in loops:  # interleaved, so that drift affects every variant alike
                loop_times[name].append(run_loop(name))
                if name == "RAS compiled":
                    kinds = [d.kind for d in graph.controller.history]
        bar.close()
        loop = {
            "steps": s.steps,
            "ratio": s.loop_ratio,
            "start_step": s.start_step,
            "reset_steps": list(s.reset_steps),
            "planned_ras_steps": num_ras,
            "run_ras_steps": kinds.count("ras"),
            "run_capture_steps": kinds.count("capture"),
            "run_dense_steps": kinds.count("dense"),
            "ideal_speedup": loop_ideal_speedup(spec, active_per_step),
            "times_s": loop_times,
            "median_s": {name: _median(v) for name, v in loop_times.items()},
        }
        ras_row = next(r for r in per_step if r["ratio"] == s.loop_ratio)
        loop["predicted_ras_s"] = (
            kinds.count("capture") * per_step[1]["median_s"]
            + kinds.count("dense") * dense_s
            + kinds.count("ras") * ras_row["median_s"]
        )
        loop["predicted_dense_s"] = s.steps * dense_s
        results["loop"] = loop
        results["compile_count"] = graph.compile_count

        # ------------------------------------------------------------------ controller overhead
        overhead = _controller_overhead(s, graph, timesteps, max(s.repeats, 1))
        if overhead["decide_s"] is not None:
            overhead["ras_step_s"] = ras_row["median_s"]
            overhead["ras_step_ratio"] = ras_row["ratio"]
            overhead["percent_of_ras_step"] = 100.0 * overhead["decide_s"] / ras_row["median_s"]
        results["controller"] = overhead

        # ------------------------------------------------------------------ memory
        memory = results["memory"]
        memory["ras_caches_bytes"] = _cache_bytes(graph.controller)
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
