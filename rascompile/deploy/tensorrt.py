"""TensorRT engines for the exported step graphs, and runners for them (needs CUDA and ``tensorrt``).

Two routes, both imported only when used (``pip install rascompile[tensorrt]``):

- ``build_engines(directory)``: ``dense.engine`` and ``ras.engine`` from the ONNX files that
  ``rascompile.export`` wrote, with TensorRT's Python API. The RAS engine has one optimization
  profile over k: min 1, opt ``opt_ratio * N`` (the sample ratio you will run), max N.
  ``TensorRTRunner(directory, config)`` drives generations with them, like ``OnnxRunner``.
- ``compile_torch_tensorrt(source, directory)``: the lowered step modules compiled by
  torch-tensorrt's dynamo path (the same profile over k) and saved as ``dense.ep`` / ``ras.ep``;
  ``TorchTensorRTRunner(directory, config, trust=True)`` runs them.

Both write the SHA-256 of every file into the manifest, and the runners check the manifest, the
file names (confined to the directory, regular files) and the checksums before loading anything
(``rascompile.deploy.manifest``). A ``.ep`` file is a pickle, so ``TorchTensorRTRunner`` loads one only
with ``trust=True``; a TensorRT engine is not a pickle, but it is native code for TensorRT, so load
engines only from directories you trust as well.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

from .._extras import require_extra
from ..config import RASConfig
from .manifest import (
    FORMAT,
    GRAPHS,
    MANIFEST,
    ManifestError,
    UntrustedExportError,
    read_verified,
    signature_of,
    where,
    write_manifest,
)
from .onnx_export import file_checksums, prepare_step_graphs
from .onnx_runner import StepRunner, load_manifest, load_onnx_graphs
from .output_directory import check_output_path, output_path, staged_directory


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA GPU; none is available")


def k_profile(manifest: dict, opt_ratio: float) -> tuple[int, int, int]:
    """(min, opt, max) active tokens for the RAS engine's optimization profile."""
    n = manifest["num_tokens"]
    if not 0.0 < opt_ratio <= 1.0:
        raise ValueError(f"opt_ratio={opt_ratio!r} is invalid: must be in (0, 1]")
    return 1, max(1, min(n, round(opt_ratio * n))), n


def build_engines(
    directory: str | Path, *, opt_ratio: float = 0.5, fp16: bool = False, workspace_gib: float = 4.0
) -> dict[str, Path]:
    """Build ``dense.engine`` and ``ras.engine`` next to the ONNX files; returns their paths.

    The ONNX files are checked first (manifest, SHA-256, graph inputs; see ``rascompile.deploy.manifest``).
    The engines' names and SHA-256 are added to the manifest, which is rewritten atomically after
    the engines are in place."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    load_onnx_graphs(directory, manifest)  # checks the files and their graphs against the manifest
    signature = signature_of(directory, manifest)

    require_extra("tensorrt", "tensorrt", feature="TensorRT engines")
    import tensorrt as trt

    _require_cuda("building TensorRT engines")
    logger = trt.Logger(trt.Logger.WARNING)
    batch = signature.batch_size
    k_min, k_opt, k_max = k_profile(manifest, opt_ratio)
    paths, sums = {}, {}
    for graph in GRAPHS:
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(directory / manifest[graph])):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse {manifest[graph]}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if graph == "ras":
            profile = builder.create_optimization_profile()
            profile.set_shape(signature.active_idx, (batch, k_min), (batch, k_opt), (batch, k_max))
            config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {manifest[graph]}")
        paths[graph] = directory / f"{graph}.engine"
        sums[paths[graph].name] = _write_atomically(paths[graph], bytes(engine))
    engines = {graph: path.name for graph, path in paths.items()}
    write_manifest(directory, {**manifest, "engines": engines, "sha256": {**manifest["sha256"], **sums}})
    return paths


def _write_atomically(path: Path, data: bytes) -> str:
    """Write a new file and rename it over ``path`` (replacing a symlink there, never writing through
    it); returns the data's SHA-256."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return hashlib.sha256(data).hexdigest()


