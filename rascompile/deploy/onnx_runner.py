"""Run RAS generations from exported step graphs, with the same controller as the PyTorch path.

``StepRunner`` holds everything but the engine: the manifest, input checks, the controller that
plans each step and selects the active tokens, and the caches it keeps between steps.
``OnnxRunner`` runs the steps with onnxruntime; ``rascompile.deploy.tensorrt.TensorRTRunner`` with
TensorRT engines.

    runner = OnnxRunner("exported/", RASConfig(sample_ratio=0.5, num_inference_steps=28))
    pipe.transformer = runner.as_transformer(pipe.transformer)   # or runner.for_pipeline(pipe)
    image = pipe(...).images[0]

An export directory is data: the runners check its manifest (``rascompile.deploy.manifest``: every
field, sizes, file names confined to the directory, SHA-256 of every file, the ONNX graphs' inputs
and outputs) before they open anything, and raise a ``ManifestError`` (a ``ValueError``) naming the
file and the field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .._extras import require_extra
from ..config import RASConfig
from ..runtime.controller import GraphLayout, RASController
from ..runtime.steps import SchedulerSteps, TimestepSteps
from .manifest import (
    GRAPHS,
    MANIFEST,
    ManifestError,
    load_manifest,
    read_verified,
    signature_of,
    verify_file,
    where,
)
from .onnx_graphs import check_onnx_graph, external_data_files

__all__ = ["MANIFEST", "ExportedTransformer", "ManifestError", "OnnxRunner", "StepRunner", "load_manifest"]

# Keyword arguments the diffusers transformers take that carry options, not data. They were fixed when
# the model was traced for export: None or empty is accepted; a dict of plain values is accepted and
# pinned (a later call with another value is refused). Any other keyword the exported graphs do not
# take is refused, unless it is None (e.g. ``skip_layers=None``).
CALL_OPTIONS = ("joint_attention_kwargs", "cross_attention_kwargs", "attention_kwargs")


class StepRunner:
    """Drives exported dense/RAS step graphs one transformer call at a time; subclasses run them."""

    def __init__(self, directory: str | Path, config: RASConfig | None = None, *, steps=None):
        self.directory = Path(directory)
        self.manifest = load_manifest(directory)
        self.signature = signature_of(directory, self.manifest)
        self.config = config if config is not None else RASConfig()
        if steps is None and self.config.num_inference_steps is not None:
            steps = TimestepSteps(self.config.num_inference_steps)
        layout = GraphLayout.from_signature(self.signature)
        self.controller = RASController(self.config, layout, steps, torch.device("cpu"))
        self.input_names = list(self.signature.input_names)
        self._baked_checked: set[str] = set()
        self._options: dict[str, dict] = {}

    # ------------------------------------------------------------------ one transformer call

    def __call__(self, *args, return_dict: bool = False, **kwargs):
        """Call like the transformer (keywords as the pipeline passes them); returns ``(sample,)``."""
        inputs = self.inputs_from_call(args, kwargs)
        if self.config.sample_ratio >= 1.0:
            outputs = self.run_dense(inputs)
        elif self.controller.steps is None:
            raise ValueError(
                "RASConfig.num_inference_steps=None is invalid for a runner: give the step count, "
                "or use runner.for_pipeline(pipe), which reads it from the scheduler"
            )
        else:
            signature = self.signature
            timestep = inputs.get(signature.timestep_name) if signature.timestep_name else None
            decision = self.controller.decide(inputs[signature.latents_name], timestep)
            if decision.kind == "dense":
                outputs = self.run_dense(inputs)
            else:
                outputs = self.run_active(decision.active_idx, inputs, branch=decision.branch)
            self.controller.finish_call(decision)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=outputs[0])
        return tuple(outputs)

    def inputs_from_call(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        """The exported graph's inputs, by name, checked against the exported shapes and dtypes.

        Keyword arguments the exported graphs do not take are refused (ValueError naming them), except
        None values and the option dicts of ``CALL_OPTIONS``: everything but the tensor inputs was
        fixed when the model was traced for export, so an argument such as ``skip_layers=[7]`` cannot
        take effect."""
        if len(args) > len(self.input_names):
            raise ValueError(
                f"{len(args)} positional arguments; the exported model takes at most {len(self.input_names)} "
                f"({', '.join(self.input_names)})"
            )
        given = dict(zip(self.input_names, args))
        twice = sorted(set(given) & set(kwargs))
        if twice:
            raise ValueError(f"input(s) {', '.join(map(repr, twice))} given both positionally and as keywords")
        given |= kwargs
        baked = [r["name"] for r in self.manifest["baked_inputs"]]
        self._check_options({k: v for k, v in given.items() if k not in self.input_names and k not in baked})
        inputs = {}
        for record in self.manifest["inputs"]:
            name = record["name"]
            if name not in given:
                raise ValueError(f"input {name!r} is missing; the exported model takes {', '.join(self.input_names)}")
            inputs[name] = _checked(name, given[name], record)
        for record in self.manifest["baked_inputs"]:
            if record["name"] in given and record["name"] not in self._baked_checked:
                _check_baked(record, given[record["name"]])
                self._baked_checked.add(record["name"])
        return inputs

    def _check_options(self, extra: dict) -> None:
        takes = ", ".join([*self.input_names, *(r["name"] for r in self.manifest["baked_inputs"]), "return_dict"])
        for name, value in sorted(extra.items()):
            if value is None or (isinstance(value, (dict, list, tuple)) and not value):
                continue
            if (
                name in CALL_OPTIONS
                and isinstance(value, dict)
                and all(isinstance(v, (bool, int, float, str, type(None))) for v in value.values())
            ):
                pinned = self._options.setdefault(name, dict(value))
                if pinned != value:
                    raise ValueError(
                        f"keyword argument {name}={value!r} differs from {pinned!r} in this runner's earlier calls; "
                        "the exported graphs were traced with one fixed value (export again for another)"
                    )
                continue
            kind = "a tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
            raise ValueError(
                f"keyword argument {name!r} ({kind}) is not an input of the exported model, so it cannot take "
                f"effect; the exported model takes {takes} (other keyword arguments only as None). Leave it "
                "out, or export a model traced with it"
            )

    def run_dense(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.execute("dense", self.signature.feeds(inputs))[: len(self.manifest["outputs"])]

    def run_active(
        self, active_idx: torch.Tensor, inputs: dict[str, torch.Tensor], *, branch: int = 0
    ) -> list[torch.Tensor]:
        """One step over the tokens ``active_idx`` [B, k] (k = N fills the caches), with the runner's caches of
        guidance branch ``branch`` (pipelines that call the transformer once per branch keep one set each)."""
        n, batch = self.signature.num_tokens, self.signature.batch_size
        if active_idx.dim() != 2 or active_idx.shape[0] != batch or not 1 <= active_idx.shape[1] <= n:
            raise ValueError(
                f"active_idx has shape {list(active_idx.shape)}; must be [B, k] with B = {batch} and 1 <= k <= N = {n}"
            )
        if int(active_idx.min()) < 0 or int(active_idx.max()) >= n:
            raise ValueError(f"active_idx holds indices outside [0, {n - 1}] (N = {n} image tokens)")
        output_cache, kv_caches = self.controller.caches(branch)
        feeds = self.signature.feeds(inputs, active_idx.to(torch.int64), output_cache, kv_caches)
        outputs = self.execute("ras", feeds)
        count = len(self.manifest["outputs"])
        for cache, fresh in zip((output_cache, *kv_caches), outputs[count:]):  # the updated caches, in order
            cache.copy_(fresh)
        return outputs[:count]

    def execute(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Run ``graph`` ("dense" or "ras") on ``feeds``; the outputs in the manifest's order."""
        raise NotImplementedError

    # ------------------------------------------------------------------ pipelines

    def for_pipeline(self, pipe) -> StepRunner:
        """Read T and the step from ``pipe.scheduler`` (like ``rascompile.apply``) and stand in for its
        transformer."""
        self.controller.steps = SchedulerSteps(pipe.scheduler, self.config.num_inference_steps)
        pipe.transformer = self.as_transformer(pipe.transformer)
        return self

    def as_transformer(self, template: torch.nn.Module) -> torch.nn.Module:
        """A module the pipeline can call in place of ``template``: its config, this runner's steps."""
        return ExportedTransformer(self, template)


