"""``rascompile.export``: a RAS-compiled transformer as two ONNX step graphs and a manifest.

The directory it writes holds:

- ``dense.onnx``: one dense step, the model's own inputs to its outputs;
- ``ras.onnx``: one RAS step. Inputs: the model's inputs, then ``ras_active_idx [B, k]``, the
  output cache and the K/V caches; outputs: the model's outputs, then the updated caches
  (``<cache>_out``). ``k`` is a dynamic axis (1 to N), so one file serves every sample ratio, and
  the dense steps that fill the caches run it with all N tokens;
- ``rascompile_export.json``: the manifest the runners read (inputs, shapes, dtypes, the cache
  layout, which inputs were baked in as constants, the opset the files have and the SHA-256 of
  every file; see ``rascompile.deploy.manifest``).

The files are written into a fresh directory next to ``directory`` and moved into place only once
onnxruntime has run them (with ``check=True``), so a failed export leaves nothing behind and an
earlier export in ``directory`` is replaced whole, never mixed with the new files.

The model's parameters, buffers and complex-valued inputs (Lumina-Next's RoPE table) are baked
into the graphs. No custom ops: the K/V cache writes and the fused K/V projection export through
their plain torch decompositions (``passes/export/portable_ops.py``).
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx

from rascompile.passes.context import RewriteError
from rascompile.passes.export.lowering import ExportError, ExportLowering, lower_for_export
from rascompile.passes.find_token_source import MODULE_STATE_MARKERS
from rascompile.passes.graph_utils import copy_graph_module
from rascompile.passes.pipeline import build_ras_graph
from rascompile.passes.signature import ModelInput, StepSignature
from rascompile.passes.snapshot import render_record

from .._extras import require_extra
from .manifest import FORMAT, MANIFEST, sha256_file, write_manifest
from .onnx_graphs import onnx_opset
from .output_directory import check_output_path, output_path, staged_directory

DEFAULT_OPSET = 18
CONSTANT_MARKERS = MODULE_STATE_MARKERS  # parameters and buffers become constants of the exported graph


@functools.cache
def opset_range() -> tuple[int, int]:
    """The ONNX opsets ``export`` accepts: torch.onnx's dynamo exporter implements its operators at
    ``TORCHLIB_OPSET`` (18) and converts the model up to ``ONNX_MAX_OPSET`` (23 in torch 2.13, capped by
    what the installed ``onnx`` knows). Lower opsets are a best-effort version conversion that torch
    skips silently when it fails (the file stays at 18), so they are refused."""
    import onnx

    try:
        from torch.onnx._internal.exporter._constants import TORCHLIB_OPSET as low
    except ImportError:  # pragma: no cover - torch moved its constants
        low = 18
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET as high
    except ImportError:  # pragma: no cover
        high = 23
    return low, min(high, onnx.defs.onnx_opset_version())


@dataclass(frozen=True)
class ExportedModel:
    """What ``export`` wrote."""

    directory: Path
    dense: Path
    ras: Path
    manifest: dict

    @property
    def signature(self) -> StepSignature:
        """The exported RAS graph's inputs, caches and sizes, as the manifest records them."""
        return StepSignature.from_manifest(self.manifest)


@dataclass
class StepGraphs:
    """The lowered dense and RAS step modules of one transformer graph, with example inputs and the
    manifest that describes them (shared by the ONNX and the torch-tensorrt exports)."""

    dense: torch.nn.Module
    ras: torch.nn.Module
    dense_args: list[torch.Tensor]  # example inputs of ``dense``
    ras_args: list[torch.Tensor]  # example inputs of ``ras``: dense_args, active idx, caches
    dense_input_names: list[str]
    ras_input_names: list[str]
    dense_output_names: list[str]
    ras_output_names: list[str]
    manifest: dict
    signature: StepSignature  # of the exported RAS graph: its inputs, named as in the files


def prepare_step_graphs(
    source: Any, *, call_kwargs: dict | None = None, fused_kv_projection: bool = True
) -> StepGraphs:
    """Trace (if needed), rewrite and lower ``source``'s transformer graph: see ``export`` for ``source``."""
    dense_gm, example_inputs = _dense_graph(source, call_kwargs)
    try:
        ras_gm, dense_signature, ctx = build_ras_graph(dense_gm, fuse_kv_projection=fused_kv_projection)
    except RewriteError as exc:
        raise ExportError(f"cannot export a RAS step graph: the passes cannot rewrite this model: {exc}") from exc
    if ctx.latent_layout != "image":
        raise ExportError(
            f"cannot export a model with {ctx.latent_layout} latents yet: the export manifest describes "
            "[B, C, H, W] latents only (run it with torch.compile(backend='ras') or rascompile.apply)"
        )
    placeholders = [n.name for n in dense_gm.graph.nodes if n.op == "placeholder"]
    constants, runtime = _split_inputs(placeholders, example_inputs)
    baked = [
        _input_record(name, value) | {"checksum": _checksum(value)}
        for name, value in constants.items()
        if not any(m in name for m in CONSTANT_MARKERS)
    ]
    if ctx.latents not in runtime:
        raise ExportError(f"the latents input {ctx.latents} is not a runtime input of the graph")
    runtime_values = [example_inputs[placeholders.index(name)] for name in runtime]
    # the exported graphs take the runtime inputs only, named as the call's keywords
    signature = dense_signature.with_inputs(
        [
            ModelInput(input_name(name), name, tuple(value.shape), value.dtype)
            for name, value in zip(runtime, runtime_values)
        ]
    )
    caches = [torch.zeros(c.shape, dtype=c.dtype) for c in signature.caches]
    k = ctx.num_tokens // 2 + 1
    idx = torch.stack([torch.randperm(ctx.num_tokens)[:k] for _ in range(ctx.batch_size)])
    outputs = [f"output_{i}" if i else "sample" for i in range(_num_outputs(dense_gm))]
    fields = signature.to_manifest()
    manifest = {
        "format": FORMAT,
        "torch": torch.__version__,
        "inputs": fields.pop("inputs"),
        "baked_inputs": baked,
        "outputs": outputs,
        **fields,
        "rewrite": [render_record(record) for record in ctx.records],
    }
    dense = lower_for_export(copy_graph_module(dense_gm), ExportLowering(dict(constants)))
    ras = lower_for_export(copy_graph_module(ras_gm), ExportLowering(dict(constants)))
    return StepGraphs(
        dense=_StepModule(dense, 0).eval(),
        ras=_StepModule(ras, len(caches)).eval(),
        dense_args=runtime_values,
        ras_args=list(signature.bind(runtime_values, idx, caches[0], caches[1:])),
        dense_input_names=list(signature.input_names),
        ras_input_names=list(signature.ras_input_names),
        dense_output_names=outputs,
        ras_output_names=outputs + list(signature.updated_cache_names),
        manifest=manifest,
        signature=signature,
    )


def export(
    source: Any,
    directory: str | Path,
    *,
    call_kwargs: dict | None = None,
    opset: int = DEFAULT_OPSET,
    fused_kv_projection: bool = True,
    check: bool = True,
) -> ExportedModel:
    """Export the dense and the RAS step graph of a transformer to ONNX.

    Args:
        source: a ``RASBackend`` or ``RASGraph`` that has seen one call (for example the backend
            ``rascompile.apply`` returned, after one generation), or a diffusers pipeline, which is
            then traced with one 1-step call of ``pipe(**call_kwargs)``.
        directory: where the files go (created if missing).
        call_kwargs: the pipeline call used for tracing, when ``source`` is a pipeline. The
            exported graphs are specialised to its resolution and batch size.
        opset: ONNX opset, from 18 to 23 (``opset_range()``; TensorRT 10 reads 9 to 24). The manifest
            records the opset the files were written with, read back from them.
        fused_kv_projection: rewrite K/V projections into the fused op first (it exports through its
            decomposition, so the file is the same either way up to operator order).
        check: run both files once with onnxruntime and compare with PyTorch.

    Raises:
        ValueError: ``opset`` is not an int in ``opset_range()``.
        ExportError: the graphs cannot be exported, onnxruntime disagrees with PyTorch, or
            ``directory`` is a file or a non-empty directory that is not an earlier rascompile export
            (it is not replaced then; an earlier export is replaced whole).
    """
    require_extra("onnx", "onnx", "onnxscript", *(("onnxruntime",) if check else ()), feature="rascompile.export")
    opset = check_opset(opset)
    target = output_path(directory)
    check_output_path(target)  # before the expensive tracing
    steps = prepare_step_graphs(source, call_kwargs=call_kwargs, fused_kv_projection=fused_kv_projection)
    with staged_directory(target) as stage:
        dense_path, ras_path = stage / "dense.onnx", stage / "ras.onnx"
        _export_onnx(
            steps.dense, steps.dense_args, steps.dense_input_names, steps.dense_output_names, None, opset, dense_path
        )
        signature = steps.signature
        k_dim = torch.export.Dim("k", min=1, max=signature.num_tokens)
        no_dims = [None] * len(signature.kv_caches)
        dynamic = signature.bind([None] * len(signature.inputs), {1: k_dim}, None, no_dims)  # k is dynamic
        _export_onnx(steps.ras, steps.ras_args, steps.ras_input_names, steps.ras_output_names, dynamic, opset, ras_path)
        manifest = {
            **steps.manifest,
            "runtime": "onnx",
            "opset": _written_opset(opset, dense_path, ras_path),
            "dense": dense_path.name,
            "ras": ras_path.name,
            "sha256": file_checksums(stage),
        }
        write_manifest(stage, manifest)
        if check:
            _check_with_onnxruntime(ExportedModel(stage, dense_path, ras_path, manifest), steps)
    directory = Path(directory)
    return ExportedModel(directory, directory / dense_path.name, directory / ras_path.name, manifest)


def check_opset(opset: Any) -> int:
    low, high = opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ValueError(
            f"opset={opset!r} is invalid: must be an int from {low} to {high}. torch {torch.__version__}'s ONNX "
            f"exporter implements its operators at opset {low} and converts up to {high}; a lower opset is a "
            f"best-effort conversion that torch skips silently when it fails, leaving the files at opset {low}"
        )
    return opset


def _written_opset(requested: int, *paths: Path) -> int:
    import onnx

    for path in paths:
        written = onnx_opset(onnx.load(str(path), load_external_data=False))
        if written != requested:
            raise ExportError(f"torch.onnx wrote {path.name} with opset {written}, though opset={requested} was asked")
    return requested


def file_checksums(directory: Path) -> dict[str, str]:
    """SHA-256 of every file in ``directory`` (the exported files and external data), not the manifest."""
    sums = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name == MANIFEST or entry.name.startswith(f".{MANIFEST}."):
            continue
        if not entry.is_file(follow_symlinks=False):
            raise ExportError(f"the export wrote {entry.path}, which is not a regular file")
        sums[entry.name] = sha256_file(entry.path)
    return sums


class _StepModule(torch.nn.Module):
    """A lowered step graph as a module for ``torch.onnx.export``: caches in, updated copies out."""

    def __init__(self, graph_module: torch.fx.GraphModule, num_caches: int):
        super().__init__()
        self.graph_module = graph_module
        self.num_caches = num_caches

    def forward(self, *inputs):
        if not self.num_caches:
            return tuple(self.graph_module(*inputs))
        head = inputs[: -self.num_caches]
        caches = [c.clone() for c in inputs[-self.num_caches :]]
        return (*self.graph_module(*head, *caches), *caches)


