"""The ``RASBackend``'s own options (beside ``RASConfig``'s): the inner backend, inductor's mode, the graph dump
directory and the fused K/V projection; checked when the backend is made."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

INNER_BACKENDS = ("inductor", "aot_eager", "eager")
BACKEND_OPTIONS = ("inner_backend", "mode", "dump_graphs", "fused_kv_projection")


def checked_mode(mode: Any, inner_backend: str) -> str | None:
    """``mode`` as ``torch.compile`` takes it for inductor: None, or one of ``torch._inductor.list_mode_options()``."""
    if mode is None:
        return None
    from torch._inductor import list_mode_options

    modes = sorted(list_mode_options())
    if not isinstance(mode, str) or mode not in modes:
        raise ValueError(f"mode={mode!r} is invalid: must be None or one of {', '.join(modes)}")
    if inner_backend != "inductor" and mode != "default":
        raise ValueError(
            f"mode={mode!r} is invalid with inner_backend={inner_backend!r}: modes are inductor settings; "
            "use inner_backend='inductor' or leave mode unset"
        )
    return mode


def checked_dump_dir(dump_graphs: Any) -> str | None:
    """``dump_graphs`` as a directory path that exists and is writable, checked when the backend is made."""
    if dump_graphs is None:
        return None
    if isinstance(dump_graphs, bool) or not isinstance(dump_graphs, (str, os.PathLike)):
        raise TypeError(
            f"dump_graphs={dump_graphs!r} is invalid: must be None or a directory path (str or os.PathLike), "
            f"got {type(dump_graphs).__name__}"
        )
    path = Path(dump_graphs)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"dump_graphs={str(path)!r} is invalid: cannot create the directory ({exc})") from exc
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"dump_graphs={str(path)!r} is invalid: not a writable directory")
    return str(path)
