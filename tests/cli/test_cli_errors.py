"""``rascompile export``, ``demo`` and ``bench`` on bad input: one line ``error: ...`` naming the problem, exit
status 2, no traceback, and none of the slow work (loading, tracing, generating, benchmarking) that bad input used
to reach."""

import argparse
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import rascompile.bench.runner
import rascompile.demo.shapes.generate
import rascompile.demo.shapes.model
import rascompile.deploy.onnx_export
from rascompile.cli.export import call_kwargs_from_args
from rascompile.cli.main import main
from rascompile.demo.shapes.model import WEIGHTS, ShapesModel
from tests.support.models import sd3_call_kwargs, tiny_sd3_pipeline

HAS_PROC = Path("/proc/self").exists()


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status (argparse's SystemExit included) and stderr of ``rascompile ARGV``, in-process."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, *expected: str) -> str:
    """Exit status 2 and exactly one ``error:`` line, holding every expected text; returns that line."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _fail(what: str):
    def fail(*args, **kwargs):
        pytest.fail(f"bad input reached {what}")

    return fail


# ============================================================================================ rascompile export


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A tiny SD3 pipeline saved without text encoders, embeddings (good and bad) and damaged directories."""
    d = tmp_path_factory.mktemp("cli_errors")
    tiny_sd3_pipeline().save_pretrained(d / "pipe")
    call = sd3_call_kwargs()
    prompt = {k: v.contiguous() for k, v in call.items() if torch.is_tensor(v)}
    save_file(prompt, d / "prompt.safetensors")
    save_file({k: v.half() for k, v in prompt.items()}, d / "fp16.safetensors")
    save_file({k: v.double() for k, v in prompt.items()}, d / "fp64.safetensors")
    save_file({**prompt, "foo": torch.zeros(1)}, d / "extra.safetensors")
    save_file({k: v for k, v in prompt.items() if not k.startswith("negative")}, d / "positive.safetensors")
    save_file({**prompt, "pooled_prompt_embeds": torch.zeros(3, 16)}, d / "rows.safetensors")
    (d / "garbage.safetensors").write_bytes(b"not a safetensors file " * 20)
    (d / "empty").mkdir()
    (d / "nonpipe").mkdir()
    (d / "nonpipe" / "notes.txt").write_text("not a pipeline")
    shutil.copytree(d / "pipe", d / "badindex")
    (d / "badindex" / "model_index.json").write_text("{ not json")
    shutil.copytree(d / "pipe", d / "truncated")
    weights = d / "truncated" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (d / "afile").write_text("a file")
    return d


EMB = ["--embeddings", "{d}/prompt.safetensors"]

#: (argv with {d} for the files' directory, texts the error line holds, whether the pipeline may be loaded first)
EXPORT_CASES = {
    "empty directory": (["{d}/empty", "{d}/out"], ["empty is not a diffusers pipeline", "model_index.json"], False),
    "not a pipeline": (["{d}/nonpipe", "{d}/out"], ["nonpipe is not a diffusers pipeline"], False),
    "model index not JSON": (["{d}/badindex", "{d}/out", *EMB], ["model_index.json cannot be read as JSON"], False),
    "truncated weights": (
        ["{d}/truncated", "{d}/out", *EMB],
        ["cannot load the pipeline", "diffusion_pytorch_model.safetensors"],
        True,
    ),
    "embeddings not safetensors": (
        ["{d}/pipe", "{d}/out", "--embeddings", "{d}/garbage.safetensors"],
        ["--embeddings", "garbage.safetensors is not a readable safetensors file"],
        False,
    ),
    "embeddings missing": (
        ["{d}/pipe", "{d}/out", "--embeddings", "{d}/missing.safetensors"],
        ["missing.safetensors does not exist"],
        False,
    ),
    "embeddings with extra keys": (
        ["{d}/pipe", "{d}/out", "--embeddings", "{d}/extra.safetensors"],
        ["'foo' is not a call argument of StableDiffusion3Pipeline"],
        False,
    ),
    "embeddings of different batches": (
        ["{d}/pipe", "{d}/out", "--embeddings", "{d}/rows.safetensors"],
        ["pooled_prompt_embeds has 3 rows, but prompt_embeds has 1"],
        False,
    ),
    "no negative embeddings, CFG, no text encoders": (
        ["{d}/pipe", "{d}/out", "--embeddings", "{d}/positive.safetensors"],
        ["no negative_prompt_embeds", "--guidance-scale 1"],
        False,
    ),
    "--prompt without text encoders": (
        ["{d}/pipe", "{d}/out", "--prompt", "a photo"],
        ["--prompt needs the pipeline's text encoders", "--embeddings FILE"],
        False,
    ),
    "no prompt, no embeddings, no text encoders": (["{d}/pipe", "{d}/out"], ["--embeddings FILE"], False),
    "negative height": (["{d}/pipe", "{d}/out", *EMB, "--height", "-128"], ["argument --height", ">= 1"], False),
    "zero height": (["{d}/pipe", "{d}/out", *EMB, "--height", "0"], ["argument --height", ">= 1"], False),
    "huge width": (["{d}/pipe", "{d}/out", *EMB, "--width", "1000000"], ["argument --width", "at most 16384"], False),
    "height beyond the position embedding": (
        ["{d}/pipe", "{d}/out", *EMB, "--height", "2048"],
        ["--height 2048", "1024 pixels", "pos_embed_max_size 64"],
        True,
    ),
    "height not a multiple": (
        ["{d}/pipe", "{d}/out", *EMB, "--height", "100"],
        ["--height 100 is not a multiple of 16", "96 or 112"],
        True,
    ),
    "opset 99": (["{d}/pipe", "{d}/out", *EMB, "--opset", "99"], ["argument --opset", "opset 99", "18 to"], False),
    "opset 5": (["{d}/pipe", "{d}/out", *EMB, "--opset", "5"], ["argument --opset", "opset 5", "18 to"], False),
    "guidance nan": (["{d}/pipe", "{d}/out", *EMB, "--guidance-scale", "nan"], ["--guidance-scale", "finite"], False),
    "guidance inf": (["{d}/pipe", "{d}/out", *EMB, "--guidance-scale", "inf"], ["--guidance-scale", "finite"], False),
    "zero images per prompt": (
        ["{d}/pipe", "{d}/out", *EMB, "--num-images-per-prompt", "0"],
        ["argument --num-images-per-prompt"],
        False,
    ),
    "opt ratio 0": (["{d}/pipe", "{d}/out", *EMB, "--opt-ratio", "0"], ["argument --opt-ratio", "(0, 1]"], False),
    "output is a file": (["{d}/pipe", "{d}/afile", *EMB], ["afile exists and is not a directory"], False),
    "output under a file": (["{d}/pipe", "{d}/afile/out", *EMB], ["afile is not a directory"], False),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_export_bad_input(case, files, capsys, monkeypatch):
    from diffusers import DiffusionPipeline

    argv, expected, loads = EXPORT_CASES[case]
    monkeypatch.setattr(rascompile.deploy.onnx_export, "export", _fail("the export"))
    if not loads:
        monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(_fail("loading the pipeline")))
    code, err = run(["export", *(a.format(d=files) for a in argv)], capsys)
    assert_one_error(code, err, *expected)


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc")
def test_export_output_that_cannot_be_created(files, capsys, monkeypatch):
    monkeypatch.setattr(rascompile.deploy.onnx_export, "export", _fail("the export"))
    code, err = run(
        ["export", str(files / "pipe"), "/proc/nope/out", "--embeddings", str(files / "fp16.safetensors")], capsys
    )
    assert_one_error(code, err, "/proc/nope/out", "cannot create directories in /proc")


def test_float_embeddings_are_converted_to_float32(files):
    """fp16 and fp64 embeddings become the pipeline's float32 (they broke tracing with a dtype mismatch)."""
    from rascompile.cli.export import read_model_index

    index = read_model_index(files / "pipe")
    for name in ("fp16", "fp64"):
        args = argparse.Namespace(
            pipeline=str(files / "pipe"),
            embeddings=str(files / f"{name}.safetensors"),
            prompt=None,
            num_images_per_prompt=1,
            height=None,
            width=None,
            guidance_scale=None,
        )
        kwargs = call_kwargs_from_args(args, index)
        assert {kwargs[k].dtype for k in kwargs if torch.is_tensor(kwargs[k])} == {torch.float32}, name


def test_export_with_images_per_prompt_and_fp16_embeddings(files, capsys):
    """--num-images-per-prompt with --embeddings: pipelines do not repeat given embeddings, so the command does
    (one row per image); fp16 embeddings are converted to float32. Both used to fail while tracing."""
    out = files / "out_images"
    argv = ["export", str(files / "pipe"), str(out), "--embeddings", str(files / "fp16.safetensors")]
    argv += ["--num-images-per-prompt", "2", "--height", "128", "--width", "128", "--no-check"]
    code, err = run(argv, capsys)
    assert code == 0, err
    manifest = json.loads((out / "rascompile_export.json").read_text())
    assert manifest["batch_size"] == 4  # CFG x 2 images of one prompt
    shapes = {i["name"]: i["shape"] for i in manifest["inputs"]}
    assert shapes["hidden_states"] == [4, 4, 16, 16] and shapes["encoder_hidden_states"][0] == 4


# ============================================================================================ ShapesModel.load


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Damaged copies of the shipped shapes model weights."""
    d = tmp_path_factory.mktemp("weights")
    raw = WEIGHTS.read_bytes()
    tensors = load_file(str(WEIGHTS))
    with safe_open(str(WEIGHTS), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])

    def with_config(name: str, **changes) -> None:
        save_file(tensors, d / name, metadata={**meta, "config": json.dumps({**config, **changes})})

    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + raw[:1000])
    save_file(tensors, d / "nometa.safetensors")
    save_file(tensors, d / "badjson.safetensors", metadata={**meta, "config": "{layers: 6"})
    with_config("layers2000.safetensors", layers=2000)
    with_config("hidden.safetensors", heads=100, head_dim=4096)
    with_config("layers8.safetensors", layers=8)
    with_config("textdim.safetensors", text_dim=32)
    with_config("unknown.safetensors", depth=3)
    with_config("string.safetensors", layers="6")
    nan = dict(tensors)
    nan["transformer.proj_out.weight"] = torch.full_like(nan["transformer.proj_out.weight"], float("nan"))
    save_file(nan, d / "nan.safetensors", metadata=meta)
    return d


WEIGHT_CASES = {
    "truncated": "not a readable safetensors file",
    "garbage": "not a readable safetensors file",
    "nometa": "no 'config' metadata",
    "badjson": "the 'config' metadata is not valid JSON",
    "layers2000": "config field layers=2000 is outside [1, 48]",
    "hidden": "config field heads=100 is outside [1, 48]",
    "layers8": "the tensors do not match the metadata config (layers=8,",
    "textdim": "tensor captions.positions has shape [20, 64], but the metadata config (layers=6,",
    "unknown": "unknown field(s) depth",
    "string": "config field layers='6' is not an int",
    "nan": "transformer.proj_out.weight holds NaN",
}


@pytest.mark.parametrize("case", sorted(WEIGHT_CASES))
def test_shapes_model_load_refuses_damaged_weights(case, weights):
    path = weights / f"{case}.safetensors"
    start = time.perf_counter()
    with pytest.raises(ValueError) as exc:
        ShapesModel.load(path)
    assert time.perf_counter() - start < 15  # the 2000-layer file allocated for 40 s before failing
    message = str(exc.value)
    assert str(path) in message and WEIGHT_CASES[case] in message, message


def test_shapes_model_load_reads_the_shipped_weights():
    model = ShapesModel.load()
    assert model.config.layers == 6 and next(model.parameters()).dtype == torch.float32


# ============================================================================================ rascompile demo

LONG_CAPTION = "blah " * 9000  # 45 000 characters

#: (argv, texts the error line holds)
DEMO_CASES = {
    "weights truncated": (["--weights", "{w}/truncated.safetensors"], ["truncated.safetensors", "not a readable"]),
    "weights without config": (["--weights", "{w}/nometa.safetensors"], ["no 'config' metadata"]),
    "weights of 2000 layers": (["--weights", "{w}/layers2000.safetensors"], ["layers=2000 is outside [1, 48]"]),
    "weights missing": (["--weights", "{w}/missing.safetensors"], ["--weights", "missing.safetensors does not exist"]),
    "out under /proc": (["--out", "/proc/nope"], ["--out /proc/nope", "cannot create directories in /proc"]),
    "out is a file": (["--out", "{w}/truncated.safetensors"], ["--out", "exists and is not a directory"]),
    "ratios abc": (["--ratios", "abc"], ["argument --ratios", "'abc'"]),
    "ratios zero": (["--ratios", "0.5,0"], ["argument --ratios", "(0, 1]"]),
    "ratios above one": (["--ratios", "1.5"], ["argument --ratios", "(0, 1]"]),
    "ratios empty": (["--ratios", ","], ["argument --ratios"]),
    "one step": (["--steps", "1"], ["argument --steps", ">= 2"]),
    "zero steps": (["--steps", "0"], ["argument --steps", ">= 2"]),
    "guidance nan": (["--guidance-scale", "nan"], ["argument --guidance-scale", "finite"]),
    "long caption": (["--caption", LONG_CAPTION], ["(45000 characters)", "outside the vocabulary: 'blah'"]),
    "caption of many words": (["--caption", "red " * 30], ["has 30 words; at most 20"]),
}


@pytest.mark.parametrize("case", sorted(DEMO_CASES))
def test_demo_bad_input(case, weights, capsys, monkeypatch):
    argv, expected = DEMO_CASES[case]
    if "/proc" in " ".join(argv) and not HAS_PROC:
        pytest.skip("needs /proc")
    monkeypatch.setattr(rascompile.demo.shapes.generate, "Generator", _fail("generation"))
    code, err = run(["demo", "--no-progress", *(a.format(w=weights) for a in argv)], capsys)
    line = assert_one_error(code, err, *expected)
    assert "scheduler_start_step" not in line
    assert len(line) < 600, line  # long text is echoed in part


def test_demo_with_damaged_shipped_weights(weights, capsys, monkeypatch):
    """The default weights file damaged: one line, not ``SafetensorError`` or ``KeyError: 'config'``."""
    monkeypatch.setattr(rascompile.demo.shapes.generate, "Generator", _fail("generation"))
    for damaged, expected in (("truncated", "not a readable safetensors file"), ("nometa", "no 'config' metadata")):
        monkeypatch.setattr(rascompile.demo.shapes.model, "WEIGHTS", weights / f"{damaged}.safetensors")
        code, err = run(["demo", "--no-progress", "--out", str(weights / "demo_out")], capsys)
        assert_one_error(code, err, f"{damaged}.safetensors", expected)


# ============================================================================================ rascompile bench

BENCH_CASES = {
    "json under /proc": (["--json", "/proc/x.json"], ["--json /proc/x.json", "cannot write in /proc"]),
    "json is a directory": (["--json", "{d}"], ["--json", "is a directory"]),
    "json under a file": (["--json", "{d}/afile/x.json"], ["--json", "afile exists and is not a directory"]),
    "one step": (["--steps", "1"], ["--steps 1 leaves no RAS step", "--start-step"]),
    "ratios abc": (["--ratios", "abc"], ["argument --ratios", "'abc'"]),
    "loop ratio nan": (["--loop-ratio", "nan"], ["argument --loop-ratio", "finite"]),
    "loop ratio one": (["--loop-ratio", "1"], ["argument --loop-ratio", "(0, 1)"]),
    "negative reset step": (["--reset-steps", "-1"], ["argument --reset-steps", "counted from 0"]),
    "reset step beyond": (["--reset-steps", "30"], ["--reset-steps", "error_reset_steps", "30"]),
    "zero layers": (["--layers", "0"], ["argument --layers", ">= 1"]),
    "layers abc": (["--layers", "abc"], ["argument --layers", "'abc'"]),
}


@pytest.mark.parametrize("case", sorted(BENCH_CASES))
def test_bench_bad_input(case, files, capsys, monkeypatch):
    argv, expected = BENCH_CASES[case]
    if "/proc" in " ".join(argv) and not HAS_PROC:
        pytest.skip("needs /proc")
    monkeypatch.setattr(rascompile.bench.runner, "run_bench", _fail("the benchmark"))
    code, err = run(["bench", "--smoke", "--no-progress", *(a.format(d=files) for a in argv)], capsys)
    line = assert_one_error(code, err, *expected)
    if case == "one step":
        assert "scheduler_start_step" not in line
