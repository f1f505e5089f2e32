"""The backends that compiled transformers in this process, and the module-level API over them.

``backend="ras"`` compiles share one ``RASBackend`` per options (``_SHARED_BACKENDS``), ``rascompile.apply`` makes one
per call (``APPLIED_BACKENDS``); ``status``, ``release`` and ``controllers_of`` ask every one of them about a module.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .backend import RASBackend
    from .controller import RASController


def status(module: torch.nn.Module) -> str:
    """``RASBackend.status`` for ``module`` over every ``backend="ras"`` compile and ``rascompile.apply`` that saw
    it."""
    reports = [b.status(module) for b in _backends()]
    reports = [r for r in reports if r != "no graph compiled yet"]
    return "\n".join(reports) if reports else "no graph of this module compiled by backend='ras' yet"


def release(module: torch.nn.Module | None = None) -> int:
    """Free the RAS caches held for ``module`` (a transformer compiled with ``backend="ras"`` or by
    ``rascompile.apply``; every such transformer when None) now; returns the bytes freed. Caches are freed after
    each generation anyway unless ``RASConfig.keep_caches``; this also frees those of a generation stopped midway."""
    return sum(b.release(module) for b in _backends())


def controllers_of(module: torch.nn.Module) -> list[RASController]:
    """The controllers that ran ``module`` through ``torch.compile(..., backend="ras")`` or ``rascompile.apply``
    (see ``RASBackend.controllers_of``)."""
    return [c for backend in _backends() for c in backend.controllers_of(module)]


def _backends() -> list[RASBackend]:
    return list(_SHARED_BACKENDS.values()) + list(APPLIED_BACKENDS)


# The backends of ``backend="ras"`` compiles, by their options. Weak: an entry lives as long as Dynamo keeps a
# graph of that backend; the per-generation state lives in the graphs' controllers.
_SHARED_BACKENDS: weakref.WeakValueDictionary[str, RASBackend] = weakref.WeakValueDictionary()
# The backends of ``rascompile.apply`` (one per call; its compiled transformer keeps it alive), for ``status``.
APPLIED_BACKENDS: weakref.WeakSet[RASBackend] = weakref.WeakSet()
