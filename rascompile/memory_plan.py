"""``rascompile.plan``: the memory a RAS generation needs, worked out before the first step, without the weights.

The plan traces the transformer with Dynamo on the meta device (no weight and no activation is allocated), runs
the RAS passes on that graph, and reads every cache the rewritten graph takes from its ``StepSignature``: the
same shapes and dtypes the controller allocates, so on any model the plan's cache bytes are the bytes a
generation allocates. Beside them it gives the weights' bytes and an estimate of a dense step's activation peak
(the tensors the graph keeps live at once, in its order; attention kernels' own workspace aside), and whether it
all fits a budget (by default the free memory of the current CUDA device).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx

from .plan_inputs import BUILDERS, CallSize, transformer_call
from .runtime import memory


@dataclass(frozen=True)
class CacheEntry:
    """One cache of one guidance branch: ``kind`` "output", "key" or "value", and the attention it serves."""

    name: str
    kind: str
    attention: str
    shape: tuple[int, ...]
    dtype: str
    bytes: int


@dataclass(frozen=True)
class MemoryPlan:
    """What a generation at one size needs. ``cache_bytes`` covers every guidance branch (``branches`` cache
    sets of ``caches``); ``budget_bytes`` None means no budget was known (no CUDA device, none given)."""

    model: str
    num_tokens: int
    batch: int
    branches: int
    weights_bytes: int
    caches: tuple[CacheEntry, ...]
    activation_peak_bytes: int
    budget_bytes: int | None = None
    ras: bool = True
    reason: str | None = None  # why RAS does not apply to this graph (then there are no caches)
    size: dict = field(default_factory=dict)

    @property
    def cache_set_bytes(self) -> int:
        return sum(c.bytes for c in self.caches)

    @property
    def cache_bytes(self) -> int:
        return self.branches * self.cache_set_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.cache_bytes + self.activation_peak_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    def with_kv_cache_dtype(self, kv_cache_dtype: str) -> MemoryPlan:
        """This plan with its K/V caches stored as ``kv_cache_dtype`` (``"fp8_e4m3"``): each becomes a float8 cache
        of its shape and a float32 scale per row of its last dim, as the passes make them (no new trace)."""
        from rascompile.passes.ops import KV_CACHE_DTYPES

        dtype = KV_CACHE_DTYPES[kv_cache_dtype]
        if any(c.kind.endswith("_scale") for c in self.caches):
            return self  # stored so already
        entries = [c for c in self.caches if c.kind not in ("key", "value")]
        for c in (c for c in self.caches if c.kind in ("key", "value")):
            for kind, shape, kind_dtype in ((c.kind, c.shape, dtype), (f"{c.kind}_scale", (*c.shape[:-1], 1), None)):
                name = f"ras_kv_cache_{len(entries) - 1}"  # numbered as the passes number them
                entries.append(_entry_of(name, kind, c.attention, shape, kind_dtype or torch.float32))
        return dataclasses.replace(self, caches=tuple(entries))

    def to_dict(self) -> dict:
        out = asdict(self)
        out |= {"cache_set_bytes": self.cache_set_bytes, "cache_bytes": self.cache_bytes}
        return out | {"total_bytes": self.total_bytes, "fits": self.fits}

    def format(self) -> str:
        """The plan as a few lines and a table of the caches, for people."""
        gib = memory.gib
        size = ", ".join(f"{k} {v}" for k, v in self.size.items() if v is not None)
        lines = [
            f"{self.model} ({size}): {self.num_tokens} image tokens, batch {self.batch}, {self.branches} branch(es)"
        ]
        if not self.ras:
            lines.append(f"RAS does not apply to this graph ({self.reason}): no caches")
        lines += [
            f"weights            {gib(self.weights_bytes):>12}",
            f"caches             {gib(self.cache_bytes):>12}  ({self.branches} x {gib(self.cache_set_bytes)}: "
            f"1 output cache, {sum(c.kind in ('key', 'value') for c in self.caches)} K/V caches)",
            f"activations (est.) {gib(self.activation_peak_bytes):>12}",
            f"total              {gib(self.total_bytes):>12}",
        ]
        if self.budget_bytes is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"budget             {gib(self.budget_bytes):>12}  -> {verdict}")
        if self.caches:
            lines.append("")
            lines.append("| cache | kind | attention | shape | dtype | bytes |")
            lines.append("|---|---|---|---|---|---|")
            for c in self.caches:
                shape = "x".join(map(str, c.shape))
                lines.append(f"| {c.name} | {c.kind} | {c.attention or '-'} | {shape} | {c.dtype} | {c.bytes:,} |")
        return "\n".join(lines)


def plan(
    model: torch.nn.Module | str | Path,
    *,
    height: int,
    width: int,
    frames: int | None = None,
    batch: int = 1,
    branches: int | None = None,
    text_tokens: int | None = None,
    dtype: torch.dtype | None = None,
    call_kwargs: dict | None = None,
    budget_bytes: int | None = None,
    kv_cache_dtype: str | None = None,
) -> MemoryPlan:
    """The memory plan of ``model`` (a diffusers transformer on any device, or the directory of a pipeline or of a
    transformer, whose ``config.json`` alone is read) for a generation at ``height`` x ``width`` (x ``frames``),
    ``batch`` rows per transformer call and ``branches`` calls per step (one per guidance branch: 2 for pipelines
    that call the transformer per branch with guidance on; default: the family's, 1 for the others). ``dtype``:
    the weights' and activations' (default: the model's; bfloat16 for a directory). ``call_kwargs``: one
    transformer call's keyword arguments, for families ``rascompile.plan_inputs`` does not build.
    ``kv_cache_dtype``: as ``RASConfig.kv_cache_dtype`` (``"fp8_e4m3"``: float8 caches and their scales).

    Dynamo traces the model once here and its caches are reset afterwards, so a model compiled before compiles
    again at its next call."""
    model = _meta_model(model, dtype)
    dtype = next(model.parameters()).dtype
    size = CallSize(height, width, frames, batch, text_tokens, dtype)
    call = call_kwargs if call_kwargs is not None else transformer_call(model, size)
    per_branch = BUILDERS.get(type(model).__name__, (None, False))[1]
    branches = branches if branches is not None else (2 if per_branch else 1)
    gm = _dense_graph(model, call)
    caches, num_tokens, batch_size, reason = _caches(gm, kv_cache_dtype)
    if budget_bytes is None and torch.cuda.is_available():
        budget_bytes = memory.free_bytes(torch.device("cuda", torch.cuda.current_device()))
    return MemoryPlan(
        model=type(model).__name__,
        num_tokens=num_tokens,
        batch=batch_size or batch,
        branches=branches,
        weights_bytes=sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
        caches=caches,
        activation_peak_bytes=activation_peak_bytes(gm),
        budget_bytes=budget_bytes,
        ras=reason is None,
        reason=reason,
        size={"height": height, "width": width, "frames": frames, "dtype": str(dtype).removeprefix("torch.")},
    )


def _meta_model(model: torch.nn.Module | str | Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """``model`` rebuilt on the meta device from its config (a module already there is used as it is)."""
    if isinstance(model, (str, Path)):
        cls, config = _config_of(Path(model))
        dtype = dtype or torch.bfloat16
    else:
        model = getattr(model, "_orig_mod", model)
        if all(p.device.type == "meta" for p in model.parameters()):
            return model if dtype is None else torch.nn.Module.to(model, dtype)
        cls, config = type(model), dict(model.config)
        dtype = dtype or next(model.parameters()).dtype
    return build_on_meta(cls, config, dtype)


def build_on_meta(cls: type, config: dict, dtype: torch.dtype) -> torch.nn.Module:
    """A ``cls`` (a diffusers model class) of ``config`` on the meta device, in ``dtype``: shapes, no memory."""
    with torch.device("meta"):
        built = cls.from_config(config)
    return torch.nn.Module.to(built, dtype).eval()  # (ModelMixin.to warns about fp32 modules it would not keep)


def _config_of(path: Path) -> tuple[type, dict]:
    """The transformer class and config of a pipeline directory (its ``transformer/``) or a transformer's."""
    import diffusers

    for candidate in (path / "transformer" / "config.json", path / "config.json"):
        if candidate.is_file():
            config = json.loads(candidate.read_text())
            name = config.get("_class_name")
            cls = getattr(diffusers, str(name), None)
            if cls is None:
                raise ValueError(f"{candidate}: _class_name={name!r} is not a diffusers model class")
            return cls, config
    raise ValueError(f"{path} holds neither transformer/config.json (a pipeline) nor config.json (a transformer)")


def _dense_graph(model: torch.nn.Module, call: dict) -> torch.fx.GraphModule:
    from .capture import capture_graphs

    graphs = capture_graphs(model, lambda compiled: compiled(**call))
    if not graphs:
        raise ValueError(f"Dynamo captured no graph of {type(model).__name__}")
    return graphs[0][0]


def _caches(
    gm: torch.fx.GraphModule, kv_cache_dtype: str | None
) -> tuple[tuple[CacheEntry, ...], int, int, str | None]:
    """The caches the RAS graph of ``gm`` takes (one guidance branch), N, B, and why RAS does not apply (or
    None)."""
    from rascompile.passes.context import RewriteError
    from rascompile.passes.pipeline import build_ras_graph

    try:
        signature = build_ras_graph(gm, kv_cache_dtype=kv_cache_dtype).signature
    except RewriteError as exc:
        return (), 0, 0, str(exc)
    entries = [_entry(signature.output_cache, "output", "")]
    entries += [_entry(c, c.kind, c.attention) for c in signature.kv_caches]
    return tuple(entries), signature.num_tokens, signature.batch_size, None


def _entry(cache: Any, kind: str, attention: str) -> CacheEntry:
    return _entry_of(cache.name, kind, attention, cache.shape, cache.dtype)


def _entry_of(name: str, kind: str, attention: str, shape, dtype: torch.dtype) -> CacheEntry:
    shape = tuple(int(s) for s in shape)
    nbytes = memory.set_bytes((shape, dtype), ())
    return CacheEntry(name, kind, attention, shape, str(dtype).removeprefix("torch."), nbytes)


def activation_peak_bytes(gm: torch.fx.GraphModule) -> int:
    """The most bytes of tensors the graph's nodes keep live at once, run in graph order (inputs and parameters
    aside; a view shares its base's storage, counted once)."""
    nodes = list(gm.graph.nodes)
    last_use = {n: i for i, n in enumerate(nodes)}
    for i, node in enumerate(nodes):
        for used in node.all_input_nodes:
            last_use[used] = i
    storages: dict[int, list[int]] = {}  # storage -> [bytes, last index a node holding it is used]
    births: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        for tensor in _tensors(node.meta.get("example_value", node.meta.get("val"))):
            key = id(tensor.untyped_storage())
            if key not in storages:
                storages[key] = [tensor.untyped_storage().nbytes(), last_use[node]]
                births.setdefault(i, []).append(key)
            storages[key][1] = max(storages[key][1], last_use[node])
    deaths: dict[int, list[int]] = {}
    for key, (_, end) in storages.items():
        deaths.setdefault(end, []).append(key)
    live = peak = 0
    for i in range(len(nodes)):
        live += sum(storages[k][0] for k in births.get(i, ()))
        peak = max(peak, live)
        live -= sum(storages[k][0] for k in deaths.get(i, ()))
    return peak


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []
