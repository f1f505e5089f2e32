"""``rascompile export``: a diffusers pipeline's transformer to ONNX step graphs (and TensorRT engines).

    rascompile export ./sd3-medium ./sd3-onnx --height 1024 --width 1024 --prompt "a photo"
    rascompile export ./pipe ./out --embeddings prompt.safetensors --tensorrt --fp16

The pipeline is loaded with ``DiffusionPipeline.from_pretrained`` from a local directory and
called once, for one step, to trace its transformer at the given resolution and batch. Prompt
embeddings can come from a safetensors file whose keys are the pipeline's call arguments
(``prompt_embeds``, ``pooled_prompt_embeds``, ...), for pipelines saved without text encoders.

Bad input (a directory that is no pipeline, unreadable weights or embeddings, options out of range,
an output path that cannot be written) ends with one line ``error: ...`` and exit status 2, and is
found before the pipeline is loaded wherever the check does not need the loaded pipeline.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .main import check_output_directory, echo, finite_float, positive_int, ratio

#: ONNX opset used when --opset is not given.
DEFAULT_OPSET = 18
#: Largest --height / --width accepted before loading anything; the loaded transformer may allow less (its
#: position embedding's size), which is checked before tracing.
MAX_SIDE = 16384
#: Call arguments that rascompile sets itself, so an embeddings file may not hold them.
_SET_BY_COMMAND = {"height", "width", "num_inference_steps", "guidance_scale", "num_images_per_prompt"}
_SET_BY_COMMAND |= {"output_type", "return_dict", "generator"}
_TEXT_ARGUMENT = re.compile(r"^(negative_)?prompt(_\d+)?$")  # prompt, prompt_2, negative_prompt_3: strings


class InputError(ValueError):
    """Bad input to ``rascompile export``: reported as one line ``error: ...`` with exit status 2."""


def opset_range() -> tuple[int, int]:
    """The ONNX opsets ``rascompile.export`` accepts (lowest, highest): torch 2.13's dynamo exporter implements its
    operators at opset 18 (for an older opset it tries a version conversion and, when that fails, as it does for
    these graphs, silently writes opset 18) and converts up to ``torch.onnx``'s newest opset (23)."""
    try:
        from ..deploy.onnx_export import opset_range as exporter_range
    except ImportError:  # an onnx_export without it: the same bounds, from torch
        from torch.onnx._constants import ONNX_MAX_OPSET

        return DEFAULT_OPSET, ONNX_MAX_OPSET
    return exporter_range()


def _opset(text: str) -> int:
    low, high = opset_range()
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int from {low} to {high}, got {echo(text)}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(
            f"opset {value} is not supported: torch {torch.__version__.split('+')[0]}'s ONNX exporter writes "
            f"opsets {low} to {high}"
        )
    return value


def _side(text: str) -> int:
    value = positive_int(text)
    if value > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SIDE} pixels, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="local directory of a diffusers pipeline (DiffusionPipeline.from_pretrained)")
    parser.add_argument("output", help="directory for dense.onnx, ras.onnx and rascompile_export.json")
    parser.add_argument(
        "--height",
        type=_side,
        default=None,
        help="image height in pixels, a multiple of the VAE scale factor x the patch size (default: the pipeline's)",
    )
    parser.add_argument("--width", type=_side, default=None, help="image width in pixels (default: the pipeline's)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt", default=None, help="prompt for the tracing call (needs the text encoders; default empty)"
    )
    prompt.add_argument(
        "--embeddings",
        metavar="FILE",
        default=None,
        help="safetensors file of prompt embeddings, named after the pipeline's call arguments (prompt_embeds, "
        "pooled_prompt_embeds, negative_prompt_embeds, ...), one row per prompt: float tensors are converted to "
        "the pipeline's float32, and every prompt tensor is repeated for --num-images-per-prompt",
    )
    parser.add_argument("--num-images-per-prompt", type=positive_int, default=1, help="images per prompt (default 1)")
    parser.add_argument(
        "--guidance-scale",
        type=finite_float,
        default=None,
        help="classifier-free guidance scale; > 1 doubles the batch (default: the pipeline's)",
    )
    parser.add_argument(
        "--opset",
        type=_opset,
        default=DEFAULT_OPSET,
        help=f"ONNX opset, from {DEFAULT_OPSET} (the default) to the newest torch's exporter writes (23 in torch 2.13)",
    )
    parser.add_argument(
        "--no-fused-kv-projection", action="store_true", help="export the unfused K/V projection chains"
    )
    parser.add_argument("--no-check", action="store_true", help="skip running the files once with onnxruntime")
    parser.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (needs a CUDA GPU)")
    parser.add_argument(
        "--opt-ratio",
        type=ratio,
        default=0.5,
        help="sample ratio in (0, 1] the TensorRT profile is tuned for (default 0.5)",
    )
    parser.add_argument("--fp16", action="store_true", help="build the TensorRT engines with FP16 enabled")


