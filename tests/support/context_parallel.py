"""Run a worker on several CPU processes joined by a gloo process group, and the same worker in one process.

Groundwork for RAS under diffusers' context parallelism (``transformer.enable_parallelism``, Ulysses). Everything runs
on the CPU: gloo supports the collectives that diffusers' Ulysses path issues (``all_to_all_single`` through the
functional collectives, ``all_gather``), and ``native`` (``torch.nn.functional.scaled_dot_product_attention``) is the
only attention backend with ``supports_context_parallel`` that runs on a CPU in float32.

The API
-------
``run_ranks(worker, *args, world_size=2, timeout=120.0, **kwargs) -> list``
    Spawns ``world_size`` processes (``torch.multiprocessing``, start method ``spawn``). Each joins a gloo process
    group (``init_method`` a ``file://`` in a fresh temporary folder, so no port can be taken), calls
    ``worker(RankInfo(rank, world_size, distributed=True), *args, **kwargs)`` and saves what it returns with
    ``torch.save``; the parent returns the ranks' results in rank order. A rank that raises makes every process end
    and ``RanksFailed`` carry that rank's traceback text; past ``timeout`` seconds every process gets its Python
    stacks dumped (``faulthandler`` on ``SIGUSR1``: where a hang is), is killed, and ``RanksTimedOut`` carries the
    stacks. The process group is destroyed in every rank, and every process joined (terminated, killed if need be)
    and the folder removed whatever happens.
``run_reference(worker, *args, **kwargs)``
    The same worker in this process, without distributed: ``worker(RankInfo(0, 1, distributed=False), ...)``.
``enable_ulysses(model, degree=2, backend="native", **config)``; ``enable_context_parallel(model, backend, **config)``
    What a worker calls on its model when ``info.distributed``: sets the attention backend and calls
    ``model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, **config))`` (see the comment in
    ``enable_context_parallel`` for the one CPU quirk it works around).

Workers must be top-level functions of an importable module (``spawn`` pickles them by name) and take picklable
arguments. The tiny models and the dense forward worker below are such workers; the tests import them.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from unittest import mock

import torch

__all__ = [
    "RankInfo",
    "RanksFailed",
    "RanksTimedOut",
    "run_ranks",
    "run_reference",
    "enable_context_parallel",
    "enable_ulysses",
    "FAMILIES",
    "build_family",
    "dense_forward_worker",
]


@dataclass(frozen=True)
class RankInfo:
    """What a worker knows of where it runs."""

    rank: int
    world_size: int
    distributed: bool


class RanksFailed(RuntimeError):
    """A rank raised (or died); the message holds the traceback text of each rank that left one."""


class RanksTimedOut(RanksFailed):
    """The ranks ran past the timeout; the message holds each rank's Python stacks at the time."""


# ---------------------------------------------------------------------------------------------- the child side


def _rank_entry(
    rank: int,
    world_size: int,
    folder: str,
    timeout: float,
    threads: int,
    worker: Callable,
    args: tuple,
    kwargs: dict,
    backend: str = "gloo",
) -> None:
    """Body of one spawned rank. ``torch.multiprocessing`` passes ``rank`` first."""
    import torch.distributed as dist

    stacks = open(os.path.join(folder, f"rank{rank}.stacks"), "w")
    if hasattr(signal, "SIGUSR1"):
        # The parent sends SIGUSR1 at the timeout: the stacks show which collective a rank waits in.
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    torch.set_num_threads(threads)
    try:
        try:
            if backend == "nccl":
                torch.cuda.set_device(rank)
            dist.init_process_group(
                backend=backend,
                init_method="file://" + os.path.join(folder, "pg_init"),
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=max(timeout, 1.0)),
            )
            result = worker(RankInfo(rank, world_size, True), *args, **kwargs)
            torch.save(result, os.path.join(folder, f"rank{rank}.pt.tmp"))
            os.replace(os.path.join(folder, f"rank{rank}.pt.tmp"), os.path.join(folder, f"rank{rank}.pt"))
        except BaseException:
            with open(os.path.join(folder, f"rank{rank}.error"), "w") as f:
                f.write(traceback.format_exc())
            raise
        finally:
            if dist.is_initialized():
                # Never let a failing peer turn the teardown into a hang: the parent kills us at the timeout anyway.
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
    finally:
        if hasattr(signal, "SIGUSR1"):
            faulthandler.unregister(signal.SIGUSR1)
        stacks.close()


