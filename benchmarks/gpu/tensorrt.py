"""The ``tensorrt`` stage: ``rascompile bench``'s SD3-shaped mid-size model exported to ONNX (``rascompile.export``);
an OnnxRunner generation, TensorRT engines (fp16) and a torch-tensorrt compile, each generating against the PyTorch RAS
generation (decisions, latents) and timed per step against PyTorch inductor. Without CUDA or TensorRT the parts that
need them are skipped, saying why."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

import rascompile
from rascompile import OnnxRunner, RASConfig
from rascompile.bench.settings import SMOKE, BenchSettings
from rascompile.bench.timing import time_interleaved
from rascompile.bench.workload import (
    _random_active,
    build_model,
    capture_step,
    make_inputs,
    prepare_workload,
    whole_graph,
)

from .suite import Stage, Suite

TRT_CONFIG = dict(num_inference_steps=8, sample_ratio=0.5, scheduler_start_step=2, error_reset_steps=(5,))
TRT_TOLERANCE = {"onnxruntime": 1e-4, "tensorrt": 5e-2, "torch-tensorrt": 1e-2}  # rtol = atol, on latents
TRT_PART = "TensorRT engines: build_engines, TensorRTRunner generation and step times"
TTRT_PART = "torch-tensorrt: compile_torch_tensorrt, TorchTensorRTRunner generation and step times"


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.detach().float().cpu(), expected.detach().float().cpu()
    scale = expected.abs().max().item()
    return (got - expected).abs().max().item() / max(scale, 1e-12)


def compare_generations(got, history, expected, expected_history, tol: float) -> dict:
    kinds = [d.kind for d in history]
    expected_kinds = [d.kind for d in expected_history]
    pairs = [(a, b) for a, b in zip(history, expected_history) if a.kind == b.kind == "ras"]
    same = sum(torch.equal(a.active_idx.cpu(), b.active_idx.cpu()) for a, b in pairs)
    got_f, exp_f = got.detach().float().cpu(), expected.detach().float().cpu()
    return {
        "kinds": kinds,
        "kinds_equal": kinds == expected_kinds,
        "ras_steps": kinds.count("ras"),
        "ras_steps_same_tokens": int(same),
        "max_abs_diff": (got_f - exp_f).abs().max().item(),
        "relative_error": relative_error(got_f, exp_f),
        "tolerance": tol,
        "within_tolerance": bool(torch.allclose(got_f, exp_f, rtol=tol, atol=tol)),
    }


def runner_feeds(runner, inputs: dict, active_idx: torch.Tensor | None) -> dict:
    """The feeds ``StepRunner.run_dense`` / ``run_active`` hand ``execute`` (caches: the runner's own)."""
    if active_idx is None:
        return runner.signature.feeds(inputs)
    output_cache, kv_caches = runner.controller.caches()
    return runner.signature.feeds(inputs, active_idx.to(torch.int64), output_cache, kv_caches)


def tensorrt_engine_call(runner, graph: str, feeds: dict) -> Callable:
    """One engine execution on device-resident inputs and outputs (no host copies, unlike ``execute``)."""
    from rascompile.deploy.tensorrt import _torch_dtype

    engine, context = runner.engines[graph]
    keep = []
    for name, tensor in feeds.items():
        tensor = tensor.cuda().contiguous()
        keep.append(tensor)
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    for name in runner.output_names(graph):
        out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=_torch_dtype(engine.get_tensor_dtype(name)),
                          device="cuda")  # fmt: skip
        keep.append(out)
        context.set_tensor_address(name, out.data_ptr())
    stream = torch.cuda.current_stream()

    def run():
        keep  # noqa: B018 - the buffers live as long as the closure
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {graph}.engine")

    return run