class ExportedTransformer(torch.nn.Module):
    """Stands in for a diffusers transformer: the template's ``config`` (and ``head_dim``), the runner's steps."""

    def __init__(self, runner: StepRunner, template: torch.nn.Module):
        super().__init__()
        self.runner = runner
        self.config = template.config
        self.dtype = runner.signature.inputs[0].dtype
        self.device = torch.device("cpu")
        for name in ("head_dim",):
            if hasattr(template, name):
                setattr(self, name, getattr(template, name))

    def forward(self, *args, **kwargs):
        return self.runner(*args, **kwargs)


class OnnxRunner(StepRunner):
    """Runs the exported ONNX step graphs with onnxruntime (CPU by default).

    Both graphs are checked and loaded when the runner is made: the manifest, the files' SHA-256, and
    the graphs' inputs and outputs against the manifest (``load_onnx_graphs``)."""

    def __init__(self, directory, config: RASConfig | None = None, *, providers=None, steps=None):
        require_extra("onnx", "onnx", "onnxruntime", feature="rascompile.OnnxRunner")
        super().__init__(directory, config, steps=steps)
        import onnxruntime as ort

        self.providers = providers or ["CPUExecutionProvider"]
        self.sessions = {
            graph: ort.InferenceSession(model, providers=self.providers)
            for graph, model in load_onnx_graphs(self.directory, self.manifest).items()
        }

    def execute(self, graph: str, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        session = self.sessions[graph]
        arrays = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in feeds.items()}
        return [torch.from_numpy(a) for a in session.run(None, arrays)]