# ---------------------------------------------------------------------------------------------- the parent side


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _stop(processes) -> None:
    """Terminate, then kill, then join every process still alive. Only the processes this harness started."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(5.0)


def run_ranks(
    worker: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout: float = 120.0,
    threads_per_rank: int = 1,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Run ``worker(RankInfo(rank, world_size, True), *args, **kwargs)`` on ``world_size`` spawned CPU processes
    joined by a gloo process group; return each rank's result (``torch.save``/``torch.load``), in rank order.

    Raises ``RanksFailed`` (with each failing rank's traceback) when a rank raises or dies, ``RanksTimedOut`` (with
    every rank's stacks) past ``timeout`` seconds, counted from the spawn (imports included)."""
    import torch.multiprocessing as mp

    folder = tempfile.mkdtemp(prefix="rascompile_cp_")
    context = None
    try:
        context = mp.start_processes(
            _rank_entry,
            args=(world_size, folder, timeout, threads_per_rank, worker, args, kwargs, backend),
            nprocs=world_size,
            join=False,
            daemon=True,  # a parent that dies without its finally still takes the ranks with it (atexit)
            start_method="spawn",
        )
        processes = context.processes
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.exitcode for p in processes]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            errors = [r for r in range(world_size) if os.path.exists(os.path.join(folder, f"rank{r}.error"))]
            if failed or errors:
                # The rank whose traceback was written first is the cause; the others usually fail in a collective.
                first = (
                    min(errors, key=lambda r: os.stat(os.path.join(folder, f"rank{r}.error")).st_mtime_ns)
                    if errors
                    else failed[0]
                )
                # Give the other ranks a moment to write their own errors (a peer's failure often makes a
                # collective raise on them too: "Connection closed by peer"), then end them all.
                time.sleep(0.5)
                _stop(processes)
                texts = []
                for r in range(world_size):
                    text = _read(os.path.join(folder, f"rank{r}.error"))
                    if text or processes[r].exitcode not in (None, 0):
                        code = processes[r].exitcode
                        texts.append(f"--- rank {r} (exit code {code}) ---\n{text or '(no traceback)'}")
                raise RanksFailed(f"rank {first} failed first; every rank's traceback:\n" + "\n".join(texts))
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                alive = [p for p in processes if p.is_alive()]
                if hasattr(signal, "SIGUSR1"):
                    for p in alive:
                        with contextlib.suppress(OSError):
                            os.kill(p.pid, signal.SIGUSR1)
                    time.sleep(1.0)
                _stop(processes)
                stacks = "\n".join(
                    f"--- rank {r} ---\n{_read(os.path.join(folder, f'rank{r}.stacks')) or '(no stacks)'}"
                    for r in range(world_size)
                )
                raise RanksTimedOut(f"ranks ran past {timeout:.0f} s; their stacks:\n{stacks}")
            time.sleep(0.05)
        results = []
        for r in range(world_size):
            path = os.path.join(folder, f"rank{r}.pt")
            if not os.path.exists(path):
                raise RanksFailed(f"rank {r} exited 0 without a result")
            results.append(torch.load(path, weights_only=False))
        return results
    finally:
        if context is not None:
            _stop(context.processes)
            for q in getattr(context, "error_queues", []):
                with contextlib.suppress(Exception):
                    q.close()
                    q.join_thread()
        shutil.rmtree(folder, ignore_errors=True)