def stage_tensorrt(suite: Suite, st: Stage) -> None:
    base = BenchSettings(**SMOKE) if suite.dry else BenchSettings()
    settings = replace(base, steps=TRT_CONFIG["num_inference_steps"], inner_backend="eager", progress=False)
    config = RASConfig(**TRT_CONFIG)
    have = {m: importlib.util.find_spec(m) is not None for m in ("tensorrt", "torch_tensorrt")}
    st.data.update(
        {
            "model": f"SD3Transformer2DModel, {settings.layers} layers, hidden {settings.hidden} "
            f"({settings.heads} heads x {settings.head_dim}), {settings.latent_size}x{settings.latent_size} latents "
            f"= {settings.num_tokens} image tokens, {settings.text_tokens} text tokens, CFG batch 2",
            "config": dict(TRT_CONFIG), "installed": have, "generations": {}, "per_step": [],
        }
    )  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="gpu_suite_trt_"))
    try:
        _tensorrt_body(suite, st, settings, config, have, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _tensorrt_body(suite: Suite, st: Stage, settings: BenchSettings, config, have: dict, workdir: Path) -> None:
    steps = config.num_inference_steps
    repeats = 3 if suite.dry else suite.args.repeats
    gens = st.data["generations"]

    with st.step("build the mid-size model (fp32, CPU) and trace it"):
        model = build_model(settings)
        inputs = make_inputs(settings)
        w = prepare_workload(settings, model, inputs, config)
        w.compiled(**w.first_call)
        graph, reason = whole_graph(w.backend)
        if reason is not None:
            raise RuntimeError(f"the RAS rewrite did not apply: {reason}")
    with st.step("export to ONNX (rascompile.export, onnxruntime check)"):
        start = time.perf_counter()
        exported = rascompile.export(w.backend, workdir / "onnx")
        st.data["export_s"] = time.perf_counter() - start
        manifest = exported.manifest
        st.data["opset"] = manifest.get("opset")
    with st.step(f"PyTorch RAS generation, {steps} steps (fp32 CPU reference)"):
        graph.controller.reset()
        expected = w.family.denoise(w.compiled, settings, inputs, steps)
        expected_history = list(graph.controller.history)
        kinds = [d.kind for d in expected_history]
        gens["pytorch (reference)"] = {"kinds": kinds, "device": "cpu", "precision": "fp32"}

    def generation(label: str, runner, tol: float, precision: str) -> None:
        got = w.family.denoise(runner, settings, inputs, steps)
        result = compare_generations(got, runner.controller.history, expected, expected_history, tol)
        gens[label] = result | {"precision": precision}
        st.check(
            f"{label}: decisions identical to PyTorch",
            result["kinds_equal"] and result["ras_steps_same_tokens"] == result["ras_steps"],
            f"step kinds {'equal' if result['kinds_equal'] else 'differ'}, {result['ras_steps_same_tokens']} of "
            f"{result['ras_steps']} RAS steps select the same tokens",
        )
        st.check(
            f"{label}: image within tolerance of PyTorch",
            result["within_tolerance"],
            f"max |diff| {result['max_abs_diff']:.2e} (relative {result['relative_error']:.2e}), rtol = atol = {tol:g}",
        )

    with st.step(f"OnnxRunner generation, {steps} steps (onnxruntime CPU)"):
        generation("onnxruntime", OnnxRunner(exported.directory, config), TRT_TOLERANCE["onnxruntime"], "fp32")

    reasons = [] if suite.cuda else ["no CUDA device"]
    trt_reason = "; ".join(reasons + ([] if have["tensorrt"] else ["tensorrt is not installed"]))
    ttrt_reason = "; ".join(reasons + ([] if have["torch_tensorrt"] else ["torch_tensorrt is not installed"]))
    if not suite.cuda:
        st.skip_part(TRT_PART, trt_reason)
        st.skip_part(TTRT_PART, ttrt_reason)
        st.skip_part("PyTorch inductor step times on CUDA (the TensorRT baseline)", "no CUDA device")
        return

    from rascompile.deploy.tensorrt import k_profile

    n, batch = manifest["num_tokens"], manifest["batch_size"]
    k_opt = k_profile(manifest, config.sample_ratio)[1]
    idx = _random_active(batch, n, k_opt, 11)
    step_inputs = exported.signature.placeholder_values(graph.signature.input_names, graph.example_inputs)
    rows = st.data["per_step"]

    def add_rows(runtime: str, precision: str, timed: dict, note: str) -> None:
        for name, m in timed.items():
            k = n if name == "dense" else k_opt
            row = {"runtime": runtime, "precision": precision, "graph": name, "k": k, "note": note}
            rows.append(row | {"median_ms": 1e3 * m["median_s"]})

    if have["tensorrt"]:
        from rascompile.deploy.tensorrt import TensorRTRunner, build_engines

        with st.step("build TensorRT engines (fp16, opt k = 0.5 N)"):
            start = time.perf_counter()
            build_engines(exported.directory, opt_ratio=config.sample_ratio, fp16=True)
            st.data["engine_build_s"] = time.perf_counter() - start
        with st.step(f"TensorRTRunner generation, {steps} steps"):
            trt = TensorRTRunner(exported.directory, config)
            generation("tensorrt", trt, TRT_TOLERANCE["tensorrt"], "fp16 engines, fp32 inputs")
        with st.step("time TensorRT steps (engine only, and the runner's execute with host copies)"):
            dense_feeds, ras_feeds = runner_feeds(trt, step_inputs, None), runner_feeds(trt, step_inputs, idx)
            timed = time_interleaved(
                {"dense": tensorrt_engine_call(trt, "dense", dense_feeds),
                 f"ras k={k_opt}": tensorrt_engine_call(trt, "ras", ras_feeds)}, repeats, "cuda",
            )  # fmt: skip
            add_rows("TensorRT engine", "fp16", timed, "inputs and outputs on the GPU")
            timed = time_interleaved(
                {"dense": lambda: trt.execute("dense", dense_feeds),
                 f"ras k={k_opt}": lambda: trt.execute("ras", ras_feeds)}, repeats, "cuda",
            )  # fmt: skip
            add_rows("TensorRTRunner.execute", "fp16", timed, "host -> device -> host every step, caches included")
            del trt
    else:
        st.skip_part(TRT_PART, trt_reason)

    def inductor_rows(precision: str, dtype: torch.dtype) -> None:
        dev = suite.device
        with st.step(f"PyTorch inductor step times ({precision}, CUDA; the first calls compile)"):
            model_gpu = copy.deepcopy(model).to(dev, dtype)
            torch._dynamo.reset()
            captured = capture_step(settings, model_gpu, make_inputs(settings, dev, dtype))
            g, _ = captured.graph(config, inner_backend="inductor")
            args = captured.args
            output_cache, kv_caches = g.controller.caches()
            for cache in [output_cache, *kv_caches]:
                cache.zero_()
            idx_gpu = idx.to(dev)
            timed = time_interleaved(
                {"dense": lambda: g.run_dense(*args), f"ras k={k_opt}": lambda: g.run_active(idx_gpu, *args)},
                repeats, dev,
            )  # fmt: skip
            add_rows("PyTorch inductor", precision, timed, "fused K/V projection (default on CUDA)")
        torch._dynamo.reset()
        if dev == "cuda":
            torch.cuda.empty_cache()

    inductor_rows("fp16", torch.float16)  # the baseline of the fp16 TensorRT engines

    if have["torch_tensorrt"]:
        from rascompile.deploy.tensorrt import TorchTensorRTRunner, compile_torch_tensorrt

        with st.step("torch-tensorrt: compile the dense and RAS step modules"):
            start = time.perf_counter()
            compile_torch_tensorrt(w.backend, workdir / "torch_trt", opt_ratio=config.sample_ratio)
            st.data["torch_tensorrt_compile_s"] = time.perf_counter() - start
        with st.step(f"TorchTensorRTRunner generation, {steps} steps"):
            ttrt = TorchTensorRTRunner(workdir / "torch_trt", config, trust=True)  # written just now, by this run
            generation("torch-tensorrt", ttrt, TRT_TOLERANCE["torch-tensorrt"], "fp32 (torch-tensorrt's default)")
        with st.step("time torch-tensorrt steps (device-resident inputs)"):
            dense_feeds = [t.cuda() for t in runner_feeds(ttrt, step_inputs, None).values()]
            ras_feeds = [t.cuda() for t in runner_feeds(ttrt, step_inputs, idx).values()]
            timed = time_interleaved(
                {"dense": lambda: ttrt.modules["dense"](*dense_feeds),
                 f"ras k={k_opt}": lambda: ttrt.modules["ras"](*ras_feeds)}, repeats, "cuda",
            )  # fmt: skip
            add_rows("torch-tensorrt", "fp32", timed, "inputs and outputs on the GPU")
        inductor_rows("fp32", torch.float32)  # the baseline of torch-tensorrt's fp32 modules
    else:
        st.skip_part(TTRT_PART, ttrt_reason)
