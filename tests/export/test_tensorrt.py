"""TensorRT engines from the exported graphs. These run only where a CUDA GPU and ``tensorrt`` (or
``torch_tensorrt``) are installed, and are skipped with the reason otherwise (see ``pytest -ra``)."""

import importlib.util

import pytest
import torch

import rascompile
from rascompile import OnnxRunner, RASConfig
from rascompile.deploy.tensorrt import k_profile
from tests.support.models import sd3_call_kwargs, tiny_sd3_pipeline

CONFIG = RASConfig(num_inference_steps=8, sample_ratio=0.5, scheduler_start_step=2, error_reset_steps=(5,))


def _needs(module: str):
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU")
    if importlib.util.find_spec(module) is None:
        reasons.append(f"{module} is not installed (pip install rascompile[tensorrt])")
    return pytest.mark.skipif(bool(reasons), reason=f"TensorRT test not run: {'; '.join(reasons)}")


def test_k_profile():
    manifest = {"num_tokens": 4096}
    assert k_profile(manifest, 0.5) == (1, 2048, 4096)
    assert k_profile(manifest, 1.0) == (1, 4096, 4096)
    assert k_profile({"num_tokens": 3}, 0.1) == (1, 1, 3)
    with pytest.raises(ValueError, match=r"opt_ratio=0 is invalid: must be in \(0, 1\]"):
        k_profile(manifest, 0)


def _exported(tmp_path):
    pipe = tiny_sd3_pipeline()
    backend = rascompile.apply(pipe, CONFIG, inner_backend="aot_eager")
    pipe(**sd3_call_kwargs(steps=8))
    return rascompile.export(backend, tmp_path)


def _generation(runner):
    pipe = tiny_sd3_pipeline()
    runner.for_pipeline(pipe)
    return pipe(**sd3_call_kwargs(steps=8))[0], runner.controller.history


@_needs("tensorrt")
def test_tensorrt_engines_run_a_generation(tmp_path):
    from rascompile.deploy.tensorrt import TensorRTRunner, build_engines

    result = _exported(tmp_path)
    paths = build_engines(result.directory, opt_ratio=0.5)
    assert paths["dense"].exists() and paths["ras"].exists()
    expected, expected_history = _generation(OnnxRunner(result.directory, CONFIG))
    got, history = _generation(TensorRTRunner(result.directory, CONFIG))
    assert [d.kind for d in history] == [d.kind for d in expected_history]
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)  # TensorRT may use TF32


@_needs("torch_tensorrt")
def test_torch_tensorrt_modules_run_a_generation(tmp_path):
    from rascompile.deploy.tensorrt import TorchTensorRTRunner, compile_torch_tensorrt

    result = _exported(tmp_path / "onnx")
    pipe = tiny_sd3_pipeline()
    compile_torch_tensorrt(pipe, tmp_path / "trt", call_kwargs=sd3_call_kwargs(steps=8))
    expected, _ = _generation(OnnxRunner(result.directory, CONFIG))
    got, _ = _generation(TorchTensorRTRunner(tmp_path / "trt", CONFIG, trust=True))  # we wrote it just now
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