class TensorRTRunner(StepRunner):
    """Runs ``dense.engine`` / ``ras.engine`` (see ``build_engines``) on the current CUDA device.

    The manifest and the engines' SHA-256 are checked before TensorRT sees them, and the engines'
    input and output names against the manifest after. A TensorRT engine is not a pickle, but it is
    trusted native code for TensorRT (and may carry plugins): build engines yourself, or load them
    only from directories you trust."""

    def __init__(self, directory, config: RASConfig | None = None, *, steps=None):
        super().__init__(directory, config, steps=steps)
        m = self.manifest
        if m.get("runtime", "onnx") != "onnx" or "engines" not in m:
            raise ManifestError(
                f"{where(self.directory)}: field 'engines' is missing: the directory holds no TensorRT engines "
                "(build them with rascompile.deploy.tensorrt.build_engines, or `rascompile export --tensorrt`)"
            )
        data = {g: read_verified(self.directory, m, m["engines"][g], f"engines.{g}") for g in GRAPHS}

        require_extra("tensorrt", "tensorrt", feature="TensorRT engines")
        import tensorrt as trt

        _require_cuda("TensorRTRunner")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {}
        for graph in GRAPHS:
            engine = runtime.deserialize_cuda_engine(data[graph])
            if engine is None:
                raise RuntimeError(
                    f"cannot load {m['engines'][graph]}: build it with rascompile.deploy.tensorrt.build_engines"
                )
            self._check_engine(graph, engine)
            self.engines[graph] = (engine, engine.create_execution_context())

    def _check_engine(self, graph: str, engine) -> None:
        m = self.manifest
        expected = list(self.signature.ras_input_names if graph == "ras" else self.signature.input_names)
        outputs = self.output_names(graph)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted(expected + outputs):
            raise ManifestError(
                f"{where(self.directory)}: {m['engines'][graph]} has the inputs and outputs ({', '.join(names)}); "
                f"the manifest says ({', '.join(expected + outputs)})"
            )

    def execute(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        engine, context = self.engines[graph]
        keep = []
        for name, tensor in feeds.items():
            tensor = tensor.cuda().contiguous()
            keep.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.output_names(graph):
            shape = tuple(context.get_tensor_shape(name))
            dtype = _torch_dtype(engine.get_tensor_dtype(name))
            out = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {graph}.engine")
        stream.synchronize()
        return [o.cpu() for o in outputs]

    def output_names(self, graph: str) -> list[str]:
        """The outputs of ``graph`` ("dense" or "ras"), in order: the model's, then (ras) the updated caches."""
        updated = list(self.signature.updated_cache_names) if graph == "ras" else []
        return [*self.manifest["outputs"], *updated]


def _torch_dtype(trt_dtype) -> torch.dtype:
    import tensorrt as trt

    return {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64,
        trt.int32: torch.int32,
        trt.bool: torch.bool,
    }[trt_dtype]


def compile_torch_tensorrt(
    source, directory: str | Path, *, call_kwargs: dict | None = None, opt_ratio: float = 0.5
) -> dict[str, Path]:
    """Compile the lowered dense and RAS step modules with torch-tensorrt (dynamo) and save them.

    Like ``rascompile.export``, the files are written into a fresh directory next to ``directory``
    and moved into place at the end; ``directory`` must be missing, empty or an earlier export."""
    require_extra("tensorrt", "torch_tensorrt", feature="torch-tensorrt")
    import torch_tensorrt

    _require_cuda("torch-tensorrt")
    target = output_path(directory)
    check_output_path(target)
    steps = prepare_step_graphs(source, call_kwargs=call_kwargs)
    batch = steps.manifest["batch_size"]
    k_min, k_opt, k_max = k_profile(steps.manifest, opt_ratio)
    with staged_directory(target) as stage:
        for graph, module, args in (("dense", steps.dense, steps.dense_args), ("ras", steps.ras, steps.ras_args)):
            inputs = [torch_tensorrt.Input(shape=tuple(a.shape), dtype=a.dtype) for a in args]
            if graph == "ras":  # the active-token index has the profile over k
                k_input = torch_tensorrt.Input(
                    min_shape=(batch, k_min), opt_shape=(batch, k_opt), max_shape=(batch, k_max), dtype=torch.int64
                )
                names = steps.signature.ras_input_names
                inputs = [k_input if n == steps.signature.active_idx else i for n, i in zip(names, inputs)]
            cuda_args = [a.cuda() for a in args]
            compiled = torch_tensorrt.compile(module.cuda(), ir="dynamo", inputs=inputs)
            torch_tensorrt.save(compiled, str(stage / f"{graph}.ep"), inputs=cuda_args)
        manifest = {
            **steps.manifest,
            "format": FORMAT,
            "runtime": "torch-tensorrt",
            "dense": "dense.ep",
            "ras": "ras.ep",
            "sha256": file_checksums(stage),
        }
        write_manifest(stage, manifest)
    directory = Path(directory)
    return {graph: directory / f"{graph}.ep" for graph in GRAPHS}


class TorchTensorRTRunner(StepRunner):
    """Runs the modules ``compile_torch_tensorrt`` saved.

    **Loading runs code from the directory.** ``dense.ep`` and ``ras.ep`` are read with
    ``torch.export.load``, which unpickles them, and a crafted ``.ep`` file runs arbitrary code as
    you. So the runner refuses (``UntrustedExportError``, a ``ValueError``, before anything is read)
    unless you pass ``trust=True``, which says the directory was written by you, or by someone you
    trust, with ``compile_torch_tensorrt``:

        runner = TorchTensorRTRunner("sd3-trt", RASConfig(sample_ratio=0.5), trust=True)

    Even then the manifest, the file names and the files' SHA-256 are checked before loading (they
    catch mix-ups and corruption, not a malicious directory, which can rewrite its own checksums).
    For directories you did not write, use the ONNX route (``OnnxRunner``), which unpickles nothing.
    """

    def __init__(self, directory, config: RASConfig | None = None, *, steps=None, trust: bool = False):
        if trust is not True:
            raise UntrustedExportError(
                f"TorchTensorRTRunner would load the .ep files in {directory} with torch.export.load, which "
                "unpickles them: a crafted file runs arbitrary code. Pass trust=True only for a directory you "
                "(or someone you trust) wrote with compile_torch_tensorrt: "
                "TorchTensorRTRunner(directory, config, trust=True); otherwise export to ONNX and use OnnxRunner"
            )
        super().__init__(directory, config, steps=steps)
        m = self.manifest
        if m.get("runtime", "onnx") != "torch-tensorrt":
            raise ManifestError(
                f"{where(self.directory)}: field 'runtime' is {m.get('runtime', 'onnx')!r}; TorchTensorRTRunner "
                "runs directories written by compile_torch_tensorrt (runtime 'torch-tensorrt')"
            )
        data = {g: read_verified(self.directory, m, m[g], g) for g in GRAPHS}
        _require_cuda("TorchTensorRTRunner")
        require_extra("tensorrt", "torch_tensorrt", feature="torch-tensorrt")
        import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops the saved programs call)

        self.modules = {g: torch.export.load(io.BytesIO(data[g])).module() for g in GRAPHS}

    def execute(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            outputs = self.modules[graph](*(t.cuda() for t in feeds.values()))
        return [o.cpu() for o in outputs]


__all__ = [
    "TensorRTRunner",
    "TorchTensorRTRunner",
    "build_engines",
    "compile_torch_tensorrt",
    "k_profile",
    "MANIFEST",
    "UntrustedExportError",
]
