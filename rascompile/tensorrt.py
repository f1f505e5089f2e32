"""TensorRT engines for the exported step graphs, and runners for them (needs CUDA and ``tensorrt``).

Two routes, both imported only when used (``pip install rascompile[tensorrt]``):

- ``build_engines(directory)``: ``dense.engine`` and ``ras.engine`` from the ONNX files that
  ``rascompile.export`` wrote, with TensorRT's Python API. The RAS engine has one optimization
  profile over k: min 1, opt ``opt_ratio * N`` (the sample ratio you will run), max N.
  ``TensorRTRunner(directory, config)`` drives generations with them, like ``OnnxRunner``.
- ``compile_torch_tensorrt(source, directory)``: the lowered step modules compiled by
  torch-tensorrt's dynamo path (the same profile over k) and saved as ``dense.ep`` / ``ras.ep``;
  ``TorchTensorRTRunner(directory, config)`` runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import RASConfig
from .onnx_export import MANIFEST, prepare_step_graphs
from .onnx_runner import StepRunner, load_manifest


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
    """Build ``dense.engine`` and ``ras.engine`` next to the ONNX files; returns their paths."""
    import tensorrt as trt

    _require_cuda("building TensorRT engines")
    directory = Path(directory)
    manifest = load_manifest(directory)
    logger = trt.Logger(trt.Logger.WARNING)
    batch = manifest["batch_size"]
    k_min, k_opt, k_max = k_profile(manifest, opt_ratio)
    paths = {}
    for graph in ("dense", "ras"):
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
            profile.set_shape("ras_active_idx", (batch, k_min), (batch, k_opt), (batch, k_max))
            config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError(f"TensorRT failed to build an engine from {manifest[graph]}")
        paths[graph] = directory / f"{graph}.engine"
        paths[graph].write_bytes(bytes(engine))
    return paths


class TensorRTRunner(StepRunner):
    """Runs ``dense.engine`` / ``ras.engine`` (see ``build_engines``) on the current CUDA device."""

    def __init__(self, directory, config: RASConfig | None = None, *, steps=None):
        import tensorrt as trt

        _require_cuda("TensorRTRunner")
        super().__init__(directory, config, steps=steps)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {}
        for graph in ("dense", "ras"):
            engine = runtime.deserialize_cuda_engine((self.directory / f"{graph}.engine").read_bytes())
            if engine is None:
                raise RuntimeError(f"cannot load {graph}.engine: build it with rascompile.tensorrt.build_engines")
            self.engines[graph] = (engine, engine.create_execution_context())

    def execute(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        engine, context = self.engines[graph]
        keep = []
        for name, tensor in feeds.items():
            tensor = tensor.cuda().contiguous()
            keep.append(tensor)
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        names = self.manifest["outputs"] + ([] if graph == "dense" else [f"{n}_out" for n in self._cache_names()])
        outputs = []
        for name in names:
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

    def _cache_names(self) -> list[str]:
        m = self.manifest
        return [m["output_cache"]["name"], *(c["name"] for c in m["kv_caches"])]


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
    """Compile the lowered dense and RAS step modules with torch-tensorrt (dynamo) and save them."""
    import torch_tensorrt

    _require_cuda("torch-tensorrt")
    steps = prepare_step_graphs(source, call_kwargs=call_kwargs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    batch = steps.manifest["batch_size"]
    k_min, k_opt, k_max = k_profile(steps.manifest, opt_ratio)
    paths = {}
    for graph, module, args in (("dense", steps.dense, steps.dense_args), ("ras", steps.ras, steps.ras_args)):
        inputs = [torch_tensorrt.Input(shape=tuple(a.shape), dtype=a.dtype) for a in args]
        if graph == "ras":
            position = len(steps.dense_args)
            inputs[position] = torch_tensorrt.Input(
                min_shape=(batch, k_min), opt_shape=(batch, k_opt), max_shape=(batch, k_max), dtype=torch.int64
            )
        cuda_args = [a.cuda() for a in args]
        compiled = torch_tensorrt.compile(module.cuda(), ir="dynamo", inputs=inputs)
        paths[graph] = directory / f"{graph}.ep"
        torch_tensorrt.save(compiled, str(paths[graph]), inputs=cuda_args)
    manifest = {**steps.manifest, "dense": "dense.ep", "ras": "ras.ep", "runtime": "torch-tensorrt"}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return paths


class TorchTensorRTRunner(StepRunner):
    """Runs the modules ``compile_torch_tensorrt`` saved."""

    def __init__(self, directory, config: RASConfig | None = None, *, steps=None):
        _require_cuda("TorchTensorRTRunner")
        import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops the saved programs call)

        super().__init__(directory, config, steps=steps)
        self.modules = {g: torch.export.load(str(self.directory / self.manifest[g])).module() for g in ("dense", "ras")}

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
]
