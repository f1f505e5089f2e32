"""A small pass manager: runs ``(gm, ctx) -> gm`` passes in order, optionally dumping graphs.

Like torch-tensorrt's lowering pass manager: a dump directory (``ctx.settings.dump_dir`` or the
``RASCOMPILE_DUMP_GRAPHS`` environment variable) receives ``NN_<pass>.before.py`` and
``NN_<pass>.after.py`` with the graph's code around each pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.fx

from .context import PassContext

Pass = Callable[[torch.fx.GraphModule, PassContext], torch.fx.GraphModule]


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


def _dump(gm: torch.fx.GraphModule, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    gm.recompile()
    path.write_text(gm.code)
