"""A small pass manager: runs ``(gm, ctx) -> gm`` passes in order, optionally dumping graphs.

Like torch-tensorrt's lowering pass manager: a dump directory (``ctx.settings.dump_dir`` or the
``RASCOMPILE_DUMP_GRAPHS`` environment variable) receives ``NN_<pass>.before.py`` and
``NN_<pass>.after.py`` with the graph's code around each pass, and a pass can be registered at an index or
before or after a named pass (``insert``), as its ``_aten_lowering_pass(index=...)`` does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.fx

from .context import PassContext

Pass = Callable[[torch.fx.GraphModule, PassContext], torch.fx.GraphModule]


def pass_name(fn: Pass) -> str:
    """A pass's name: its ``__name__`` (the name of its dump files)."""
    return getattr(fn, "__name__", repr(fn))


class PassManager:
    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)

    def __call__(self, gm: torch.fx.GraphModule, ctx: PassContext) -> torch.fx.GraphModule:
        dump_dir = ctx.settings.dump_dir or os.environ.get("RASCOMPILE_DUMP_GRAPHS")
        for i, fn in enumerate(self.passes):
            name = getattr(fn, "__name__", f"pass{i}")
            if dump_dir:
                _dump(gm, Path(dump_dir) / f"{i:02d}_{name}.before.py")
            gm = fn(gm, ctx)
            if dump_dir:
                _dump(gm, Path(dump_dir) / f"{i:02d}_{name}.after.py")
        return gm

    def index(self, name: str) -> int:
        """Where the pass named ``name`` runs; ValueError when there is none, or more than one."""
        found = [i for i, fn in enumerate(self.passes) if pass_name(fn) == name]
        if len(found) != 1:
            names = ", ".join(pass_name(fn) for fn in self.passes)
            what = "no pass" if not found else f"{len(found)} passes"
            raise ValueError(f"{what} named {name!r} in this pass manager ({names})")
        return found[0]

    def insert(
        self, fn: Pass, *, index: int | None = None, before: str | None = None, after: str | None = None
    ) -> Pass:
        """Register ``fn`` at ``index`` (as ``list.insert`` places it), or right before or after the pass named
        ``before`` / ``after``; exactly one of the three. Returns ``fn``."""
        given = [k for k, v in (("index", index), ("before", before), ("after", after)) if v is not None]
        if len(given) != 1:
            raise TypeError(f"insert takes exactly one of index, before and after, got {given or 'none'}")
        if before is not None:
            index = self.index(before)
        elif after is not None:
            index = self.index(after) + 1
        self.passes.insert(index, fn)
        return fn

    def remove(self, name: str) -> Pass:
        """Unregister the pass named ``name`` and return it."""
        return self.passes.pop(self.index(name))


def _dump(gm: torch.fx.GraphModule, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    gm.recompile()
    path.write_text(gm.code)
