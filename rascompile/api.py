"""``rascompile.apply``: compile a diffusers pipeline's transformer with RAS."""

from __future__ import annotations

import torch

from .config import RASConfig
from .runtime.backend import RASBackend, scheduler_steps


def apply(
    pipe,
    config: RASConfig | None = None,
    *,
    inner_backend: str = "inductor",
    dump_graphs=None,
    fused_kv_projection: bool | None = None,
    mode: str | None = None,
) -> RASBackend:
    """Compile ``pipe.transformer`` with the RAS backend, reading the step count from each pipeline call.

    The pipeline is not modified otherwise: its transformer attribute becomes the
    ``torch.compile``-d transformer (``dynamic=False``: one graph per resolution), as when users
    compile it themselves; with ``enable_model_cpu_offload`` on, the transformer is compiled in place
    (``transformer.compile``), since the pipeline re-installs its offloading hooks after every call.
    Each call reads T from ``pipe.scheduler.timesteps`` and the step from ``pipe.scheduler.step_index``.

    ``inner_backend``, ``dump_graphs``, ``fused_kv_projection`` and ``mode`` (inductor's, as for
    ``torch.compile(mode=...)``) are as for ``RASBackend``.

    Returns the backend, whose ``compile_count`` and ``graphs`` (with their controllers)
    can be inspected.
    """
    config = config if config is not None else RASConfig()
    if not isinstance(config, RASConfig):
        raise TypeError(f"config must be a RASConfig, got {type(config).__name__}")
    scheduler = getattr(pipe, "scheduler", None)
    transformer = getattr(pipe, "transformer", None)
    if scheduler is None or transformer is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer and scheduler; RAS needs a DiT pipeline")
    backend = RASBackend(
        config,
        inner_backend=inner_backend,
        steps_factory=scheduler_steps(scheduler, config.num_inference_steps),
        dump_graphs=dump_graphs,
        fused_kv_projection=fused_kv_projection,
        mode=mode,
    )
    if getattr(pipe, "_all_hooks", None):
        # enable_model_cpu_offload re-installs its hooks on every component after each call; a torch.compile wrapper
        # would then sit outside the hooked forward and drop out of the call path. Compiled in place, the module's
        # own call is compiled, hooks included.
        transformer.compile(backend=backend, dynamic=False)
    else:
        pipe.transformer = torch.compile(transformer, backend=backend, dynamic=False)
    return backend
