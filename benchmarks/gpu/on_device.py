"""The stages that run ``tests/support``'s device checks on the suite's device: ``stacks`` (offloading and LoRA),
``memory`` (the caches against the allocator) and ``context_parallel`` (Ulysses on two GPUs, or two gloo processes)."""

from __future__ import annotations

import sys

import torch

from .config import ROOT
from .suite import SkipStage, Stage, Suite


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
        # the dry run spawns two CPU processes on a machine the test suite keeps busy: not held to the GPU budget
        timeout = max(20.0, st.left()) if suite.cuda else max(180.0, st.left())
        st.data["families"] = check_context_parallel_on(suite.device, st.check, timeout=timeout)
