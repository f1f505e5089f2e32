"""``rascompile.apply``: compile a diffusers pipeline's transformer with RAS."""

from __future__ import annotations

import warnings

from .config import RASConfig
from .runtime import parallel
from .runtime.backend import RASBackend
from .runtime.registry import APPLIED_BACKENDS
from .runtime.steps import scheduler_steps


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

    The transformer is compiled in place (``pipe.transformer.compile(backend=..., dynamic=False)``: one graph per
    resolution) and the pipeline is not modified otherwise: ``pipe.transformer`` stays the diffusers model, so the
    pipeline's LoRA methods, step caches and offloading hooks keep working on it. Its uncompiled forward stays
    ``pipe.transformer.forward``.
    Each call reads T from ``pipe.scheduler.timesteps`` and the step from ``pipe.scheduler.step_index``.

    ``inner_backend``, ``dump_graphs``, ``fused_kv_projection`` and ``mode`` (inductor's, as for
    ``torch.compile(mode=...)``) are as for ``RASBackend``.

    Under diffusers' Ulysses context parallelism (``transformer.enable_parallelism``) every rank runs RAS on its
    slice of the active tokens; the parallel modes RAS does not support (ring attention, ``ulysses_anything``)
    leave the transformer uncompiled, running dense, with a warning.

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
    # Compiled in place, ``pipe.transformer`` stays the diffusers model: the pipeline's LoRA methods
    # (``set_adapters``, ``load_lora_weights``, hotswapping), ``enable_cache`` and the offloading hooks, which
    # ``enable_model_cpu_offload`` re-installs after every call, keep working, and a hook stays in the compiled call.
    unsupported = parallel.unsupported_reason(transformer)
    if unsupported is not None:  # the same on every rank: its configuration decides
        warnings.warn(
            f"rascompile: RAS is off for this transformer: {unsupported}; it runs dense, uncompiled", stacklevel=2
        )
        return backend
    parallel.prepare_for_compile(transformer)  # diffusers' context-parallel hooks traced without a graph break
    transformer.compile(backend=backend, dynamic=False)
    APPLIED_BACKENDS.add(backend)
    return backend
