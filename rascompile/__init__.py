"""rascompile: Region-Adaptive Sampling (RAS) for diffusion transformers, as a torch.compile backend.

pipe.transformer = torch.compile(pipe.transformer, backend="ras",
                                 options={"sample_ratio": 0.5, "num_inference_steps": 28})
# or
rascompile.apply(pipe, rascompile.RASConfig(sample_ratio=0.5))

The core install (torch, diffusers) is all the compile path needs. ``export``, ``OnnxRunner`` and
``ExportError`` (the ``onnx`` extra), ``check`` and ``plan`` are imported on first use. The internals stay in their
modules: ``rascompile.runtime.backend`` (``RASGraph``, ``ras_backend``), ``rascompile.runtime.controller``
(``RASController``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from torch._dynamo import list_backends, register_backend

from .api import apply
from .config import RASConfig
from .runtime.backend import RASBackend, ras_backend
from .runtime.registry import release, status

if TYPE_CHECKING:  # imported lazily by __getattr__
    from .deploy.onnx_export import ExportError, export
    from .deploy.onnx_runner import OnnxRunner
    from .memory_plan import plan

if "ras" not in list_backends(exclude_tags=()):
    register_backend(name="ras")(ras_backend)
del ras_backend  # registered; the function itself is rascompile.runtime.backend.ras_backend

__version__ = "0.1.0"

#: lazily imported attributes: name -> module holding it
_LAZY = {
    "export": ".deploy.onnx_export",
    "ExportError": ".deploy.onnx_export",
    "OnnxRunner": ".deploy.onnx_runner",
    "plan": ".memory_plan",
}


def __getattr__(name: str) -> Any:
    # ``rascompile.check(pipe, call_kwargs=...)``: the module rascompile/check.py, callable, imported on first use
    if name == "check":
        return importlib.import_module(f"{__name__}.check")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ExportError",
    "OnnxRunner",
    "RASBackend",
    "RASConfig",
    "apply",
    "check",
    "export",
    "plan",
    "release",
    "status",
    "__version__",
]
