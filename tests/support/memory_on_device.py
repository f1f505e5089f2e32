"""The cache memory of a RAS generation on an accelerator, for the GPU suite's ``memory`` stage: the plan against
the allocator's own count, release back to the baseline, float8 caches, and the free-memory check.

Each check is reported through ``check(name, passed, detail)``. On the CPU (the suite's dry run) the allocator
has no count, so the caches are counted from the controller's tensors instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

import rascompile
from rascompile import RASConfig, apply
from rascompile.runtime import memory
from tests.support.capture import transformer_call_kwargs
from tests.support.models import flux_call_kwargs, tiny_flux_pipeline

STEPS = 8


def _allocated(device: str, control=None) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return control.cache_bytes if control is not None else 0


def _pipeline(device: str, **config) -> tuple:
    pipe = tiny_flux_pipeline()
    pipe.transformer.to(device)
    backend = apply(pipe, RASConfig(sample_ratio=0.5, **config), inner_backend="aot_eager")
    kwargs = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in flux_call_kwargs(1, steps=STEPS, true_cfg=True).items()
    }
    return pipe, backend, kwargs


def _generate(pipe, backend, kwargs) -> tuple:
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        pipe(**kwargs)
    (control,) = backend.controllers_of(pipe.transformer)
    return control, [str(w.message) for w in caught if "rascompile" in str(w.message)]


def check_cache_memory_on(device: str, check: Callable[[str, bool, str], bool]) -> None:
    on_cuda = device.startswith("cuda")
    for dtype in (None, "fp8_e4m3"):
        label = dtype or "model dtype"
        pipe, backend, kwargs = _pipeline(device, keep_caches=True, kv_cache_dtype=dtype)
        _generate(pipe, backend, kwargs)  # compiles; the scheduler's tensors land on the device
        rascompile.release(pipe.transformer)
        baseline = _allocated(device)
        control, messages = _generate(pipe, backend, kwargs)
        held = _allocated(device, control) - baseline
        planned = rascompile.plan(
            pipe.transformer, height=kwargs["height"], width=kwargs["width"], branches=2, kv_cache_dtype=dtype,
            call_kwargs=_first_call_on_meta(pipe, kwargs),
        )  # fmt: skip
        check(
            f"kept caches ({label}) = rascompile.plan",
            held == planned.cache_bytes == control.cache_bytes and not messages,
            f"allocator {held} B, plan {planned.cache_bytes} B, controller {control.cache_bytes} B, {messages}",
        )
        freed = rascompile.release(pipe.transformer)
        after = _allocated(device, control)
        check(
            f"rascompile.release ({label}) returns to the baseline",
            freed == planned.cache_bytes and after == baseline,
            f"freed {freed} B; allocated {after} B after, {baseline} B before the generation",
        )
    pipe, backend, kwargs = _pipeline(device)
    _generate(pipe, backend, kwargs)
    baseline = _allocated(device)
    control, _ = _generate(pipe, backend, kwargs)
    after = _allocated(device, control)
    check(
        "caches freed after the last RAS step (keep_caches=False)",
        control.cache_bytes == 0 and control.cache_peak_bytes > 0 and (after == baseline or not on_cuda),
        f"controller holds {control.cache_bytes} B (peak {control.cache_peak_bytes} B); allocated {after} B after, "
        f"{baseline} B before the generation",
    )
    free = memory.free_bytes(torch.device(device))
    if on_cuda:
        driver_free, _ = torch.cuda.mem_get_info()
        check("free-memory check reads the device", free is not None and free >= driver_free, f"{free} B free")
    else:
        check("no free-memory check off CUDA", free is None, f"{free}")


def _first_call_on_meta(pipe, kwargs: dict) -> dict:
    """The pipeline's first transformer call, read with Dynamo off (the transformer is compiled in place)."""
    with torch._dynamo.config.patch(disable=True):
        call = transformer_call_kwargs(pipe, {**kwargs, "num_inference_steps": 1})
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in call.items()}
