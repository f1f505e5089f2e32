"""``rascompile_export.json``: reading, checking and writing the manifest of an export directory.

An export directory is data, not code: nothing in it is unpickled or executed unless the caller
says it trusts the directory (``TorchTensorRTRunner(..., trust=True)``). Before anything in it is
opened:

- the manifest must be a regular file of at most ``MAX_MANIFEST_BYTES``, hold strict JSON (no
  duplicate keys, no NaN) and pass ``validate_manifest``: every field, its type and its range, and
  the sizes consistent with each other (batch size, token count, latents and cache shapes), with
  bounds that keep a runner's allocations sane;
- every file it names must be a plain file name, resolve (symlinks followed) to a regular file
  inside the directory, be checked with ``os.stat`` before it is opened (so a FIFO or a device is
  never opened), and match the SHA-256 checksum the manifest records for it;
- the ONNX graphs' own inputs and outputs (names, dtypes, static shapes) must match the manifest
  (``check_onnx_graph``), and data the graphs keep in external files is held to the same rules.

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

MANIFEST = "rascompile_export.json"
FORMAT = 2  # format 1 (rascompile before checksums) is refused: export again
RUNTIMES = ("onnx", "torch-tensorrt")
GRAPHS = ("dense", "ras")
ACTIVE_IDX = "ras_active_idx"

# Bounds on what a manifest may ask a runner to allocate or read.
MAX_MANIFEST_BYTES = 16 << 20
MAX_BATCH_SIZE = 4096
MAX_NUM_TOKENS = 1 << 20
MAX_PATCH_SIZE = 64
MAX_DIM = 1 << 24
MAX_RANK = 8
MAX_TENSOR_ELEMENTS = 1 << 32
MAX_CACHE_ELEMENTS = 1 << 36  # all caches together (256 GiB of float32)
MAX_INPUTS = 256
MAX_OUTPUTS = 64
MAX_KV_CACHES = 4096
MAX_LOG_LINES = 100_000
MAX_STRING = 10_000
MAX_FILES = 1024
ONNX_OPSETS = (7, 99)  # a manifest's opset must be in this range and equal to the ONNX files' own

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
RUNTIME_DTYPES = (*FLOAT_DTYPES, "int64", "int32", "int16", "int8", "uint8", "bool")
BAKED_DTYPES = SIGNATURE_DTYPES  # every dtype a step signature may name: the runtime ones and complex
ONNX_ELEM_TYPES = {  # onnx.TensorProto data types
    "float32": 1,
    "uint8": 2,
    "int8": 3,
    "int16": 5,
    "int32": 6,
    "int64": 7,
    "bool": 9,
    "float16": 10,
    "float64": 11,
    "bfloat16": 16,
}

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_MODULE_PATH = re.compile(r"[A-Za-z0-9_.]{0,1000}")
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
            f"{where(directory)}: field {field!r} is {_show(name)}; must be the name of a file in the export "
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


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float, str)):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError, RecursionError):
            text = f"a deeply nested {_type_name(value)}"
    if len(text) <= 120:
        return text
    size = f" of {len(value)} entries" if isinstance(value, (list, dict)) else f" of {len(text)} characters"
    return f"{text[:100]}... (a {_type_name(value)}{size})"


def _type_name(value: Any) -> str:
    return {dict: "JSON object", list: "JSON array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, value: Any, rule: str):
        raise ManifestError(f"{self.where}: field {field!r} is {_show(value)}; {rule}")

    def get(self, record: dict, key: str, prefix: str = "") -> Any:
        if key not in record:
            raise ManifestError(f"{self.where}: field {prefix + key!r} is missing")
        return record[key]

    def record(self, value: Any, field: str, keys: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            self.fail(field, value, f"must be a JSON object with fields {', '.join(keys)}")
        for key in keys:
            self.get(value, key, f"{field}.")
        extra = sorted(set(value) - set(keys))
        if extra:
            raise ManifestError(
                f"{self.where}: field {field!r} has unknown field(s) {', '.join(map(repr, extra))}; "
                f"allowed: {', '.join(keys)}"
            )
        return value

    def integer(self, value: Any, field: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(field, value, f"must be an integer from {low} to {high}")
        return value

    def string(self, value: Any, field: str, pattern: re.Pattern | None = None, what: str = "a string") -> str:
        if not isinstance(value, str) or len(value) > MAX_STRING or (pattern and not pattern.fullmatch(value)):
            self.fail(field, value, f"must be {what}")
        return value

    def identifier(self, value: Any, field: str) -> str:
        return self.string(value, field, _IDENTIFIER, "an identifier (letters, digits and '_', at most 200)")

    def choice(self, value: Any, field: str, choices: tuple) -> Any:
        if not isinstance(value, str) or value not in choices:
            self.fail(field, value, f"must be one of {', '.join(map(repr, choices))}")
        return value

    def array(self, value: Any, field: str, low: int, high: int) -> list:
        if not isinstance(value, list) or not low <= len(value) <= high:
            self.fail(field, value, f"must be a JSON array of {low} to {high} entries")
        return value

    def shape(self, value: Any, field: str, rank: tuple[int, int] = (0, MAX_RANK)) -> list[int]:
        self.array(value, field, *rank)
        for i, dim in enumerate(value):
            self.integer(dim, f"{field}[{i}]", 1, MAX_DIM)
        if math.prod(value) > MAX_TENSOR_ELEMENTS:
            self.fail(field, value, f"must have at most {MAX_TENSOR_ELEMENTS} elements (it has {math.prod(value)})")
        return value

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
        raise ManifestError(f"{origin}: the file holds a {_type_name(manifest)}; must be a JSON object")
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

    # ------------------------------------------------------------------ inputs and outputs
    names: dict[str, str] = {}  # name -> field that defines it

    def define(name: str, field: str) -> None:
        if name in names:
            raise ManifestError(f"{origin}: field {field!r} is {name!r}, the same name as field {names[name]!r}")
        if name in (ACTIVE_IDX, "return_dict"):
            c.fail(field, name, f"{name!r} is reserved")
        names[name] = field

    inputs = c.array(manifest["inputs"], "inputs", 1, MAX_INPUTS)
    for i, record in enumerate(inputs):
        field = f"inputs[{i}]"
        c.record(record, field, ("name", "placeholder", "shape", "dtype"))
        define(c.identifier(record["name"], f"{field}.name"), f"{field}.name")
        c.identifier(record["placeholder"], f"{field}.placeholder")
        c.shape(record["shape"], f"{field}.shape")
        c.choice(record["dtype"], f"{field}.dtype", RUNTIME_DTYPES)
    baked = c.array(manifest["baked_inputs"], "baked_inputs", 0, MAX_INPUTS)
    for i, record in enumerate(baked):
        field = f"baked_inputs[{i}]"
        c.record(record, field, ("name", "placeholder", "shape", "dtype", "checksum"))
        define(c.identifier(record["name"], f"{field}.name"), f"{field}.name")
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

    by_name = {r["name"]: r for r in inputs}
    latents_name = c.string(manifest["latents"], "latents")
    if latents_name not in by_name:
        c.fail("latents", latents_name, f"must be the name of an input (field 'inputs' names {', '.join(by_name)})")
    timestep = manifest["timestep"]
    if timestep is not None and (not isinstance(timestep, str) or timestep not in by_name or timestep == latents_name):
        c.fail(
            "timestep",
            timestep,
            f"must be null or the name of an input other than the latents (field 'inputs' names {', '.join(by_name)})",
        )

    # ------------------------------------------------------------------ sizes and their consistency
    batch = c.integer(manifest["batch_size"], "batch_size", 1, MAX_BATCH_SIZE)
    tokens = c.integer(manifest["num_tokens"], "num_tokens", 1, MAX_NUM_TOKENS)
    patch = c.integer(manifest["patch_size"], "patch_size", 1, MAX_PATCH_SIZE)
    hw = c.array(manifest["latent_hw"], "latent_hw", 2, 2)
    for i, side in enumerate(hw):
        c.integer(side, f"latent_hw[{i}]", 1, MAX_DIM)
    latents = by_name[latents_name]
    latents_field = f"inputs[{inputs.index(latents)}]"
    if len(latents["shape"]) != 4 or latents["dtype"] not in FLOAT_DTYPES:
        c.fail(
            f"{latents_field}.shape",
            latents["shape"],
            f"the latents (field 'latents' is {latents_name!r}) must be a 4-D [B, C, H, W] floating-point tensor "
            f"(dtype {latents['dtype']})",
        )
    if latents["shape"][0] != batch:
        c.fail(
            "batch_size", batch, f"must equal B = {latents['shape'][0]} of the latents (field '{latents_field}.shape')"
        )
    if list(latents["shape"][2:]) != hw:
        c.fail("latent_hw", hw, f"must equal [H, W] = {latents['shape'][2:]} of field '{latents_field}.shape'")
    if hw[0] % patch or hw[1] % patch:
        c.fail("patch_size", patch, f"must divide the latent height and width (field 'latent_hw' is {hw})")
    if tokens != (hw[0] // patch) * (hw[1] // patch):
        c.fail(
            "num_tokens",
            tokens,
            f"must equal (H / p) * (W / p) = {(hw[0] // patch) * (hw[1] // patch)} for field 'latent_hw' {hw} and "
            f"field 'patch_size' {patch}",
        )

    if timestep is not None:
        record = by_name[timestep]
        if record["shape"] not in ([], [1], [batch]) or record["dtype"] == "bool":
            c.fail(
                f"inputs[{inputs.index(record)}].shape",
                record["shape"],
                f"the timestep (field 'timestep' is {timestep!r}) must be a number or a [1] or [B] tensor with "
                f"B = field 'batch_size' ({batch})",
            )

    # ------------------------------------------------------------------ caches
    cache = c.record(manifest["output_cache"], "output_cache", ("name", "shape", "dtype"))
    define(c.identifier(cache["name"], "output_cache.name"), "output_cache.name")
    c.shape(cache["shape"], "output_cache.shape", (3, 3))
    c.choice(cache["dtype"], "output_cache.dtype", FLOAT_DTYPES)
    if cache["shape"][:2] != [batch, tokens]:
        c.fail(
            "output_cache.shape",
            cache["shape"],
            f"must be [B, N, C] with B = field 'batch_size' ({batch}) and N = field 'num_tokens' ({tokens})",
        )
    total = math.prod(cache["shape"])
    kv = c.array(manifest["kv_caches"], "kv_caches", 0, MAX_KV_CACHES)
    for i, record in enumerate(kv):
        field = f"kv_caches[{i}]"
        c.record(record, field, ("name", "shape", "dtype", "attention", "kind"))
        define(c.identifier(record["name"], f"{field}.name"), f"{field}.name")
        c.shape(record["shape"], f"{field}.shape", (2, MAX_RANK))
        c.choice(record["dtype"], f"{field}.dtype", FLOAT_DTYPES)
        c.string(record["attention"], f"{field}.attention", _MODULE_PATH, "a module path (letters, digits, '_', '.')")
        c.choice(record["kind"], f"{field}.kind", ("key", "value"))
        if record["shape"][0] != batch:
            c.fail(f"{field}.shape", record["shape"], f"must start with B = field 'batch_size' ({batch})")
        if math.prod(record["shape"][1:]) < tokens:
            c.fail(
                f"{field}.shape",
                record["shape"],
                f"is too small to hold field 'num_tokens' ({tokens}) image tokens per batch row",
            )
        total += math.prod(record["shape"])
    if total > MAX_CACHE_ELEMENTS:
        raise ManifestError(
            f"{origin}: fields 'output_cache' and 'kv_caches' describe caches of {total} elements in all; "
            f"at most {MAX_CACHE_ELEMENTS} are allowed"
        )
    for field, record in [("output_cache", cache)] + [(f"kv_caches[{i}]", r) for i, r in enumerate(kv)]:
        updated = f"{record['name']}_out"
        if updated in names or updated in outputs:
            taken = f"field {names[updated]!r}" if updated in names else "field 'outputs'"
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


# ---------------------------------------------------------------------------------------------- ONNX graphs


def onnx_opset(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def external_data_files(model) -> list[str]:
    """The ``location`` of every tensor the model keeps in an external file (subgraphs included)."""
    locations: list[str] = []

    def tensors(graph):
        yield from graph.initializer
        yield from (s.values for s in graph.sparse_initializer)
        yield from (s.indices for s in graph.sparse_initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    yield from tensors(attribute.g)
                for sub in attribute.graphs:
                    yield from tensors(sub)

    for tensor in tensors(model.graph):
        if tensor.data_location == 1:  # TensorProto.EXTERNAL
            entries = {e.key: e.value for e in tensor.external_data}
            locations.append(entries.get("location", ""))
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.HasField("t") and attribute.t.data_location == 1:
                    locations.append({e.key: e.value for e in attribute.t.external_data}.get("location", ""))
    return sorted(set(locations))


def signature_of(directory: str | Path, manifest: dict):
    """The ``StepSignature`` of the exported RAS graph, from a manifest ``load_manifest`` checked (a
    ``ManifestError`` naming the field if it cannot be read)."""
    try:
        return StepSignature.from_manifest(manifest)
    except SignatureError as exc:
        raise ManifestError(f"{where(directory)}: {exc}") from None


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_onnx_graph(directory: str | Path, manifest: dict, graph: str, model) -> None:
    """The ONNX model ``graph`` ("dense" or "ras") against the manifest: opset, input and output names
    in order, dtypes and static shapes."""
    name = manifest[graph]
    prefix = f"{where(directory)}: {name}"
    opset = onnx_opset(model)
    if opset != manifest["opset"]:
        raise ManifestError(f"{where(directory)}: field 'opset' is {manifest['opset']}; {name} has opset {opset}")
    signature = signature_of(directory, manifest)
    # (name, shape, dtype, the manifest field that says so) of each input and output, in the signature's order
    expected_inputs = [(r["name"], r["shape"], r["dtype"], f"inputs[{i}]") for i, r in enumerate(manifest["inputs"])]
    outputs = [(o, None, None, f"outputs[{i}]") for i, o in enumerate(manifest["outputs"])]
    if graph == "ras":
        cache_fields = ["output_cache", *(f"kv_caches[{i}]" for i in range(len(signature.kv_caches)))]
        caches = [
            (c.name, list(c.shape), _dtype_name(c.dtype), field) for c, field in zip(signature.caches, cache_fields)
        ]
        active_idx = (signature.active_idx, [signature.batch_size, None], "int64", "batch_size")
        expected_inputs = list(signature.bind(expected_inputs, active_idx, caches[0], caches[1:]))
        updated = [(name, *rest) for name, (_, *rest) in zip(signature.updated_cache_names, caches)]
        outputs += updated
    caches = ", 'output_cache' and 'kv_caches'" if graph == "ras" else ""
    actual_inputs, actual_outputs = list(model.graph.input), list(model.graph.output)
    if [i.name for i in actual_inputs] != [e[0] for e in expected_inputs]:
        got = ", ".join(i.name for i in actual_inputs)
        want = ", ".join(e[0] for e in expected_inputs)
        raise ManifestError(f"{prefix} takes the inputs ({got}); the manifest's fields 'inputs'{caches} say ({want})")
    if [o.name for o in actual_outputs] != [e[0] for e in outputs]:
        got = ", ".join(o.name for o in actual_outputs)
        want = ", ".join(e[0] for e in outputs)
        raise ManifestError(f"{prefix} has the outputs ({got}); the manifest's fields 'outputs'{caches} say ({want})")
    kinds = ["input"] * len(actual_inputs) + ["output"] * len(actual_outputs)
    for kind, value, (tensor_name, shape, dtype, field) in zip(
        kinds, actual_inputs + actual_outputs, expected_inputs + outputs
    ):
        tensor_type = value.type.tensor_type
        if dtype is not None and tensor_type.elem_type != ONNX_ELEM_TYPES[dtype]:
            raise ManifestError(
                f"{prefix}'s {kind} {tensor_name!r} has ONNX element type {tensor_type.elem_type}; field "
                f"{field!r} says {dtype} (ONNX type {ONNX_ELEM_TYPES[dtype]})"
            )
        if shape is None:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if len(dims) != len(shape) or any(a is not None and b is not None and a != b for a, b in zip(dims, shape)):
            shown = [d if d is not None else "?" for d in dims]
            raise ManifestError(
                f"{prefix}'s {kind} {tensor_name!r} has shape {shown}; field {field!r} says "
                f"{[d if d is not None else 'k' for d in shape]}"
            )
