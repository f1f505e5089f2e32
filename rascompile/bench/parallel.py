"""``rascompile bench --context-parallel P``: the benchmark on every rank of diffusers' Ulysses context parallelism.

Launched with ``torchrun --nproc-per-node P -m rascompile bench --model flux --context-parallel P``. Every
rank runs the same program with the same seeds (the weights and inputs are replicated); its transformer runs under
``enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`` with the ``native`` attention backend, so a
dense step splits the tokens over the ranks and a RAS step gives each rank 1/P of the active tokens and the K/V
caches of 1/P of the heads. Each rank measures what the single-process bench measures (:func:`run_bench`: dense
and RAS steps interleaved, medians); :func:`run_parallel_bench` gathers the per-rank numbers to rank 0
(``all_gather_object``), which prints the report (``report.format_report`` with the per-rank table of
``parallel_report``) and writes ``--json``.

The bench creates the default process group from torchrun's environment (``gloo``) and destroys it at the end; a
group that is already initialised (a caller's) is used as it is and left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import replace
from datetime import timedelta
from unittest import mock

import torch
import torch.distributed as dist

from ..cli.main import check_output_file, quiet_third_party
from ..runtime.memory import set_bytes
from .models import MODELS, bench_model
from .options import settings_from_args
from .settings import BenchSettings

__all__ = [
    "cache_split",
    "check_launch",
    "check_settings",
    "context_parallel_families",
    "enable_ulysses",
    "main_from_args",
    "process_group",
    "run_parallel_bench",
]

#: How long a rank waits in one collective for the others (a peer that died leaves it waiting): longer than any
#: compile between two collectives of the run.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)

LAUNCH = "torchrun --nproc-per-node {p} -m rascompile bench ... --context-parallel {p}"


# ============================================================================================ checks


def _cp_plan(model: str) -> dict | None:
    import diffusers

    return getattr(getattr(diffusers, bench_model(model).class_name), "_cp_plan", None)


def context_parallel_families() -> tuple[str, ...]:
    """The ``--model`` families whose diffusers transformer has a context-parallel plan (``_cp_plan``)."""
    return tuple(name for name in MODELS if _cp_plan(name))


def _splits_text(plan: dict) -> bool:
    """Whether the plan splits the text tokens over the ranks too (Flux; Wan's cross-attention keeps them whole)."""
    return any(isinstance(inputs, dict) and "encoder_hidden_states" in inputs for inputs in plan.values())


def check_settings(settings: BenchSettings, degree: int) -> None:
    """Raise ``ValueError`` naming the option when ``settings`` cannot run under Ulysses of ``degree``: a family
    without a ``_cp_plan``, heads, image tokens or (where the plan splits them) text tokens not divisible by P."""
    option = f"--context-parallel {degree}"
    s = settings
    family = bench_model(s.model)
    plan = _cp_plan(s.model)
    if not plan:
        allowed = " or ".join(f"--model {name}" for name in context_parallel_families())
        raise ValueError(
            f"{option}: --model {s.model} ({family.class_name}) has no diffusers context-parallel plan (_cp_plan); "
            f"use {allowed}"
        )
    if s.heads % degree:
        raise ValueError(
            f"{option}: Ulysses attention splits the heads over the ranks: --heads {s.heads} must be a multiple of "
            f"{degree}"
        )
    if s.num_tokens % degree:
        source = f"--latent-size {s.latent_size}" + (f", --frames {s.frames}" if s.model == "wan" else "")
        raise ValueError(
            f"{option}: the ranks split the {s.num_tokens} image tokens ({source}, patch {s.patch}): their number "
            f"must be a multiple of {degree}"
        )
    if _splits_text(plan) and s.text_tokens % degree:
        raise ValueError(
            f"{option}: {family.class_name} splits the text tokens over the ranks too: --text-tokens "
            f"{s.text_tokens} must be a multiple of {degree}"
        )


def check_launch(degree: int) -> None:
    """Raise ``ValueError`` naming the option when this process cannot join a group of ``degree`` ranks: no process
    group and no torchrun environment, or a world size other than ``degree``."""
    option = f"--context-parallel {degree}"
    launch = LAUNCH.format(p=degree)
    if not dist.is_available():
        raise ValueError(f"{option}: this torch build has no torch.distributed")
    if dist.is_initialized():
        world = dist.get_world_size()
        if world != degree:
            raise ValueError(f"{option}: the process group has {world} processes, not {degree}; launch with `{launch}`")
        return
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"{option}: the process group is not initialised and this process was not started by torchrun "
            f"({', '.join(missing)} not set); launch with `{launch}`"
        )
    world = int(os.environ["WORLD_SIZE"])
    if world != degree:
        raise ValueError(
            f"{option}: torchrun started {world} process{'es' if world != 1 else ''} (WORLD_SIZE={world}), not "
            f"{degree}; launch with `{launch}`"
        )


