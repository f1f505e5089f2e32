"""Export: ONNX step graphs run by onnxruntime equal the PyTorch path over whole generations."""

import json
from pathlib import Path

import onnx
import pytest
import torch

import rascompile
from rascompile import ExportError, OnnxRunner, RASBackend, RASConfig
from tests.support.models import lumina_call_kwargs, sd3_call_kwargs, tiny_lumina_pipeline, tiny_sd3_pipeline
from tests.support.synthetic import TokenPoolingDiT

STEPS = 8
CONFIG = RASConfig(num_inference_steps=STEPS, sample_ratio=0.5, scheduler_start_step=2, error_reset_steps=(5,))
MODELS = {
    "sd3": (tiny_sd3_pipeline, sd3_call_kwargs),
    "lumina": (tiny_lumina_pipeline, lumina_call_kwargs),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    """One PyTorch RAS generation (aot_eager), the export of its graphs, and the compiled graph."""
    build, kwargs_fn = MODELS[request.param]
    torch._dynamo.reset()
    pipe = build()
    backend = rascompile.apply(pipe, CONFIG, inner_backend="aot_eager")
    expected = pipe(**kwargs_fn(steps=STEPS))[0]
    history = backend.graphs[0].controller.history
    directory = tmp_path_factory.mktemp(f"export_{request.param}")
    result = rascompile.export(backend, directory)
    yield request.param, result, expected, history, backend.graphs[0]
    torch._dynamo.reset()


def test_files_and_manifest(exported):
    name, result, _, _, _ = exported
    manifest = json.loads((result.directory / "rascompile_export.json").read_text())
    assert result.dense.exists() and result.ras.exists()
    assert manifest["latents"] == "hidden_states" and manifest["timestep"] == "timestep"
    ras = onnx.load(str(result.ras))
    inputs = {i.name: i for i in ras.graph.input}
    k_dim = inputs["ras_active_idx"].type.tensor_type.shape.dim[1]
    assert k_dim.dim_param, "k must be a dynamic axis"
    cache_names = [manifest["output_cache"]["name"], *(c["name"] for c in manifest["kv_caches"])]
    assert [o.name for o in ras.graph.output] == ["sample", *(f"{c}_out" for c in cache_names)]
    assert len(manifest["kv_caches"]) == 4
    if name == "lumina":  # the complex RoPE table is baked in, as real (cos, sin) pairs
        assert [b["name"] for b in manifest["baked_inputs"]] == ["image_rotary_emb"]
    for graph in (onnx.load(str(result.dense)), ras):
        assert not [n.op_type for n in graph.graph.node if n.domain not in ("", "ai.onnx")], "custom ops exported"
        assert not [i for i in graph.graph.initializer if i.data_type in (14, 15)], "complex initializers exported"


def test_onnxruntime_generation_equals_pytorch(exported):
    name, result, expected, history, _ = exported
    build, kwargs_fn = MODELS[name]
    pipe = build()
    runner = OnnxRunner(result.directory, CONFIG).for_pipeline(pipe)
    got = pipe(**kwargs_fn(steps=STEPS))[0]
    decisions = runner.controller.history
    assert [d.kind for d in decisions] == [d.kind for d in history]
    assert sum(d.kind == "ras" for d in decisions) == 5
    for ours, theirs in zip(decisions, history):
        if ours.kind == "ras":
            assert torch.equal(ours.active_idx, theirs.active_idx)
    # onnxruntime and PyTorch sum in other orders, so fp32 rounding differs, by amounts that scale with the
    # magnitude of the tensors flowing through the model rather than with each element. After 8 steps with
    # guidance the largest difference measured 1.5e-5 to 2.3e-5 of the latents' largest magnitude (about 8),
    # whatever high_ratio (1, 0.3, 0.1); a wrong token or cache row differs by 1e-2 or more.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=5e-5 * expected.abs().max().item())


def test_dense_when_sample_ratio_is_one(exported):
    name, result, _, _, _ = exported
    build, kwargs_fn = MODELS[name]
    with torch.no_grad():
        dense = build()(**kwargs_fn(steps=4))[0]
    pipe = build()
    runner = OnnxRunner(result.directory, RASConfig(sample_ratio=1.0)).for_pipeline(pipe)
    got = pipe(**kwargs_fn(steps=4))[0]
    assert runner.controller.history == []  # no RAS planning at all
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)


def test_every_operator_is_supported_by_tensorrt(exported):
    _, result, _, _, _ = exported
    table = json.loads((Path(__file__).parent / "tensorrt_onnx_operators.json").read_text())
    supported = set(table["supported"])
    for path in (result.dense, result.ras):
        model = onnx.load(str(path))
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert table["opset_min"] <= opset <= table["opset_max"], (
            f"opset {opset} vs TensorRT {table['tensorrt_version']}"
        )
        used = {n.op_type for n in model.graph.node}
        assert used <= supported, f"{path.name}: not in TensorRT {table['tensorrt_version']}: {used - supported}"


