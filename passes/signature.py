"""The contract between the RAS passes and everything that runs their graph: ``StepSignature``.

A RAS step graph takes the model's own inputs, then the inputs the passes added, in this order:

    *model inputs, active_idx [B, k], output cache [B, N, C_out], *K/V caches (one per cached key or value)

``StepSignature`` says so once: the model's inputs by name (with the latents and timestep among them), the
added inputs by name, the caches' shapes and dtypes (each K/V cache with its attention layer and whether it
holds keys or values), the token count N, the batch size, the patch size and the latent layout. The backend,
the controller, the export and the runners read it instead of rebuilding the order by hand:

- ``step_signature(gm_or_names, ctx)`` builds it from the pass context of ``build_ras_graph``;
- ``bind(model_args, active_idx, output_cache, kv_caches)`` is the RAS graph's positional argument list, and
  ``feeds(...)`` the same by name (for exported graphs);
- ``to_manifest()`` / ``from_manifest()`` are the fields an export's ``rascompile_export.json`` holds about the
  step graphs (``inputs``, ``latents``, ``timestep``, ``batch_size``, ``num_tokens``, ``patch_size``,
  ``latent_hw``, ``output_cache``, ``kv_caches``); the deploy code adds the rest (files, checksums, opset).

A signature describes one graph: the Dynamo graph's (every placeholder, parameters included, named as in the
graph) or an exported graph's (the runtime inputs only, named as the call's keywords; ``with_inputs``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from .rules.latent_layout import KINDS, LatentLayout

# The active-token input of an exported RAS graph (the export manifest has no field for it).
ACTIVE_IDX = "ras_active_idx"
# dtypes a signature written into a manifest may name
DTYPES = (
    "float32",
    "float16",
    "bfloat16",
    "float64",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
)
MANIFEST_FIELDS = (
    "inputs",
    "latents",
    "timestep",
    "batch_size",
    "num_tokens",
    "patch_size",
    "latent_hw",
    "output_cache",
    "kv_caches",
)


class SignatureError(ValueError):
    """A step signature cannot be built or read: the message names the field."""


@dataclass(frozen=True)
class ModelInput:
    """One of the model's own inputs of a step graph."""

    name: str  # the graph's name for it: the placeholder (Dynamo graph) or the call's keyword (exported graph)
    placeholder: str  # the Dynamo graph's placeholder it comes from
    shape: tuple[int, ...] | None = None  # None: not known (built from names only)
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class CacheInput:
    """The output cache: every token's last output ``[B, N, C_out]``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class KVCacheInput(CacheInput):
    """One cached key or value tensor of one attention layer (its token axis has all N image tokens)."""

    attention: str = ""  # module path of the attention layer
    kind: str = "key"  # "key" or "value"


@dataclass(frozen=True)
class StepSignature:
    """The inputs of one RAS step graph, in order, and what the runtime needs to know to drive it."""

    inputs: tuple[ModelInput, ...]
    latents: int  # position of the latents among ``inputs``
    timestep: int | None  # position of the timestep among ``inputs``; None when the graph has none
    active_idx: str
    output_cache: CacheInput
    kv_caches: tuple[KVCacheInput, ...]
    batch_size: int
    num_tokens: int  # N
    patch_size: int
    latent_hw: tuple[int, int]
    latent_kind: str = "image"  # "image" [B, C, H, W], "video" or "packed" [B, N, C]
    latent: LatentLayout | None = None  # which latent elements make up each token
    # latents passed as a list of per-row tensors (Z-Image): their positions among ``inputs``, in batch order
    # (``latents`` is the first); stacked along a new batch axis they are the latents ``latent`` describes
    latents_rows: tuple[int, ...] = ()
    # under Ulysses context parallelism of degree P the active list's length is a multiple of P (each rank takes
    # a slice of it): ``pad_active`` repeats its last index
    token_multiple: int = 1
    parallel_group: str | None = None  # the process group's name under context parallelism

    def pad_active(self, active_idx):
        """``active_idx`` [B, k] with its last index repeated up to a multiple of ``token_multiple``."""
        short = -active_idx.shape[1] % self.token_multiple
        if not short:
            return active_idx
        return torch.cat([active_idx, active_idx[:, -1:].expand(-1, short)], dim=1)

    def __post_init__(self):
        if not 0 <= self.latents < len(self.inputs):
            raise SignatureError(f"latents={self.latents} is not the position of one of {len(self.inputs)} inputs")
        if self.latents_rows and (
            self.latents_rows[0] != self.latents or not all(0 <= r < len(self.inputs) for r in self.latents_rows)
        ):
            raise SignatureError(
                f"latents_rows={self.latents_rows} must be positions among the {len(self.inputs)} inputs, starting "
                f"with latents={self.latents}"
            )
        if self.timestep is not None and not 0 <= self.timestep < len(self.inputs):
            raise SignatureError(f"timestep={self.timestep} is not the position of one of {len(self.inputs)} inputs")
        if self.latent_kind not in KINDS:
            raise SignatureError(f"latent_kind={self.latent_kind!r} is invalid: must be one of {', '.join(KINDS)}")

    # ------------------------------------------------------------------ names

    @property
    def input_names(self) -> tuple[str, ...]:
        """The model's inputs, in order."""
        return tuple(i.name for i in self.inputs)

    @property
    def latents_name(self) -> str:
        return self.inputs[self.latents].name

    def latents_of(self, args: Sequence) -> torch.Tensor:
        """The latents among a call's ``args``: the latents input, or its rows stacked along a new batch axis."""
        if self.latents_rows:
            return torch.stack([args[r] for r in self.latents_rows])
        return args[self.latents]

    @property
    def timestep_name(self) -> str | None:
        return None if self.timestep is None else self.inputs[self.timestep].name

    @property
    def caches(self) -> tuple[CacheInput, ...]:
        """The output cache, then the K/V caches: the step graph's last inputs."""
        return (self.output_cache, *self.kv_caches)

    @property
    def cache_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.caches)

    @property
    def extra_names(self) -> tuple[str, ...]:
        """The inputs the passes added, in order: the active-token index, then the caches."""
        return (self.active_idx, *self.cache_names)

    @property
    def ras_input_names(self) -> tuple[str, ...]:
        """Every input of the RAS step graph, in order."""
        return (*self.input_names, *self.extra_names)

    @property
    def updated_cache_names(self) -> tuple[str, ...]:
        """The outputs an exported RAS graph adds after the model's: each cache's updated copy, ``<cache>_out``."""
        return tuple(f"{name}_out" for name in self.cache_names)

    # ------------------------------------------------------------------ binding

    def extra_inputs(self, active_idx: Any, output_cache: Any, kv_caches: Sequence[Any]) -> tuple:
        """The inputs the passes added, in the graph's order."""
        if len(kv_caches) != len(self.kv_caches):
            raise ValueError(f"{len(kv_caches)} K/V caches given; the step graph takes {len(self.kv_caches)}")
        return (active_idx, output_cache, *kv_caches)

    def bind(self, model_args: Sequence[Any], active_idx: Any, output_cache: Any, kv_caches: Sequence[Any]) -> tuple:
        """The RAS step graph's positional arguments: ``model_args`` (the dense graph's), then the added inputs."""
        if len(model_args) != len(self.inputs):
            raise ValueError(f"{len(model_args)} model inputs given; the step graph takes {len(self.inputs)}")
        return (*model_args, *self.extra_inputs(active_idx, output_cache, kv_caches))

    def feeds(
        self,
        model_inputs: Mapping[str, Any],
        active_idx: Any = None,
        output_cache: Any = None,
        kv_caches: Sequence[Any] = (),
    ) -> dict[str, Any]:
        """The step graph's inputs by name, in order: the dense graph's (``active_idx`` None) or the RAS graph's."""
        feeds = {name: model_inputs[name] for name in self.input_names}
        if active_idx is not None:
            feeds.update(zip(self.extra_names, self.extra_inputs(active_idx, output_cache, kv_caches)))
        return feeds

    def model_args(self, values: Mapping[str, Any]) -> tuple:
        """The model inputs of ``values`` (by name), in order."""
        return tuple(values[name] for name in self.input_names)

    def placeholder_values(self, placeholders: Sequence[str], args: Sequence[Any]) -> dict[str, Any]:
        """This signature's model inputs by name, taken from the Dynamo graph's arguments ``args`` (one per
        placeholder of ``placeholders``): how an exported graph's inputs are found in the traced call."""
        by_placeholder = dict(zip(placeholders, args))
        missing = [i.placeholder for i in self.inputs if i.placeholder not in by_placeholder]
        if missing:
            raise ValueError(f"the graph has no placeholder(s) {', '.join(missing)}")
        return {i.name: by_placeholder[i.placeholder] for i in self.inputs}

    def with_inputs(self, inputs: Sequence[ModelInput]) -> StepSignature:
        """The same step graph with other model inputs (an exported graph's: the runtime inputs, renamed), matched
        to the latents and timestep by placeholder."""
        inputs = tuple(inputs)
        placeholders = [i.placeholder for i in inputs]
        latents = self.inputs[self.latents].placeholder
        if latents not in placeholders:
            raise SignatureError(f"the latents input {latents} is not among the inputs {', '.join(placeholders)}")
        timestep = None if self.timestep is None else self.inputs[self.timestep].placeholder
        index = placeholders.index(timestep) if timestep is not None and timestep in placeholders else None
        return dataclasses.replace(self, inputs=inputs, latents=placeholders.index(latents), timestep=index)

    # ------------------------------------------------------------------ manifest

    def to_manifest(self) -> dict:
        """The export manifest's fields about the step graphs (JSON-able; see the module docstring)."""
        if self.latent_kind != "image":
            raise SignatureError(
                f"latent_kind is {self.latent_kind!r}: the export manifest describes [B, C, H, W] latents only"
            )
        if self.active_idx != ACTIVE_IDX:
            raise SignatureError(f"active_idx is {self.active_idx!r}: an exported graph's is {ACTIVE_IDX!r}")
        inputs = []
        for position, i in enumerate(self.inputs):
            if i.shape is None or i.dtype is None:
                raise SignatureError(f"inputs[{position}] ({i.name}) has no shape or dtype")
            inputs.append(
                {"name": i.name, "placeholder": i.placeholder, "shape": list(i.shape), "dtype": _dtype_name(i.dtype)}
            )
        return {
            "inputs": inputs,
            "latents": self.latents_name,
            "timestep": self.timestep_name,
            "batch_size": self.batch_size,
            "num_tokens": self.num_tokens,
            "patch_size": self.patch_size,
            "latent_hw": list(self.latent_hw),
            "output_cache": _cache_record(self.output_cache),
            "kv_caches": [_cache_record(c) | {"attention": c.attention, "kind": c.kind} for c in self.kv_caches],
        }

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> StepSignature:
        """The signature of an export's RAS graph from its manifest (other fields of the manifest are ignored),
        every step-graph field checked (``signature_manifest``: the rules the deploy code's
        ``validate_manifest`` applies too). Raises ``SignatureError`` naming the field, its value and the rule."""
        from .signature_manifest import FieldChecker, read_step_graph

        return cls(**read_step_graph(manifest, FieldChecker(error=SignatureError)))