def _speaks() -> bool:
    """Whether this process prints (rank 0, or a process torchrun did not start)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


# ============================================================================================ the ranks


@contextlib.contextmanager
def process_group(degree: int):
    """The default process group: created from torchrun's environment and destroyed on exit, or the one already
    initialised (left as it is). Yields this process's rank."""
    check_launch(degree)
    created = not dist.is_initialized()
    if created:
        # gloo: the bench runs its model on the CPU on every machine (as the single-process bench does), and NCCL
        # carries CUDA tensors only.
        dist.init_process_group(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT)
    try:
        yield dist.get_rank()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def enable_ulysses(model: torch.nn.Module, degree: int) -> None:
    """``model`` under Ulysses context parallelism of ``degree`` over the default process group, attention backend
    ``native`` (the one diffusers backend with context-parallel support that runs on a CPU in float32)."""
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    model.set_attention_backend("native")
    # diffusers builds its mesh on the accelerator's device type; the bench's tensors and collectives are on the CPU
    # whatever the machine has, so it gets a CPU mesh of diffusers' dimensions (ring 1 x Ulysses P).
    mesh = init_device_mesh("cpu", (1, degree), mesh_dim_names=("ring", "ulysses"))
    config = ContextParallelConfig(ulysses_degree=degree, mesh=mesh)
    if torch.accelerator.device_count() > 0:
        model.enable_parallelism(config=config)
        return
    # No accelerator: diffusers 0.42.1 ``ModelMixin._resolve_parallel_config`` computes the rank's device as
    # ``torch.device(torch._C._get_accelerator().type, rank % torch.accelerator.device_count())``, a division by
    # zero here. With 1 it is ``cpu:0``, which the context-parallel path never uses for placement (the mesh above
    # and the gloo group carry everything). The patch covers this one call in this process only.
    with mock.patch("torch.accelerator.device_count", return_value=1):
        model.enable_parallelism(config=config)