def load_onnx_graphs(directory: str | Path, manifest: dict) -> dict[str, bytes | str]:
    """For "dense" and "ras": the ONNX model checked against the manifest, as the bytes that were
    checked (or, for a model that keeps tensors in external files, its path once those files are
    checked too), ready for ``onnxruntime.InferenceSession``."""
    import onnx

    if manifest.get("runtime", "onnx") != "onnx":
        raise ManifestError(
            f"{where(directory)}: field 'runtime' is {manifest['runtime']!r}; this directory holds no ONNX graphs "
            "(run it with rascompile.deploy.tensorrt.TorchTensorRTRunner)"
        )
    models: dict[str, bytes | str] = {}
    for graph in GRAPHS:
        data = read_verified(directory, manifest, manifest[graph], graph)
        try:
            model = onnx.load_model_from_string(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises its own DecodeError
            raise ManifestError(
                f"{where(directory)}: field {graph!r} names {manifest[graph]!r}, which is not an ONNX model: {exc}"
            ) from None
        check_onnx_graph(directory, manifest, graph, model)
        external = external_data_files(model)
        for name in external:
            verify_file(directory, manifest, name, f"{graph} (external data of {manifest[graph]})")
        models[graph] = str(Path(directory) / manifest[graph]) if external else data
    return models


def _checked(name: str, value, record: dict) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"input {name!r} is a {type(value).__name__}; the exported model takes a tensor")
    shape, dtype = list(value.shape), str(value.dtype).removeprefix("torch.")
    if shape != record["shape"]:
        raise ValueError(
            f"input {name!r} has shape {shape}; the model was exported for {record['shape']} "
            "(export again for another resolution or batch size)"
        )
    if dtype != record["dtype"]:
        raise ValueError(f"input {name!r} has dtype {dtype}; the model was exported for {record['dtype']}")
    return value


def _check_baked(record: dict, value) -> None:
    from .onnx_export import _checksum

    name = record["name"]
    if not isinstance(value, torch.Tensor) or list(value.shape) != record["shape"]:
        raise ValueError(f"input {name!r} was baked into the exported graphs with shape {record['shape']}; got another")
    if not np.allclose(_checksum(value), record["checksum"], rtol=1e-6):
        raise ValueError(f"input {name!r} differs from the tensor baked into the exported graphs; export again")
