"""``rascompile plan``: the memory plan of a pipeline directory or a published model, as text or JSON."""

import json

import pytest

import rascompile
from rascompile.cli.main import main
from tests.support.models import tiny_sd3_transformer


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    tiny_sd3_transformer().save_config(path / "transformer")
    return path


def test_the_command_prints_the_plan_of_the_api_and_fails_when_it_does_not_fit(pipeline_dir, capsys):
    args = [str(pipeline_dir), "--height", "128", "--width", "128", "--batch", "2", "--text-tokens", "7"]
    assert main(["plan", *args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = rascompile.plan(pipeline_dir, height=128, width=128, batch=2, text_tokens=7)
    assert printed["cache_bytes"] == expected.cache_bytes > 0
    assert printed["weights_bytes"] == expected.weights_bytes
    assert main(["plan", *args, "--kv-cache-dtype", "fp8_e4m3", "--json"]) == 0
    fp8 = json.loads(capsys.readouterr().out)
    assert fp8["cache_bytes"] == expected.with_kv_cache_dtype("fp8_e4m3").cache_bytes < expected.cache_bytes
    assert main(["plan", *args, "--budget-gib", "0.000001"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "| ras_kv_cache_0 | key |" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--height", "128"], "--height and --width are required"),
        (["--height", "100", "--width", "128"], "height=100 is invalid for this model: must be a multiple of 16"),
        (["--height", "128", "--width", "128", "--budget-gib", "-1"], "--budget-gib -1.0 is invalid: must be > 0"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(pipeline_dir, capsys, args, message):
    assert main(["plan", str(pipeline_dir), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_an_unknown_model_name_names_the_published_ones(capsys):
    assert main(["plan", "no-such-model", "--height", "64", "--width", "64"]) == 2
    assert "neither a directory nor a published model rascompile knows: sd3-medium" in capsys.readouterr().err
