"""rascompile: Region-Adaptive Sampling (RAS) for diffusion transformers, as a torch.compile backend.

pipe.transformer = torch.compile(pipe.transformer, backend="ras",
                                 options={"sample_ratio": 0.5, "num_inference_steps": 28})
# or
rascompile.apply(pipe, rascompile.RASConfig(sample_ratio=0.5))
"""

from __future__ import annotations

from torch._dynamo import list_backends, register_backend

from .api import apply
from .config import RASConfig
from .deploy.onnx_export import ExportError, export
from .deploy.onnx_runner import OnnxRunner
from .runtime.backend import RASBackend, RASGraph, ras_backend
from .runtime.controller import RASController

if "ras" not in list_backends(exclude_tags=()):
    register_backend(name="ras")(ras_backend)

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``rascompile.check(pipe, call_kwargs=...)``: the module rascompile/check.py, callable, imported on first use
    if name == "check":
        import importlib

        return importlib.import_module(f"{__name__}.check")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ExportError",
    "OnnxRunner",
    "RASBackend",
    "RASConfig",
    "RASController",
    "RASGraph",
    "apply",
    "check",
    "export",
    "ras_backend",
    "__version__",
]
