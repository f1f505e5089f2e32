"""``rascompile export``: a diffusers pipeline's transformer to ONNX step graphs (and TensorRT engines).

    rascompile export ./sd3-medium ./sd3-onnx --height 1024 --width 1024 --prompt "a photo"
    rascompile export ./pipe ./out --embeddings prompt.safetensors --tensorrt --fp16

The pipeline is loaded with ``DiffusionPipeline.from_pretrained`` from a local directory and
called once, for one step, to trace its transformer at the given resolution and batch. Prompt
embeddings can come from a safetensors file whose keys are the pipeline's call arguments
(``prompt_embeds``, ``pooled_prompt_embeds``, ...), for pipelines saved without text encoders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline", help="local directory of a diffusers pipeline (DiffusionPipeline.from_pretrained)")
    parser.add_argument("output", help="directory for dense.onnx, ras.onnx and rascompile_export.json")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: the pipeline's)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the pipeline's)")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="prompt for the tracing call (needs the text encoders)")
    prompt.add_argument(
        "--embeddings", metavar="FILE", default=None, help="safetensors file of prompt embeddings (call arguments)"
    )
    parser.add_argument("--num-images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="classifier-free guidance scale; > 1 doubles the batch"
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument(
        "--no-fused-kv-projection", action="store_true", help="export the unfused K/V projection chains"
    )
    parser.add_argument("--no-check", action="store_true", help="skip running the files once with onnxruntime")
    parser.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (needs a CUDA GPU)")
    parser.add_argument(
        "--opt-ratio", type=float, default=0.5, help="sample ratio the TensorRT profile is tuned for (default 0.5)"
    )
    parser.add_argument("--fp16", action="store_true", help="build the TensorRT engines with FP16 enabled")


def call_kwargs_from_args(args: argparse.Namespace) -> dict:
    kwargs: dict = {"num_images_per_prompt": args.num_images_per_prompt}
    for name in ("height", "width", "guidance_scale"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.embeddings is not None:
        from safetensors.torch import load_file

        path = Path(args.embeddings)
        if not path.exists():
            raise FileNotFoundError(f"--embeddings {path} does not exist")
        kwargs.update(load_file(str(path)))
    else:
        kwargs["prompt"] = args.prompt
    return kwargs


def _absent_components(pipeline: Path) -> dict:
    """Components saved as absent (``[null, null]`` in model_index.json, e.g. no text encoders), passed as None."""
    index = json.loads((pipeline / "model_index.json").read_text()) if (pipeline / "model_index.json").exists() else {}
    return {name: None for name, value in index.items() if isinstance(value, list) and value == [None, None]}


def main_from_args(args: argparse.Namespace) -> int:
    from diffusers import DiffusionPipeline

    from .onnx_export import ExportError, export

    pipeline = Path(args.pipeline)
    if not pipeline.is_dir():
        print(f"error: pipeline {pipeline} is not a directory (give a local diffusers pipeline)", file=sys.stderr)
        return 2
    try:
        call_kwargs = call_kwargs_from_args(args)
        pipe = DiffusionPipeline.from_pretrained(str(pipeline), dtype=torch.float32, **_absent_components(pipeline))
        pipe.set_progress_bar_config(disable=True)
        print(f"tracing {type(pipe.transformer).__name__} of {type(pipe).__name__} ...", file=sys.stderr)
        result = export(
            pipe,
            args.output,
            call_kwargs=call_kwargs,
            opset=args.opset,
            fused_kv_projection=not args.no_fused_kv_projection,
            check=not args.no_check,
        )
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
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
        from .tensorrt import build_engines

        try:
            paths = build_engines(result.directory, opt_ratio=args.opt_ratio, fp16=args.fp16)
        except (RuntimeError, ImportError) as exc:
            print(f"error: TensorRT: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {paths['dense']} and {paths['ras']}")
    return 0
