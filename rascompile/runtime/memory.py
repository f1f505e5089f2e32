"""The caches' memory: the cache sets a controller holds (``CacheSet``), their bytes, and whether a generation's
caches fit the device, checked before they are allocated.

RAS holds, per guidance branch, an output cache and one K/V cache per cached attention: at video sizes they can
outgrow the GPU. The controller asks here before a generation's first step allocates them; when they do not fit,
the generation runs dense with a warning that gives the figures and what would make them fit, instead of an
out-of-memory error halfway through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .controller import GraphLayout


def free_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take: the driver's free memory plus what PyTorch's caching
    allocator holds without using it. None off CUDA (the host's memory is not checked)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def set_bytes(output_cache: tuple, kv_caches: tuple) -> int:
    """Bytes of one cache set: ``output_cache`` and each of ``kv_caches`` given as ``(shape, dtype)``."""
    return sum(_numel(shape) * dtype.itemsize for shape, dtype in (output_cache, *kv_caches))


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def gib(num_bytes: int) -> str:
    """``num_bytes`` for people: GiB with one decimal above 1 GiB, MiB below."""
    if num_bytes >= 1 << 30:
        return f"{num_bytes / (1 << 30):.1f} GiB"
    return f"{num_bytes / (1 << 20):.1f} MiB"


def too_big_reason(
    need: int, free: int, sets: int, num_tokens: int, device: torch.device, kv_cache_dtype: str | None = None
) -> str:
    """The warning of a generation whose caches do not fit: the bytes needed and free, and what would fit."""
    options = [] if kv_cache_dtype else ["kv_cache_dtype='fp8_e4m3' (float8 K/V caches: about half the bytes)"]
    options += [
        "fewer frames or a lower resolution (the caches grow with the image tokens)",
        "free memory held elsewhere (rascompile.release() for transformers not in use, "
        "pipe.enable_model_cpu_offload() for the text encoders and the VAE)",
    ]
    return (
        f"the RAS caches of this generation need {gib(need)} ({sets} guidance branch(es), {num_tokens} image "
        f"tokens) but {device} has {gib(free)} free: it runs dense. To make them fit: {'; '.join(options)}. "
        "rascompile.plan(...) gives the figures before a run"
    )


@dataclass
class CacheSet:
    """One guidance branch's caches for one graph (or piece): the output cache and the K/V caches, with the shapes
    and dtypes they were allocated for."""

    shapes: tuple
    output: torch.Tensor
    kv: list[torch.Tensor]
    filled: bool = False  # whether a step over all tokens has written every row since allocation

    @classmethod
    def allocate(cls, layout: GraphLayout, device: torch.device) -> CacheSet:
        shape, dtype = layout.output_cache
        kv = [torch.empty(s, dtype=d, device=device) for s, d in layout.kv_caches]
        return cls(cache_shapes(layout), torch.empty(shape, dtype=dtype, device=device), kv)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.output, *self.kv))


def cache_shapes(layout: GraphLayout) -> tuple:
    """What a ``CacheSet`` was allocated for: the output cache's and the K/V caches' shapes and dtypes."""
    return (layout.output_cache, layout.kv_caches)