# ============================================================================================ the pipeline directory


def read_model_index(pipeline: Path) -> dict:
    """``model_index.json`` of a pipeline directory, checked: it exists, is a JSON object and names a class."""
    index_path = pipeline / "model_index.json"
    if not index_path.is_file():
        raise InputError(f"{pipeline} is not a diffusers pipeline: it has no model_index.json")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{index_path} cannot be read as JSON: {exc}") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise InputError(f"{index_path} is not a diffusers model index (no _class_name)")
    if not _present(index.get("transformer")):
        raise InputError(
            f"{pipeline} ({index['_class_name']}) has no transformer component: rascompile exports the "
            "transformer of a diffusion-transformer pipeline"
        )
    return index


def _present(component) -> bool:
    return isinstance(component, list) and len(component) == 2 and component != [None, None]


def _absent_components(index: dict) -> dict:
    """Components saved as absent (``[null, null]`` in model_index.json, e.g. no text encoders), passed as None."""
    return {name: None for name, value in index.items() if isinstance(value, list) and value == [None, None]}


def _text_encoders(index: dict) -> tuple[list[str], bool]:
    """(the text encoder components the index names, whether at least one of them was saved)."""
    names = [name for name in index if name.startswith("text_encoder")]
    return names, any(_present(index[name]) for name in names)


def _pipeline_class(index: dict):
    import diffusers

    cls = getattr(diffusers, index["_class_name"], None)
    return cls if isinstance(cls, type) else None


def _call_parameters(cls) -> dict[str, inspect.Parameter] | None:
    if cls is None:
        return None
    try:
        parameters = dict(inspect.signature(cls.__call__).parameters)
    except (TypeError, ValueError):
        return None
    parameters.pop("self", None)
    return parameters


# ============================================================================================ the call


