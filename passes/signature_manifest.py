"""The step-graph fields of an export manifest, checked and read: the one validator behind
``StepSignature.from_manifest`` and ``rascompile.deploy.manifest.validate_manifest`` (which checks the rest).

Fields: ``inputs``, ``latents``, ``timestep``, ``batch_size``, ``num_tokens``, ``patch_size``, ``latent_hw``,
``output_cache``, ``kv_caches``. Each is checked for its type, its range (bounds that keep a runner's allocations
sane: a manifest is untrusted data) and its consistency with the others (batch size, token count, latents and cache
shapes). An error names the field, its value and what is allowed.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import torch

from .rules.latent_layout import LatentLayout

# Bounds on what a manifest may ask a runner to allocate.
MAX_BATCH_SIZE = 4096
MAX_NUM_TOKENS = 1 << 20
MAX_PATCH_SIZE = 64
MAX_DIM = 1 << 24
MAX_RANK = 8
MAX_TENSOR_ELEMENTS = 1 << 32
MAX_CACHE_ELEMENTS = 1 << 36  # all caches together (256 GiB of float32)
MAX_INPUTS = 256
MAX_KV_CACHES = 4096
MAX_STRING = 10_000

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
RUNTIME_DTYPES = (*FLOAT_DTYPES, "int64", "int32", "int16", "int8", "uint8", "bool")
RESERVED_NAMES = ("ras_active_idx", "return_dict")

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
MODULE_PATH = re.compile(r"[A-Za-z0-9_.]{0,1000}")


def show(value: Any) -> str:
    """A manifest value as an error message shows it: JSON-like, cut short when long."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float, str)):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError, RecursionError):
            text = f"a deeply nested {type_name(value)}"
    if len(text) <= 120:
        return text
    size = f" of {len(value)} entries" if isinstance(value, (list, dict)) else f" of {len(text)} characters"
    return f"{text[:100]}... (a {type_name(value)}{size})"


