"""Where an export is written: the target directory checked before any work (``check_output_path``), and the
files staged in a sibling directory that replaces the target only when everything is written (``staged_directory``),
so an export that fails midway leaves the previous one intact."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from rascompile.passes.export.lowering import ExportError

from .manifest import GRAPHS, MANIFEST

# Files an earlier export may hold besides those its manifest names (engines and programs written by
# rascompile.deploy.tensorrt); a directory holding anything else is not replaced.
EXPORT_FILES = (MANIFEST, *(f"{g}.{ext}" for g in GRAPHS for ext in ("onnx", "engine", "ep")))


def output_path(directory: str | Path) -> Path:
    """The absolute output directory, symlinks resolved (an export replaces the directory a link points to)."""
    return Path(directory).expanduser().resolve()


def check_output_path(target: Path) -> None:
    """Raise ExportError unless ``target`` is missing, an empty directory or an earlier rascompile export."""
    if not os.path.lexists(target):
        return
    info = os.stat(target)
    if not stat.S_ISDIR(info.st_mode):
        kind = "regular file" if stat.S_ISREG(info.st_mode) else "special file"
        raise ExportError(
            f"the output path {target} exists and is a {kind}, not a directory; refusing to replace it: "
            "choose another output directory or remove it"
        )
    entries = sorted(os.listdir(target))
    if not entries:
        return
    if MANIFEST not in entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ExportError(
            f"the output directory {target} is not empty ({shown}) and holds no {MANIFEST}, so it is not an "
            "earlier rascompile export; refusing to replace it: choose another output directory or empty it"
        )
    known = set(EXPORT_FILES) | _named_by_manifest(target / MANIFEST)
    foreign = [e for e in entries if e not in known or not (target / e).is_file()]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ExportError(
            f"the output directory {target} holds an earlier rascompile export and also {shown}, which are not "
            "part of it; refusing to replace it: choose another output directory or move them away"
        )


def _named_by_manifest(path: Path) -> set[str]:
    """The file names an earlier (possibly older or broken) manifest names; nothing if it is unreadable."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) or os.stat(path).st_size > (16 << 20):
            return set()
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(data, dict):
        return set()
    names = [data.get(g) for g in GRAPHS]
    engines = data.get("engines")
    names += [engines.get(g) for g in GRAPHS] if isinstance(engines, dict) else []
    names += list(data["sha256"]) if isinstance(data.get("sha256"), dict) else []
    return {n for n in names if isinstance(n, str) and "/" not in n and "\\" not in n and n not in (".", "..")}


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A fresh directory next to ``target`` (same filesystem) to write an export into. When the block
    ends normally it replaces ``target`` (checked again with ``check_output_path``); when it raises, it
    is removed and ``target`` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = _sibling(target, "new")
    os.mkdir(stage)
    published = False
    try:
        yield stage
        check_output_path(target)
        backup = None
        if os.path.lexists(target):
            backup = _sibling(target, "old")
            os.rename(target, backup)
        try:
            os.rename(stage, target)
        except OSError as exc:
            if backup is not None:
                os.rename(backup, target)
            raise ExportError(f"cannot move the finished export into {target}: {exc}") from exc
        published = True
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if not published:
            shutil.rmtree(stage, ignore_errors=True)


def _sibling(target: Path, tag: str) -> Path:
    while True:
        path = target.parent / f".{target.name}.rascompile-{tag}-{secrets.token_hex(4)}"
        if not os.path.lexists(path):
            return path
