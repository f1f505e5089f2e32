"""``rascompile_export.json``: reading, checking and writing the manifest of an export directory.

An export directory is data, not code: nothing in it is unpickled or executed unless the caller
says it trusts the directory (``TorchTensorRTRunner(..., trust=True)``). Before anything in it is
opened:

- the manifest must be a regular file of at most ``MAX_MANIFEST_BYTES``, hold strict JSON (no
  duplicate keys, no NaN) and pass ``validate_manifest``: every field, its type and its range, and
  the sizes consistent with each other (batch size, token count, latents and cache shapes), with
  bounds that keep a runner's allocations sane (the step-graph fields by ``StepSignature``'s own validator,
  ``rascompile.passes.signature_manifest``);
- every file it names must be a plain file name, resolve (symlinks followed) to a regular file
  inside the directory, be checked with ``os.stat`` before it is opened (so a FIFO or a device is
  never opened), and match the SHA-256 checksum the manifest records for it;
- the ONNX graphs' own inputs and outputs (names, dtypes, static shapes) must match the manifest
  (``onnx_graphs.check_onnx_graph``), and data the graphs keep in external files is held to the same rules.

Every error is a ``ManifestError`` (a ``ValueError``) that names the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from rascompile.passes.signature import DTYPES as SIGNATURE_DTYPES
from rascompile.passes.signature import SignatureError, StepSignature
from rascompile.passes.signature_manifest import MAX_INPUTS, FieldChecker, Names, read_step_graph, show, type_name

MANIFEST = "rascompile_export.json"
FORMAT = 2  # format 1 (rascompile before checksums) is refused: export again
RUNTIMES = ("onnx", "torch-tensorrt")
GRAPHS = ("dense", "ras")
ACTIVE_IDX = "ras_active_idx"

# Bounds on what a manifest may ask a runner to read (the step-graph fields' own: passes/signature_manifest.py).
MAX_MANIFEST_BYTES = 16 << 20
MAX_OUTPUTS = 64
MAX_LOG_LINES = 100_000
MAX_FILES = 1024
ONNX_OPSETS = (7, 99)  # a manifest's opset must be in this range and equal to the ONNX files' own

BAKED_DTYPES = SIGNATURE_DTYPES  # every dtype a step signature may name: the runtime ones and complex

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")


class ManifestError(ValueError):
    """``rascompile_export.json`` or a file it names is malformed, inconsistent or unsafe to open."""


class UntrustedExportError(ValueError):
    """Loading the directory would unpickle files from it, and the caller did not pass ``trust=True``."""


def where(directory: str | Path) -> str:
    return f"{MANIFEST} in {directory}"


# ---------------------------------------------------------------------------------------------- files


def confined_file(directory: str | Path, name: Any, field: str | None) -> tuple[Path, os.stat_result]:
    """``directory / name`` resolved and checked: inside ``directory`` and a regular file (``os.stat``,
    so nothing is opened). ``field`` is the manifest field that names the file (None: the manifest
    itself). Returns the resolved path and its stat."""
    directory = Path(directory)
    subject = f"field {field!r} names {name!r}, which" if field else "the manifest"
    if field and (not isinstance(name, str) or not _FILE_NAME.fullmatch(name) or name in (".", "..")):
        raise ManifestError(
            f"{where(directory)}: field {field!r} is {show(name)}; must be the name of a file in the export "
            "directory (letters, digits, '_', '.', '+', '-'; no paths)"
        )
    root = directory.resolve()
    try:
        path = (root / name).resolve(strict=True)
    except FileNotFoundError:
        raise ManifestError(f"{where(directory)}: {subject} does not exist") from None
    except (OSError, RuntimeError) as exc:  # symlink loops and the like
        raise ManifestError(f"{where(directory)}: {subject} cannot be resolved: {exc}") from None
    if not path.is_relative_to(root):
        raise ManifestError(
            f"{where(directory)}: {subject} resolves to {path}, outside the export directory; every file of an "
            "export must lie inside it"
        )
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ManifestError(f"{where(directory)}: {subject} is a {_file_kind(info.st_mode)}, not a regular file")
    return path, info


def read_regular_file(path: Path, info: os.stat_result, limit: int | None = None) -> bytes:
    """The bytes of ``path``, which ``confined_file`` checked: opened without following a symlink and
    without blocking, and checked again to be the same regular file once open."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            raise ManifestError(f"{path} changed while it was being opened; not reading it")
        if limit is not None and now.st_size > limit:
            raise ManifestError(f"{path} is {now.st_size} bytes; at most {limit} are allowed")
        chunks = []
        while chunk := os.read(fd, 1 << 24):
            chunks.append(chunk)
            if limit is not None and sum(map(len, chunks)) > limit:
                raise ManifestError(f"{path} is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_verified(directory: str | Path, manifest: dict, name: str, field: str) -> bytes:
    """The bytes of the file ``name`` the manifest's ``field`` names, checked to lie inside
    ``directory``, to be a regular file, and to match its SHA-256 in the manifest."""
    path, info = confined_file(directory, name, field)
    data = read_regular_file(path, info)
    check_sha256(directory, manifest, name, hashlib.sha256(data).hexdigest())
    return data


def verify_file(directory: str | Path, manifest: dict, name: str, field: str) -> Path:
    """Like ``read_verified``, for files handed on by path (data hashed in chunks, not kept)."""
    path, info = confined_file(directory, name, field)
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
            raise ManifestError(f"{path} changed while it was being opened; not reading it")
        while chunk := os.read(fd, 1 << 24):
            digest.update(chunk)
    finally:
        os.close(fd)
    check_sha256(directory, manifest, name, digest.hexdigest())
    return path


def check_sha256(directory: str | Path, manifest: dict, name: str, digest: str) -> None:
    expected = manifest["sha256"].get(name)
    if expected is None:
        raise ManifestError(
            f"{where(directory)}: field 'sha256' has no checksum for {name!r}; every file of an export must have "
            "one (export again)"
        )
    if digest != expected:
        raise ManifestError(
            f"{where(directory)}: {name} does not match field 'sha256.{name}' (SHA-256 {digest}, the manifest "
            f"records {expected}): the file changed after export or belongs to another export; export again"
        )


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(directory: str | Path) -> dict:
    """The checked manifest of an export directory (see the module docstring)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} does not exist: export the model first (rascompile export)")
    file, info = confined_file(directory, MANIFEST, None)
    data = read_regular_file(file, info, limit=MAX_MANIFEST_BYTES)
    try:
        text = data.decode("utf-8")
        parsed = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where(directory)}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where(directory)}: not valid JSON: {exc}") from None
    except _JSONValueError as exc:
        raise ManifestError(f"{where(directory)}: {exc}") from None
    except RecursionError:
        raise ManifestError(f"{where(directory)}: JSON nested too deeply") from None
    return validate_manifest(parsed, where(directory))


def write_manifest(directory: str | Path, manifest: dict) -> Path:
    """Write ``manifest`` (checked first) into ``directory`` atomically: a temporary file, then a rename."""
    directory = Path(directory)
    validate_manifest(manifest, where(directory))
    path = directory / MANIFEST
    temporary = directory / f".{MANIFEST}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, path)
    return path


class _JSONValueError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _JSONValueError(f"field {key!r} appears twice in one object")
        result[key] = value
    return result


def _no_constants(name: str):
    raise _JSONValueError(f"{name} is not a JSON number; the manifest holds finite numbers only")


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return kind
    return "special file"


# ---------------------------------------------------------------------------------------------- schema


class _Checker(FieldChecker):
    """The step-graph validator's checks, raising ``ManifestError``, and the export's file names."""

    def __init__(self, where: str):
        super().__init__(where, ManifestError)

    def file_name(self, value: Any, field: str, suffix: str, why: str = "") -> str:
        if (
            not isinstance(value, str)
            or not _FILE_NAME.fullmatch(value)
            or value in (".", "..")
            or not value.endswith(suffix)
        ):
            self.fail(
                field,
                value,
                f"must be the name of a{' ' + suffix if suffix else ''} file in the export directory{why} "
                "(letters, digits, '_', '.', '+', '-'; no paths)",
            )
        return value


TOP_LEVEL = (
    "format",
    "torch",
    "runtime",
    "inputs",
    "baked_inputs",
    "outputs",
    "latents",
    "timestep",
    "batch_size",
    "num_tokens",
    "patch_size",
    "latent_hw",
    "output_cache",
    "kv_caches",
    "rewrite",
    "opset",
    "dense",
    "ras",
    "engines",
    "sha256",
)
OPTIONAL = ("runtime", "opset", "engines")


def validate_manifest(manifest: Any, origin: str) -> dict:
    """Check every field of a manifest and the consistency of its sizes; return it. ``origin`` starts
    every error message (``rascompile_export.json in <directory>``)."""
    c = _Checker(origin)
    if not isinstance(manifest, dict):
        raise ManifestError(f"{origin}: the file holds a {type_name(manifest)}; must be a JSON object")
    fmt = c.get(manifest, "format")
    if fmt == 1 and not isinstance(fmt, bool):
        raise ManifestError(
            f"{origin}: field 'format' is 1: the directory was written by an older rascompile, which recorded no "
            "SHA-256 checksums of its files; loading checks them now, so export the model again "
            "(rascompile.export or `rascompile export`)"
        )
    c.integer(fmt, "format", FORMAT, FORMAT)
    extra = sorted(set(manifest) - set(TOP_LEVEL))
    if extra:
        raise ManifestError(
            f"{origin}: unknown field(s) {', '.join(map(repr, extra))}; a format {FORMAT} manifest has "
            f"{', '.join(TOP_LEVEL)}"
        )
    for key in TOP_LEVEL:
        if key not in OPTIONAL:
            c.get(manifest, key)
    c.string(manifest["torch"], "torch")
    runtime = c.choice(manifest.get("runtime", "onnx"), "runtime", RUNTIMES)

    # ------------------------------------------------------------------ the step graphs (inputs, sizes, caches)
    names = Names(c)
    read_step_graph(manifest, c, names)
    baked = c.array(manifest["baked_inputs"], "baked_inputs", 0, MAX_INPUTS)
    for i, record in enumerate(baked):
        field = f"baked_inputs[{i}]"
        c.record(record, field, ("name", "placeholder", "shape", "dtype", "checksum"))
        names.define(c.identifier(record["name"], f"{field}.name"), f"{field}.name")
        c.identifier(record["placeholder"], f"{field}.placeholder")
        c.shape(record["shape"], f"{field}.shape")
        c.choice(record["dtype"], f"{field}.dtype", BAKED_DTYPES)
        checksum = record["checksum"]
        if (
            not isinstance(checksum, list)
            or len(checksum) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in checksum)
        ):
            c.fail(f"{field}.checksum", checksum, "must be a JSON array of two finite numbers (sum, sum of |x|)")
    outputs = c.array(manifest["outputs"], "outputs", 1, MAX_OUTPUTS)
    for i, name in enumerate(outputs):
        c.identifier(name, f"outputs[{i}]")
    if len(set(outputs)) != len(outputs):
        c.fail("outputs", outputs, "must not name an output twice")
    caches = [("output_cache", manifest["output_cache"])]
    caches += [(f"kv_caches[{i}]", r) for i, r in enumerate(manifest["kv_caches"])]
    for field, record in caches:
        updated = f"{record['name']}_out"
        if updated in names.fields or updated in outputs:
            taken = f"field {names.fields[updated]!r}" if updated in names.fields else "field 'outputs'"
            c.fail(f"{field}.name", record["name"], f"{updated!r}, the name of its updated copy, is taken by {taken}")

    rewrite = c.array(manifest["rewrite"], "rewrite", 0, MAX_LOG_LINES)
    for i, line in enumerate(rewrite):
        c.string(line, f"rewrite[{i}]")

    # ------------------------------------------------------------------ files
    suffix = ".onnx" if runtime == "onnx" else ".ep"
    why = f" (field 'runtime' is {runtime!r})"
    files = [(g, c.file_name(manifest[g], g, suffix, why)) for g in GRAPHS]
    if manifest["dense"] == manifest["ras"]:
        c.fail("ras", manifest["ras"], "must name another file than field 'dense'")
    if runtime == "onnx":
        c.integer(c.get(manifest, "opset"), "opset", *ONNX_OPSETS)  # and it must be the files' opset
    elif "opset" in manifest:
        c.fail("opset", manifest["opset"], "must be absent for runtime 'torch-tensorrt' (no ONNX files)")
    if "engines" in manifest:
        if runtime != "onnx":
            c.fail("engines", manifest["engines"], "must be absent for runtime 'torch-tensorrt'")
        engines = c.record(manifest["engines"], "engines", GRAPHS)
        for graph in GRAPHS:
            files.append((f"engines.{graph}", c.file_name(engines[graph], f"engines.{graph}", ".engine")))
        if engines["dense"] == engines["ras"]:
            c.fail("engines.ras", engines["ras"], "must name another file than field 'engines.dense'")
    sums = manifest["sha256"]
    if not isinstance(sums, dict) or not 1 <= len(sums) <= MAX_FILES:
        c.fail("sha256", sums, f"must be a JSON object of 1 to {MAX_FILES} file names and their SHA-256 checksums")
    for name, digest in sums.items():
        c.file_name(name, f"sha256 (the key {name!r})", "")
        if name == MANIFEST:
            c.fail("sha256", name, "must not list the manifest itself")
        c.string(digest, f"sha256.{name}", _SHA256, "a SHA-256 checksum (64 lowercase hex digits)")
    for field, name in files:
        if name not in sums:
            raise ManifestError(
                f"{origin}: field {field!r} names {name!r}, which has no checksum in field 'sha256'; every file "
                "of an export must have one"
            )
    return manifest


def signature_of(directory: str | Path, manifest: dict):
    """The ``StepSignature`` of the exported RAS graph, from a manifest ``load_manifest`` checked (a
    ``ManifestError`` naming the field if it cannot be read)."""
    try:
        return StepSignature.from_manifest(manifest)
    except SignatureError as exc:
        raise ManifestError(f"{where(directory)}: {exc}") from None