def cache_split(graph) -> dict:
    """Bytes of one cache set of the RAS graph on this rank: the output cache (whole on every rank) and the K/V
    caches (this rank's heads)."""
    layout = graph.layout
    output = set_bytes(layout.output_cache, ())
    return {
        "output_cache_bytes_per_set": output,
        "kv_cache_bytes_per_set": set_bytes(layout.output_cache, layout.kv_caches) - output,
        "kv_cache_shape": list(layout.kv_caches[0][0]) if layout.kv_caches else None,
    }


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def rank_summary(rank: int, results: dict, split: dict, cpu_s: float, wall_s: float) -> dict:
    """One rank's row of the report: its dense and RAS step times, loop times and cache bytes."""
    s = results["settings"]
    steps = results["per_step"]
    row: dict = {
        "rank": rank,
        "ras_applies": results["ras"]["applies"],
        "ras_reason": results["ras"]["reason"],
        "dense_step_s": steps[0]["median_s"],
        "per_step": [{"name": r["name"], "k": r["k"], "median_s": r["median_s"]} for r in steps],
        "cpu_s": cpu_s,
        "wall_s": wall_s,
        "process_peak_rss_bytes": results["memory"].get("process_peak_rss_bytes"),
    }
    if not row["ras_applies"]:
        return row
    ras = next(r for r in steps if r["ratio"] == s["loop_ratio"])
    loop, mem = results["loop"], results["memory"]
    med, branches = loop["median_s"], max(1, mem["ras_cache_branches"])
    row |= {
        "ras_step_s": ras["median_s"],
        "ras_step_ratio": ras["ratio"],
        "ras_step_k": ras["k"],
        "step_speedup": row["dense_step_s"] / ras["median_s"],
        "capture_step_s": steps[1]["median_s"],
        "loop_dense_s_per_step": med["dense compiled"] / loop["steps"],
        "loop_ras_s_per_step": med["RAS compiled"] / loop["steps"],
        "loop_speedup": med["dense compiled"] / med["RAS compiled"],
        "cache_bytes": mem["ras_caches_bytes"],
        "cache_branches": branches,
        "kv_cache_bytes": branches * split["kv_cache_bytes_per_set"],
        "output_cache_bytes": branches * split["output_cache_bytes_per_set"],
        "kv_cache_shape": split["kv_cache_shape"],
    }
    return row


def _other_load(results: dict, ranks: list[dict]) -> None:
    """Rank 0's background load counted without the other ranks (they are the run, not a disturbance)."""
    load = results.get("background_load")
    if load is None or not load.get("wall_s"):
        return
    ranks_cores = sum(r["cpu_s"] for r in ranks[1:]) / load["wall_s"]
    load["other_ranks_cores"] = ranks_cores
    load["other_processes_cores"] = max(0.0, load["other_processes_cores"] - ranks_cores)


def run_parallel_bench(settings: BenchSettings, degree: int) -> dict | None:
    """Run the benchmark on this rank under Ulysses of ``degree``; rank 0 returns its results with every rank's
    summary in ``results["context_parallel"]``, the other ranks None."""
    from .runner import run_bench

    with process_group(degree) as rank:
        s = settings if rank == 0 else replace(settings, progress=False)
        log = (lambda message: print(message, file=sys.stderr, flush=True)) if rank == 0 else (lambda message: None)
        split: dict = {}
        cpu, wall = _cpu_seconds(), time.monotonic()
        results = run_bench(
            s,
            log,
            prepare_model=lambda model: enable_ulysses(model, degree),
            inspect_graph=lambda graph: split.update(cache_split(graph)),
        )
        summary = rank_summary(rank, results, split, _cpu_seconds() - cpu, time.monotonic() - wall)
        ranks: list = [None] * degree
        dist.all_gather_object(ranks, summary)
    if rank != 0:
        return None
    _other_load(results, ranks)
    results["context_parallel"] = {
        "degree": degree,
        "mode": "ulysses",
        "attention_backend": "native",
        "process_group_backend": "gloo",
        "ranks": ranks,
    }
    return results


def main_from_args(args: argparse.Namespace) -> int:
    """``rascompile bench --context-parallel P`` on one rank: check, run, and on rank 0 print the report and write
    ``--json``. Returns the exit status."""
    from .runner import format_report, write_json

    degree = args.context_parallel
    try:
        settings = settings_from_args(args)
        check_settings(settings, degree)
        check_launch(degree)
        if settings.json_path:
            check_output_file(settings.json_path, "--json")  # before the run, not after it
    except ValueError as exc:
        if _speaks():  # every rank finds the same problem; one says it
            print(f"rascompile bench: error: {exc}", file=sys.stderr)
        return 2
    quiet_third_party()
    results = run_parallel_bench(settings, degree)
    if results is None:
        return 0
    print(format_report(results), flush=True)
    return write_json(settings.json_path, results)