def _export_onnx(module, args, input_names, output_names, dynamic, opset, path: Path) -> None:
    dynamic_shapes = None if dynamic is None else (tuple(dynamic),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module.eval(),
                tuple(args),
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; say which graph failed
            raise ExportError(f"torch.onnx.export failed for {path.name}: {str(exc).splitlines()[0]}") from exc
    program.save(str(path))


def _dense_graph(source, call_kwargs):
    from ..runtime.backend import RASBackend
    from ..runtime.graph import StepGraph

    if isinstance(source, RASBackend):
        if len(source.graphs) != 1:
            raise ExportError(
                f"the backend holds {len(source.graphs)} graphs; export needs exactly one "
                "(run the pipeline once, at one resolution, before exporting)"
            )
        source = source.graphs[0]
    if isinstance(source, StepGraph):  # a RASGraph, or a DenseGraph (the passes then say why they refuse it)
        return source.dense_gm, list(source.example_inputs)
    if hasattr(source, "transformer") and hasattr(source, "scheduler"):
        if call_kwargs is None:
            raise ExportError("exporting a pipeline needs call_kwargs: the call that fixes resolution and batch")
        return _trace_pipeline(source, call_kwargs)
    raise ExportError(f"cannot export a {type(source).__name__}: pass a RASBackend, a RASGraph or a pipeline")


def _trace_pipeline(pipe, call_kwargs):
    from ..capture import capture_pipeline_graphs

    try:
        graphs = capture_pipeline_graphs(pipe, call_kwargs, fullgraph=True)  # dynamic=False, output_type="latent"
    except torch._dynamo.exc.Unsupported as exc:
        raise ExportError(f"the transformer does not trace into one graph: {str(exc).splitlines()[0]}") from exc
    return graphs[0]


def _split_inputs(placeholders: list[str], example_inputs: list) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(constants by placeholder name, runtime input placeholder names in order)."""
    constants, runtime = {}, []
    for name, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"graph input {name} is a {type(value).__name__}, not a tensor; cannot export it")
        if any(m in name for m in CONSTANT_MARKERS) or value.is_complex():
            constants[name] = value.detach()
        else:
            runtime.append(name)
    return constants, runtime


def input_name(placeholder: str) -> str:
    """The call's keyword for a Dynamo placeholder: ``l_kwargs_hidden_states_`` -> ``hidden_states``."""
    name = re.sub(r"^l_(kwargs_)?", "", placeholder.lower())
    return name[:-1] if name.endswith("_") else name


def _input_record(placeholder: str, value: torch.Tensor) -> dict:
    return {
        "name": input_name(placeholder),
        "placeholder": placeholder,
        "shape": list(value.shape),
        "dtype": _dtype_name(value.dtype),
    }


def _checksum(value: torch.Tensor) -> list[float]:
    real = torch.view_as_real(value) if value.is_complex() else value
    real = real.double()
    return [float(real.sum()), float(real.abs().sum())]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _num_outputs(gm: torch.fx.GraphModule) -> int:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    result = output.args[0]
    return len(result) if isinstance(result, (tuple, list)) else 1


def _check_with_onnxruntime(exported: ExportedModel, steps: StepGraphs) -> None:
    import onnxruntime as ort

    def compare(path: Path, module, args) -> None:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
        got = session.run(None, feeds)
        with torch.no_grad():
            expected = module(*args)
        for name, a, b in zip((o.name for o in session.get_outputs()), got, expected):
            b = b.detach().float().cpu()
            error = (torch.from_numpy(a).float() - b).abs().max().item()
            if error > 1e-3 * max(1.0, b.abs().max().item()):
                raise ExportError(f"{path.name}: onnxruntime output {name} differs from PyTorch by {error:.3g}")

    compare(exported.dense, steps.dense, steps.dense_args)
    compare(exported.ras, steps.ras, steps.ras_args)