def run_reference(worker: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The same worker in this process, without distributed: ``worker(RankInfo(0, 1, False), *args, **kwargs)``."""
    return worker(RankInfo(0, 1, False), *args, **kwargs)


# ---------------------------------------------------------------------------------------------- context parallelism


def enable_context_parallel(model: torch.nn.Module, *, backend: str = "native", **config: Any) -> None:
    """``model.enable_parallelism(config=ContextParallelConfig(**config))`` over the default process group, on the
    CPU, after ``model.set_attention_backend(backend)``.

    The attention backend must be one that registers ``supports_context_parallel`` (diffusers
    ``models/attention_dispatch.py``); on a CPU in float32 that is ``native`` only, and only for Ulysses (ring
    attention needs the backend's log-sum-exp, which ``native`` refuses)."""
    from diffusers import ContextParallelConfig

    model.set_attention_backend(backend)
    # diffusers 0.42.1 ``ModelMixin._resolve_parallel_config`` (models/modeling_utils.py:1718-1719) builds the
    # rank's device as ``torch.device(torch._C._get_accelerator().type, rank % torch.accelerator.device_count())``.
    # Without an accelerator the type is "cpu" but ``device_count()`` is 0: ZeroDivisionError. With 1 it is
    # ``cpu:0``, which nothing in the CP path uses for placement (the mesh is built from the "cpu" device type, and
    # the gloo group carries the collectives). The patch covers this call only, in this process only; diffusers is
    # never patched at import time.
    if torch.accelerator.device_count() > 0:  # GPUs: diffusers places rank r on device r itself
        model.enable_parallelism(config=ContextParallelConfig(**config))
        return
    with mock.patch("torch.accelerator.device_count", return_value=1):
        model.enable_parallelism(config=ContextParallelConfig(**config))


def enable_ulysses(model: torch.nn.Module, degree: int = 2, backend: str = "native", **config: Any) -> None:
    """Ulysses context parallelism of ``degree`` (``ContextParallelConfig(ulysses_degree=degree, **config)``)."""
    enable_context_parallel(model, backend=backend, ulysses_degree=degree, **config)


# ---------------------------------------------------------------------------------------------- tiny families

#: Text lengths divisible by 2: Flux and Qwen-Image split the text tokens across the ranks too
#: (``EquipartitionSharder.shard`` asserts divisibility), the repo's tiny Flux/Qwen calls use 5.
CP_TEXT_LEN = 6

FAMILIES = ("flux", "wan", "qwen_image")


def _flux_call(batch: int, grid: int, text_len: int, seed: int) -> dict:
    from tests.support.models import FLUX_POOLED_DIM, FLUX_TEXT_DIM

    gen = torch.Generator().manual_seed(50_000 + seed)
    ids = torch.zeros(grid, grid, 3)
    ids[..., 1] = torch.arange(grid)[:, None]
    ids[..., 2] = torch.arange(grid)[None, :]
    return dict(
        hidden_states=torch.randn(batch, grid * grid, 16, generator=gen),
        encoder_hidden_states=torch.randn(batch, text_len, FLUX_TEXT_DIM, generator=gen),
        pooled_projections=torch.randn(batch, FLUX_POOLED_DIM, generator=gen),
        timestep=torch.full((batch,), 0.5),
        img_ids=ids.reshape(grid * grid, 3),
        txt_ids=torch.zeros(text_len, 3),
        return_dict=False,
    )


def _qwen_image_call(batch: int, grid: int, text_len: int, seed: int) -> dict:
    from tests.support.models import FLUX_TEXT_DIM

    gen = torch.Generator().manual_seed(60_000 + seed)
    mask = torch.ones(batch, text_len)
    mask[0, -2:] = 0  # a padded prompt: the joint mask travels through the Ulysses all-gather of the mask
    return dict(
        hidden_states=torch.randn(batch, grid * grid, 16, generator=gen),
        encoder_hidden_states=torch.randn(batch, text_len, FLUX_TEXT_DIM, generator=gen),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((batch,), 0.5),
        img_shapes=[(1, grid, grid)] * batch,  # in tokens, as tests/support/models.py qwen_image_call_kwargs
        return_dict=False,
    )


def build_family(family: str, seed: int = 0, batch: int = 2, text_len: int = CP_TEXT_LEN):
    """The repo's tiny transformer of ``family`` (tests/support/models.py, seeded: identical weights on every rank)
    and its call kwargs (full, unsharded: the CP hooks shard them)."""
    from tests.support import models

    if family == "flux":
        return models.tiny_flux_transformer(seed), _flux_call(batch, grid=8, text_len=text_len, seed=seed)
    if family == "wan":
        # Wan does not split its text (its _cp_plan leaves encoder_hidden_states whole); the repo's call is used.
        return models.tiny_wan_transformer(seed), models.wan_call_kwargs(batch=batch, seed=seed)
    if family == "qwen_image":
        return models.tiny_qwen_image_transformer(seed), _qwen_image_call(batch, grid=8, text_len=text_len, seed=seed)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def dense_forward_worker(info: RankInfo, families: tuple[str, ...] = FAMILIES, text_len: int = CP_TEXT_LEN) -> dict:
    """Eager forward of each family's tiny transformer, under Ulysses when ``info.distributed``.

    Returns ``{family: {"out": gathered output, "proj_out_tokens": rows proj_out saw on this rank}}``: under
    Ulysses ``proj_out`` sees this rank's shard (its ContextParallelOutput gathers after it), so a test can check
    that the model really ran sharded."""
    result = {}
    for family in families:
        model, kwargs = build_family(family, text_len=text_len)
        if info.distributed:
            enable_ulysses(model, degree=info.world_size)
        seen: list[int] = []
        # A torch pre-hook runs before diffusers' HookRegistry wrapper of proj_out.forward: it sees the local rows.
        handle = model.proj_out.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(args[0].shape[1]))
        try:
            with torch.no_grad():
                out = model(**kwargs)[0].detach().clone()
        finally:
            handle.remove()
        result[family] = {"out": out, "proj_out_tokens": seen[0]}
    return result