def step_signature(gm_or_names: torch.fx.GraphModule | Sequence[str], ctx: Any) -> StepSignature:
    """The signature of the RAS step graph ``build_ras_graph`` made, from its pass context ``ctx``.

    ``gm_or_names``: the dense graph (or the RAS graph: its added placeholders are checked against ``ctx`` and
    left out), or the dense graph's placeholder names in order (shapes and dtypes unknown then)."""
    if isinstance(gm_or_names, torch.fx.GraphModule):
        nodes = [n for n in gm_or_names.graph.nodes if n.op == "placeholder"]
        inputs = [ModelInput(n.name, n.name, *_shape_and_dtype(n)) for n in nodes]
    else:
        inputs = [ModelInput(name, name) for name in gm_or_names]
    added = [ctx.active_idx, ctx.output_cache, *(s.placeholder for s in ctx.kv_slots)]
    names = [i.name for i in inputs]
    if names[-len(added) :] == added:
        inputs = inputs[: -len(added)]
        names = names[: -len(added)]
    elif any(name in names for name in added):
        raise SignatureError(f"the graph's placeholders end with {names[-len(added) :]}; the passes added {added}")
    if ctx.latents not in names:
        raise SignatureError(f"the latents {ctx.latents} are not a placeholder of the graph")
    if ctx.timestep is not None and ctx.timestep not in names:
        raise SignatureError(f"the timestep {ctx.timestep} is not a placeholder of the graph")
    return StepSignature(
        inputs=tuple(inputs),
        latents=names.index(ctx.latents),
        timestep=names.index(ctx.timestep) if ctx.timestep else None,
        active_idx=ctx.active_idx,
        output_cache=CacheInput(ctx.output_cache, tuple(ctx.output_cache_shape), ctx.output_cache_dtype),
        kv_caches=tuple(
            KVCacheInput(s.placeholder, tuple(s.shape), s.dtype, attention=s.attention, kind=s.kind)
            for s in ctx.kv_slots
        ),
        batch_size=ctx.batch_size,
        num_tokens=ctx.num_tokens,
        patch_size=ctx.patch_size,
        latent_hw=tuple(ctx.latent_hw),
        latent_kind=ctx.latent_layout,
        latent=ctx.latent,
        latents_rows=tuple(names.index(r) for r in ctx.latents_rows),
        token_multiple=ctx.context_parallel.degree if ctx.context_parallel else 1,
        parallel_group=ctx.context_parallel.group if ctx.context_parallel else None,
    )


def _shape_and_dtype(node: torch.fx.Node) -> tuple[tuple[int, ...] | None, torch.dtype | None]:
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor):
        return None, None
    try:
        return tuple(int(s) for s in value.shape), value.dtype
    except (TypeError, ValueError):  # symbolic sizes
        return None, value.dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cache_record(cache: CacheInput) -> dict:
    return {"name": cache.name, "shape": list(cache.shape), "dtype": _dtype_name(cache.dtype)}


__all__ = [
    "ACTIVE_IDX",
    "CacheInput",
    "KVCacheInput",
    "ModelInput",
    "SignatureError",
    "StepSignature",
    "step_signature",
]