def load_embeddings(path: Path, cls, parameters: dict | None, num_images_per_prompt: int) -> dict:
    """The tensors of an embeddings file as call arguments: checked against the pipeline class's call arguments,
    float tensors converted to float32, prompt tensors repeated ``num_images_per_prompt`` times per prompt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise InputError(f"--embeddings {path} does not exist")
    if not path.is_file():
        raise InputError(f"--embeddings {path} is not a file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"--embeddings {path} is not a readable safetensors file: {exc}") from None
    if not tensors:
        raise InputError(f"--embeddings {path} holds no tensors")
    if parameters is not None:
        allowed = [p for p in parameters if p not in _SET_BY_COMMAND and not _TEXT_ARGUMENT.match(p)]
        extra = sorted(k for k in tensors if k not in allowed)
        if extra:
            prompt_args = [p for p in allowed if "prompt" in p]
            verb = "is not a call argument" if len(extra) == 1 else "are not call arguments"
            raise InputError(
                f"--embeddings {path}: {', '.join(map(echo, extra))} {verb} of {cls.__name__} that a file may set "
                f"(its prompt tensor arguments: {', '.join(prompt_args)})"
            )
        if "prompt_embeds" in parameters and "prompt_embeds" not in tensors:
            raise InputError(f"--embeddings {path} has no prompt_embeds (it holds {', '.join(sorted(tensors))})")
    kwargs = {}
    for name, value in tensors.items():
        if value.is_complex():
            raise InputError(f"--embeddings {path}: {name} is complex ({value.dtype}); expected real tensors")
        kwargs[name] = value.float() if value.is_floating_point() else value
    # Pipelines do not repeat embeddings given to them for num_images_per_prompt (only the latents they make),
    # so the transformer would see a batch of P embeddings against P x I latents: repeat them here and call with
    # num_images_per_prompt=1, which gives every image of a prompt its prompt's row.
    prompt_tensors = [name for name in kwargs if "prompt" in name]
    for name in prompt_tensors:
        if kwargs[name].dim() == 0:
            raise InputError(f"--embeddings {path}: {name} is a scalar; prompt tensors need one row per prompt")
    batches = {name: kwargs[name].shape[0] for name in prompt_tensors}
    reference = "prompt_embeds" if "prompt_embeds" in batches else next(iter(batches), None)
    for name, batch in batches.items():
        if batch != batches[reference]:
            raise InputError(
                f"--embeddings {path}: {name} has {batch} rows, but {reference} has {batches[reference]}; "
                "every prompt tensor needs one row per prompt"
            )
    if num_images_per_prompt > 1:
        for name in prompt_tensors:
            kwargs[name] = kwargs[name].repeat_interleave(num_images_per_prompt, dim=0)
    return kwargs


def call_kwargs_from_args(args: argparse.Namespace, index: dict | None = None) -> dict:
    """The tracing call's arguments, checked against the pipeline (its ``model_index.json``) where known."""
    index = index or {}
    cls = _pipeline_class(index) if index else None
    parameters = _call_parameters(cls)
    kwargs: dict = {"num_images_per_prompt": args.num_images_per_prompt}
    for name in ("height", "width", "guidance_scale"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    encoders, have_encoders = _text_encoders(index)
    if args.embeddings is not None:
        kwargs.update(load_embeddings(Path(args.embeddings), cls, parameters, args.num_images_per_prompt))
        kwargs["num_images_per_prompt"] = 1  # the embeddings are repeated per image already
        if encoders and not have_encoders and parameters is not None and "negative_prompt_embeds" in parameters:
            guidance = args.guidance_scale
            if guidance is None:
                default = parameters.get("guidance_scale")
                guidance = default.default if default is not None else None
            if isinstance(guidance, (int, float)) and guidance > 1 and "negative_prompt_embeds" not in kwargs:
                raise InputError(
                    f"--embeddings {args.embeddings} has no negative_prompt_embeds, which classifier-free guidance "
                    f"(guidance scale {guidance:g}) needs, and the pipeline has no text encoders to make them: add "
                    "them to the file, or pass --guidance-scale 1"
                )
        return kwargs
    if encoders and not have_encoders:
        asked = "--prompt needs" if args.prompt is not None else "tracing with a prompt needs"
        raise InputError(
            f"{asked} the pipeline's text encoders, but {args.pipeline} was saved without them "
            f"({', '.join(encoders)} are null in model_index.json): give prompt embeddings with --embeddings FILE"
        )
    if parameters is not None and "prompt" not in parameters:
        raise InputError(f"{cls.__name__} takes no prompt: give its inputs with --embeddings FILE")
    kwargs["prompt"] = args.prompt or ""
    return kwargs


def check_size(pipe, call_kwargs: dict) -> None:
    """Refuse a --height/--width the loaded pipeline cannot trace: not a multiple of its VAE scale factor x the
    transformer's patch size, or beyond what its position embedding covers (``pos_embed_max_size``)."""
    config = getattr(pipe.transformer, "config", None)
    patch = getattr(config, "patch_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if not (isinstance(patch, int) and isinstance(scale, int) and patch > 0 and scale > 0):
        return
    max_patches = getattr(config, "pos_embed_max_size", None)
    for name in ("height", "width"):
        value = call_kwargs.get(name)
        if value is None:
            continue
        multiple = scale * patch
        if value % multiple:
            lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
            nearest = f"{lower} or {upper}" if lower else f"{upper}"
            raise InputError(
                f"--{name} {value} is not a multiple of {multiple} (VAE scale factor {scale} x patch size {patch}); "
                f"use {nearest}"
            )
        if isinstance(max_patches, int) and value > max_patches * multiple:
            raise InputError(
                f"--{name} {value} is larger than the {max_patches * multiple} pixels the transformer's position "
                f"embedding covers (pos_embed_max_size {max_patches} patches x patch size {patch} x VAE scale "
                f"factor {scale})"
            )


# ============================================================================================ the command


def load_pipeline(args: argparse.Namespace, *, before_loading: Callable[[], None] | None = None) -> tuple:
    """``(pipe, call_kwargs)``: the local pipeline ``args.pipeline`` names, loaded in fp32 with its absent
    components as None, and the call arguments the options give, checked against it (``check_size``).

    ``before_loading`` runs after the cheap checks and before the slow load. Every bad input raises
    ``InputError`` (a ``ValueError``) with the one line to print; the ``export`` and ``check`` commands share this.
    """
    pipeline = Path(args.pipeline)
    if not pipeline.is_dir():
        raise InputError(f"pipeline {pipeline} is not a directory (give a local diffusers pipeline)")
    index = read_model_index(pipeline)
    if before_loading is not None:
        before_loading()
    call_kwargs = call_kwargs_from_args(args, index)

    from diffusers import DiffusionPipeline
    from safetensors import SafetensorError

    try:
        pipe = DiffusionPipeline.from_pretrained(str(pipeline), dtype=torch.float32, **_absent_components(index))
    # missing or damaged files, configs that are not JSON, a component whose library is not installed (diffusers'
    # pipelines with text encoders need transformers)
    except (OSError, ValueError, ImportError, SafetensorError) as exc:
        raise InputError(f"cannot load the pipeline {pipeline}: {_first_line(exc)}") from exc
    if getattr(pipe, "transformer", None) is None:
        raise InputError(f"{pipeline} loads as a {type(pipe).__name__} without a transformer")
    check_size(pipe, call_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe, call_kwargs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main_from_args(args: argparse.Namespace) -> int:
    from .._extras import require_extra
    from .main import quiet_third_party

    quiet_third_party()
    # the exporter writes with onnx and onnxscript; the check after it runs the files with onnxruntime
    modules = ("onnx", "onnxscript") if args.no_check else ("onnx", "onnxscript", "onnxruntime")
    require_extra("onnx", *modules, feature="rascompile export")
    if args.tensorrt:  # before the export, not after it
        require_extra("tensorrt", "tensorrt", feature="rascompile export --tensorrt")
    from ..deploy.onnx_export import ExportError, export

    try:
        pipe, call_kwargs = load_pipeline(args, before_loading=lambda: check_output_directory(args.output, "output"))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"tracing {type(pipe.transformer).__name__} of {type(pipe).__name__} ...", file=sys.stderr)
        result = export(
            pipe,
            args.output,
            call_kwargs=call_kwargs,
            opset=args.opset,
            fused_kv_projection=not args.no_fused_kv_projection,
            check=not args.no_check,
        )
    except (ExportError, ValueError) as exc:
        print(f"error: {_first_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing the output
        print(f"error: cannot write {args.output}: {_first_line(exc)}", file=sys.stderr)
        return 2
    m = result.manifest
    print(f"wrote {result.dense} and {result.ras}")
    inputs = ", ".join(f"{i['name']} {i['shape']}" for i in m["inputs"])
    print(f"  inputs: {inputs}")
    print(f"  RAS step: + ras_active_idx [{m['batch_size']}, k] with 1 <= k <= {m['num_tokens']},")
    print(f"    the output cache and {len(m['kv_caches'])} K/V caches (updated copies are outputs)")
    if not args.no_check:
        print("  checked: onnxruntime equals PyTorch on both graphs")
    if args.tensorrt:
        from ..deploy.tensorrt import build_engines

        try:
            paths = build_engines(result.directory, opt_ratio=args.opt_ratio, fp16=args.fp16)
        except (RuntimeError, ImportError, ValueError) as exc:
            print(f"error: TensorRT: {_first_line(exc)}", file=sys.stderr)
            return 2
        print(f"wrote {paths['dense']} and {paths['ras']}")
    return 0