def type_name(value: Any) -> str:
    return {dict: "JSON object", list: "JSON array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


class FieldChecker:
    """Checks manifest fields, raising ``error`` that names the field: ``"<where>: field 'x' is ...; rule"`` (or
    ``"manifest field 'x' ..."`` without ``where``)."""

    def __init__(self, where: str = "", error: type[Exception] = ValueError):
        self.where, self.error = where, error

    def _head(self) -> str:
        return f"{self.where}: field" if self.where else "manifest field"

    def fail(self, field: str, value: Any, rule: str):
        raise self.error(f"{self._head()} {field!r} is {show(value)}; {rule}")

    def raise_(self, message: str):
        raise self.error(f"{self.where}: {message}" if self.where else f"manifest: {message}")

    def get(self, record: dict, key: str, prefix: str = "") -> Any:
        if key not in record:
            raise self.error(f"{self._head()} {prefix + key!r} is missing")
        return record[key]

    def record(self, value: Any, field: str, keys: tuple[str, ...]) -> dict:
        if not isinstance(value, dict):
            self.fail(field, value, f"must be a JSON object with fields {', '.join(keys)}")
        for key in keys:
            self.get(value, key, f"{field}.")
        extra = sorted(set(value) - set(keys))
        if extra:
            unknown, allowed = ", ".join(map(repr, extra)), ", ".join(keys)
            self.raise_(f"field {field!r} has unknown field(s) {unknown}; allowed: {allowed}")
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
        return self.string(value, field, IDENTIFIER, "an identifier (letters, digits and '_', at most 200)")

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


class Names:
    """The names a manifest defines (inputs, caches, baked inputs), each once; the field that defines it."""

    def __init__(self, check: FieldChecker):
        self.check, self.fields = check, {}

    def define(self, name: str, field: str) -> None:
        if name in self.fields:
            self.check.raise_(f"field {field!r} is {name!r}, the same name as field {self.fields[name]!r}")
        if name in RESERVED_NAMES:
            self.check.fail(field, name, f"{name!r} is reserved")
        self.fields[name] = field


def read_step_graph(manifest: Any, check: FieldChecker, names: Names | None = None) -> dict:
    """The ``StepSignature`` fields of ``manifest`` (its keyword arguments), every step-graph field checked.
    ``names`` collects the names the fields define (the deploy code adds the baked inputs')."""
    from .signature import ACTIVE_IDX, CacheInput, KVCacheInput, ModelInput

    if not isinstance(manifest, dict):
        check.raise_(f"the manifest is a {type_name(manifest)}; must be a JSON object")
    names = names if names is not None else Names(check)
    inputs = _inputs(manifest, check, names)
    by_name = {r["name"]: r for r in inputs}
    latents_name = check.string(check.get(manifest, "latents"), "latents")
    if latents_name not in by_name:
        check.fail("latents", latents_name, f"must be the name of an input (field 'inputs' names {', '.join(by_name)})")
    timestep = check.get(manifest, "timestep")
    if timestep is not None and (not isinstance(timestep, str) or timestep not in by_name or timestep == latents_name):
        check.fail(
            "timestep",
            timestep,
            f"must be null or the name of an input other than the latents (field 'inputs' names {', '.join(by_name)})",
        )
    batch, tokens, patch, hw = _sizes(manifest, check, inputs, by_name[latents_name])
    if timestep is not None:
        record = by_name[timestep]
        if record["shape"] not in ([], [1], [batch]) or record["dtype"] == "bool":
            check.fail(
                f"inputs[{inputs.index(record)}].shape",
                record["shape"],
                f"the timestep (field 'timestep' is {timestep!r}) must be a number or a [1] or [B] tensor with "
                f"B = field 'batch_size' ({batch})",
            )
    cache, kv = _caches(manifest, check, names, batch, tokens)
    order = [r["name"] for r in inputs]
    latents = by_name[latents_name]
    return dict(
        inputs=tuple(
            ModelInput(r["name"], r["placeholder"], tuple(r["shape"]), getattr(torch, r["dtype"])) for r in inputs
        ),
        latents=order.index(latents_name),
        timestep=None if timestep is None else order.index(timestep),
        active_idx=ACTIVE_IDX,
        output_cache=CacheInput(cache["name"], tuple(cache["shape"]), getattr(torch, cache["dtype"])),
        kv_caches=tuple(
            KVCacheInput(r["name"], tuple(r["shape"]), getattr(torch, r["dtype"]), r["attention"], r["kind"])
            for r in kv
        ),
        batch_size=batch,
        num_tokens=tokens,
        patch_size=patch,
        latent_hw=tuple(hw),
        latent_kind="image",
        latent=LatentLayout("image", tuple(latents["shape"]), 1, (2, 3), (patch, patch)),
    )


def _inputs(manifest: dict, check: FieldChecker, names: Names) -> list:
    inputs = check.array(check.get(manifest, "inputs"), "inputs", 1, MAX_INPUTS)
    for i, record in enumerate(inputs):
        field = f"inputs[{i}]"
        check.record(record, field, ("name", "placeholder", "shape", "dtype"))
        names.define(check.identifier(record["name"], f"{field}.name"), f"{field}.name")
        check.identifier(record["placeholder"], f"{field}.placeholder")
        check.shape(record["shape"], f"{field}.shape")
        check.choice(record["dtype"], f"{field}.dtype", RUNTIME_DTYPES)
    return inputs


def _sizes(manifest: dict, check: FieldChecker, inputs: list, latents: dict) -> tuple[int, int, int, list]:
    batch = check.integer(check.get(manifest, "batch_size"), "batch_size", 1, MAX_BATCH_SIZE)
    tokens = check.integer(check.get(manifest, "num_tokens"), "num_tokens", 1, MAX_NUM_TOKENS)
    patch = check.integer(check.get(manifest, "patch_size"), "patch_size", 1, MAX_PATCH_SIZE)
    hw = check.array(check.get(manifest, "latent_hw"), "latent_hw", 2, 2)
    for i, side in enumerate(hw):
        check.integer(side, f"latent_hw[{i}]", 1, MAX_DIM)
    field = f"inputs[{inputs.index(latents)}]"
    if len(latents["shape"]) != 4 or latents["dtype"] not in FLOAT_DTYPES:
        check.fail(
            f"{field}.shape",
            latents["shape"],
            f"the latents (field 'latents' is {latents['name']!r}) must be a 4-D [B, C, H, W] floating-point tensor "
            f"(dtype {latents['dtype']})",
        )
    if latents["shape"][0] != batch:
        check.fail("batch_size", batch, f"must equal B = {latents['shape'][0]} of the latents (field '{field}.shape')")
    if list(latents["shape"][2:]) != hw:
        check.fail("latent_hw", hw, f"must equal [H, W] = {latents['shape'][2:]} of field '{field}.shape'")
    if hw[0] % patch or hw[1] % patch:
        check.fail("patch_size", patch, f"must divide the latent height and width (field 'latent_hw' is {hw})")
    if tokens != (hw[0] // patch) * (hw[1] // patch):
        check.fail(
            "num_tokens",
            tokens,
            f"must equal (H / p) * (W / p) = {(hw[0] // patch) * (hw[1] // patch)} for field 'latent_hw' {hw} and "
            f"field 'patch_size' {patch}",
        )
    return batch, tokens, patch, hw


def _caches(manifest: dict, check: FieldChecker, names: Names, batch: int, tokens: int) -> tuple[dict, list]:
    cache = check.record(check.get(manifest, "output_cache"), "output_cache", ("name", "shape", "dtype"))
    names.define(check.identifier(cache["name"], "output_cache.name"), "output_cache.name")
    check.shape(cache["shape"], "output_cache.shape", (3, 3))
    check.choice(cache["dtype"], "output_cache.dtype", FLOAT_DTYPES)
    if cache["shape"][:2] != [batch, tokens]:
        check.fail(
            "output_cache.shape",
            cache["shape"],
            f"must be [B, N, C] with B = field 'batch_size' ({batch}) and N = field 'num_tokens' ({tokens})",
        )
    total = math.prod(cache["shape"])
    kv = check.array(check.get(manifest, "kv_caches"), "kv_caches", 0, MAX_KV_CACHES)
    for i, record in enumerate(kv):
        field = f"kv_caches[{i}]"
        check.record(record, field, ("name", "shape", "dtype", "attention", "kind"))
        names.define(check.identifier(record["name"], f"{field}.name"), f"{field}.name")
        check.shape(record["shape"], f"{field}.shape", (2, MAX_RANK))
        check.choice(record["dtype"], f"{field}.dtype", FLOAT_DTYPES)
        what = "a module path (letters, digits, '_', '.')"
        check.string(record["attention"], f"{field}.attention", MODULE_PATH, what)
        check.choice(record["kind"], f"{field}.kind", ("key", "value"))
        if record["shape"][0] != batch:
            check.fail(f"{field}.shape", record["shape"], f"must start with B = field 'batch_size' ({batch})")
        if math.prod(record["shape"][1:]) < tokens:
            check.fail(
                f"{field}.shape",
                record["shape"],
                f"is too small to hold field 'num_tokens' ({tokens}) image tokens per batch row",
            )
        total += math.prod(record["shape"])
    if total > MAX_CACHE_ELEMENTS:
        check.raise_(
            f"fields 'output_cache' and 'kv_caches' describe caches of {total} elements in all; "
            f"at most {MAX_CACHE_ELEMENTS} are allowed"
        )
    return cache, kv
