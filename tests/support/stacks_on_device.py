"""The offloading and LoRA stacks of ``tests/support/stacks.py`` on an accelerator, for the GPU suite's ``stacks``
stage: there the hooks move weights between the CPU and the device, which CPU-to-CPU tests cannot show.

Each case runs the tiny Flux pipeline through ``rascompile.apply`` and reports checks through ``check(name,
passed, detail)``: RAS kept (RAS steps, no rascompile warning, the image equal to RAS without the stack) or dense
with a warning that names the stack (the image equal to the stack without rascompile). On the CPU (the suite's dry
run) the cases that cannot run there are reported as skipped through ``skip(what, why)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from rascompile import RASConfig, apply
from tests.support.models import flux_call_kwargs, tiny_flux_pipeline
from tests.support.stacks import _lora, _sequential_cpu_offload

STEPS = 8
CONFIG = RASConfig(sample_ratio=0.5)


def _generate(pipe, device: str) -> tuple[torch.Tensor, list[str]]:
    kwargs = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in flux_call_kwargs(1, steps=STEPS).items()
    }
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = pipe(**kwargs)[0]
    return out.float().cpu(), [str(w.message) for w in caught if "rascompile" in str(w.message)]


def _ras_steps(backend, pipe) -> int:
    return sum(d.kind == "ras" for c in backend.controllers_of(pipe.transformer) for d in c.history)


def _offload_cases(device: str) -> dict[str, tuple[Callable, bool, str]]:
    """name -> (install the stack on a pipeline, RAS kept, what a dense warning must name)."""
    cpu = torch.device("cpu")

    def model_offload(pipe):
        pipe.enable_model_cpu_offload(device=device)

    def sequential(pipe):
        if device == "cpu":
            _sequential_cpu_offload(pipe)  # accelerate cannot offload CPU to CPU through the pipeline's call
        else:
            pipe.enable_sequential_cpu_offload(device=device)

    def group(pipe):
        pipe.transformer.enable_group_offload(
            onload_device=torch.device(device), offload_device=cpu, offload_type="block_level", num_blocks_per_group=1
        )

    return {
        "enable_model_cpu_offload": (model_offload, True, ""),
        "enable_sequential_cpu_offload": (sequential, False, "enable_sequential_cpu_offload"),
        "enable_group_offload (block level)": (group, False, "group offloading (enable_group_offload)"),
    }


def check_stacks_on(device: str, inner_backend: str, check: Callable, tolerance: float) -> None:
    """Every case on ``device``; ``check(name, passed, detail)`` records each result."""
    plain = tiny_flux_pipeline().to(device)
    apply(plain, CONFIG, inner_backend=inner_backend)
    ras_plain, _ = _generate(plain, device)
    for name, (install, keeps_ras, says) in _offload_cases(device).items():
        # every case compiles Flux's forward again: keep Dynamo's per-function recompile limit out of the way
        torch._dynamo.reset()
        pipe = tiny_flux_pipeline()
        install(pipe)
        if not keeps_ras:
            reference = tiny_flux_pipeline()
            install(reference)
            expected, _ = _generate(reference, device)
        backend = apply(pipe, CONFIG, inner_backend=inner_backend)
        outs = [_generate(pipe, device) for _ in range(2)]
        (out, messages), (again, _) = outs
        steps = _ras_steps(backend, pipe)
        if keeps_ras:
            error = (out - ras_plain).abs().max().item()
            passed = steps > 0 and not messages and error <= tolerance and torch.equal(out, again)
            check(f"{name}: RAS kept", passed, f"{steps} RAS steps, {len(messages)} warnings, max error {error:.2e}")
        else:
            error = (out - expected).abs().max().item()
            named = any(says in m for m in messages)
            passed = steps == 0 and named and error <= tolerance
            check(f"{name}: dense, said", passed, f"warning names it: {named}, max error vs eager {error:.2e}")
    _check_lora(device, inner_backend, check, tolerance)


def _check_lora(device: str, inner_backend: str, check: Callable, tolerance: float) -> None:
    """A new adapter weight after compiling keeps RAS on the device and equals a fresh compile of that state."""
    torch._dynamo.reset()
    pipe = tiny_flux_pipeline()
    _lora(pipe)
    pipe.to(device)
    backend = apply(pipe, CONFIG, inner_backend=inner_backend)
    _generate(pipe, device)
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    out, messages = _generate(pipe, device)
    fresh = tiny_flux_pipeline()
    _lora(fresh)
    fresh.set_adapters(["style"], adapter_weights=[0.5])
    fresh.to(device)
    apply(fresh, CONFIG, inner_backend=inner_backend)
    expected, _ = _generate(fresh, device)
    error = (out - expected).abs().max().item()
    steps = _ras_steps(backend, pipe)
    check(
        "peft LoRA, set_adapters after compiling: RAS kept",
        steps > 0 and not messages and error <= tolerance,
        f"{steps} RAS steps, {len(messages)} warnings, max error vs a fresh compile {error:.2e}",
    )