def test_runner_rejects_other_resolution_and_too_many_tokens(exported):
    name, result, _, _, _ = exported
    build, kwargs_fn = MODELS[name]
    runner = OnnxRunner(result.directory, CONFIG)
    pipe = build()
    runner.for_pipeline(pipe)
    with pytest.raises(
        ValueError, match=r"input 'hidden_states' has shape \[2, 4, 16, 24\]; .* exported for \[2, 4, 16, 16\]"
    ):
        pipe(**kwargs_fn(steps=STEPS, latent_width=24))
    inputs = {r["name"]: torch.zeros(r["shape"], dtype=getattr(torch, r["dtype"])) for r in result.manifest["inputs"]}
    n = result.manifest["num_tokens"]
    too_many = torch.arange(n + 1).expand(2, n + 1)
    with pytest.raises(ValueError, match=rf"active_idx has shape \[2, {n + 1}\]; must be \[B, k\] .* k <= N = {n}"):
        runner.run_active(too_many, inputs)
    with pytest.raises(ValueError, match=r"active_idx holds indices outside"):
        runner.run_active(torch.full((2, 3), n), inputs)


@pytest.mark.parametrize("k", [1, 63])
def test_any_token_count_equals_pytorch(exported, k):
    """One file serves every k: single RAS steps at k = 1 and k = N - 1 against the PyTorch RAS graph."""
    _, result, _, _, graph = exported
    runner = OnnxRunner(result.directory, CONFIG)
    runner.controller.allocate_caches()
    control = graph.controller
    with torch.no_grad():  # the generation freed its caches: a step over all tokens fills them again
        graph.run_active(torch.arange(64).expand(2, 64).contiguous(), *graph.example_inputs)
    for ours, theirs in zip(
        [runner.controller.output_cache, *runner.controller.kv_caches], [control.output_cache, *control.kv_caches]
    ):
        ours.copy_(theirs)
    inputs = result.signature.placeholder_values(graph.signature.input_names, graph.example_inputs)
    idx = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(b))[:k] for b in range(2)])
    got = runner.run_active(idx, inputs)[0]
    with torch.no_grad():
        expected = graph.run_active(idx, *graph.example_inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(runner.controller.kv_caches, control.kv_caches):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_export_of_a_model_the_passes_cannot_rewrite(tmp_path):
    backend = RASBackend(CONFIG, inner_backend="eager")
    with pytest.warns(UserWarning, match="runs dense"), torch.no_grad():
        torch.compile(TokenPoolingDiT(), backend=backend)(torch.randn(2, 4, 8, 8))
    with pytest.raises(ExportError, match="the passes cannot rewrite this model: .*mean.*token axis"):
        rascompile.export(backend, tmp_path)
    with pytest.raises(ExportError, match="holds 0 graphs"):
        rascompile.export(RASBackend(CONFIG), tmp_path)
    with pytest.raises(FileNotFoundError, match="rascompile_export.json does not exist"):
        OnnxRunner(tmp_path, CONFIG)


def test_export_command(tmp_path, capsys):
    from safetensors.torch import save_file

    from rascompile.cli.main import main

    tiny_sd3_pipeline().save_pretrained(tmp_path / "pipe")
    call = sd3_call_kwargs()
    save_file({k: v.contiguous() for k, v in call.items() if torch.is_tensor(v)}, tmp_path / "prompt.safetensors")
    argv = ["export", str(tmp_path / "pipe"), str(tmp_path / "out"), "--height", "128", "--width", "128"]
    assert main([*argv, "--embeddings", str(tmp_path / "prompt.safetensors"), "--guidance-scale", "4"]) == 0
    out = capsys.readouterr().out
    assert "checked: onnxruntime equals PyTorch on both graphs" in out
    manifest = json.loads((tmp_path / "out" / "rascompile_export.json").read_text())
    assert manifest["inputs"][0] == {
        "name": "hidden_states",
        "placeholder": "l_kwargs_hidden_states_",
        "shape": [2, 4, 16, 16],
        "dtype": "float32",
    }
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out2")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*argv, "--embeddings", str(tmp_path / "prompt.safetensors"), "--tensorrt"]) == 2
        err = capsys.readouterr().err
        # one line: the tensorrt extra to install, or (with it installed) that TensorRT needs a CUDA GPU
        assert err.count("\n") == 1 and ('"tensorrt" extra' in err or "CUDA" in err), err


def test_onnx_speed_benchmark_smoke(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "onnx_speed.py"
    path = tmp_path / "speed.json"
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--repeats", "1", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(path.read_text())["rows"]
    assert [r["k"] for r in rows] == [64, 48, 32, 16, 8]
    assert "ras.onnx ratio 0.25" in result.stdout and rows[0]["speedup"] == 1.0
