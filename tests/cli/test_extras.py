"""The core install and the extras: ``import rascompile`` and ``backend="ras"`` need none of the optional
dependencies, and a feature used without its extra says, in one line, which extra to install."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import rascompile
from rascompile._extras import EXTRAS, MissingExtra, missing_modules, require_extra
from rascompile.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
#: modules of the extras (and transformers, which only the demo and the tests' pipelines need)
OPTIONAL = ("onnx", "onnxscript", "onnxruntime", "matplotlib", "PIL", "tqdm", "torchmetrics", "transformers")


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_loads_no_optional_dependency():
    # torch itself imports some (tqdm); what counts is what ``import rascompile`` adds
    result = python(
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import rascompile\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in set(sys.modules) - before))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_command_line_loads_no_optional_dependency():
    # the rascompile command builds every subcommand's parser, so `rascompile check` must not need an extra
    result = python(
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "from rascompile.cli.main import build_parser\n"
        "build_parser()\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in set(sys.modules) - before))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_ras_backend_runs_without_the_extras():
    # every optional module made unimportable before rascompile is imported
    blocked = "".join(f"sys.modules[{m!r}] = None\n" for m in OPTIONAL)
    result = python(
        "import sys, warnings\n" + blocked + "import torch\n"
        "import rascompile\n"
        "from tests.support.synthetic import KeywordAttentionDiT\n"
        "model = KeywordAttentionDiT()\n"
        "x = torch.randn(2, 4, 8, 8)\n"
        "options = {'num_inference_steps': 2, 'scheduler_start_step': 1, 'error_reset_steps': (),\n"
        "           'inner_backend': 'eager'}\n"
        "compiled = torch.compile(model, backend='ras', options=options)\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(compiled(x), model(x))\n"
        "    compiled(x)\n"
        "print('ok')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_public_api():
    assert sorted(rascompile.__all__) == sorted(
        ["RASConfig", "apply", "RASBackend", "export", "OnnxRunner", "ExportError", "check", "plan", "release"]
        + ["status", "__version__"]
    )
    for name in rascompile.__all__:
        assert getattr(rascompile, name) is not None
    from rascompile.deploy.onnx_export import ExportError, export
    from rascompile.deploy.onnx_runner import OnnxRunner

    assert (rascompile.export, rascompile.ExportError, rascompile.OnnxRunner) == (export, ExportError, OnnxRunner)
    from rascompile.check import CheckError, check

    assert callable(rascompile.check) and callable(check) and issubclass(CheckError, ValueError)
    # internals stay in their modules
    for name in ("RASGraph", "RASController", "ras_backend"):
        assert not hasattr(rascompile, name)
    from rascompile.runtime.backend import RASGraph, ras_backend  # noqa: F401
    from rascompile.runtime.controller import RASController  # noqa: F401


def test_backend_entry_point_is_declared():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["torch_dynamo_backends"] == {"ras": "rascompile.runtime.backend:ras_backend"}
    core = {re.split(r"[<>=;\[ ]", d)[0] for d in project["dependencies"]}
    assert core == {"torch", "diffusers", "numpy", "safetensors"}


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_require_extra_names_the_extra(monkeypatch, extra):
    require_extra(extra, "sys")  # present: nothing raised
    module = EXTRAS[extra][0]
    monkeypatch.setitem(sys.modules, module, None)  # ``import module`` raises ImportError
    assert missing_modules(module) == [module]
    with pytest.raises(MissingExtra) as info:
        require_extra(extra, feature="this feature")
    assert str(info.value) == f'this feature needs the "{extra}" extra: pip install "rascompile[{extra}]"'
    assert isinstance(info.value, ImportError) and info.value.name == module


def test_require_extra_refuses_an_unknown_extra():
    with pytest.raises(ValueError, match="unknown extra 'onx'"):
        require_extra("onx")


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, module, expected",
    [
        (["export", "no-such-pipeline", "out"], "onnx", 'rascompile export needs the "onnx" extra'),
        (["export", "no-such-pipeline", "out"], "onnxscript", 'rascompile export needs the "onnx" extra'),
        (["export", "no-such-pipeline", "out"], "onnxruntime", 'rascompile export needs the "onnx" extra'),
        (["export", "p", "out", "--tensorrt"], "tensorrt", 'rascompile export --tensorrt needs the "tensorrt" extra'),
        (["demo", "--out", "unused"], "matplotlib", 'rascompile demo needs the "demo" extra'),
        (["demo", "--out", "unused"], "torchmetrics", 'rascompile demo needs the "demo" extra'),
        (["bench", "--smoke"], "tqdm", 'rascompile bench needs the "demo" extra'),
    ],
)
def test_command_without_its_extra_says_which(monkeypatch, capsys, tmp_path, argv, module, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)
    code, out, err = run(argv, capsys)
    extra = expected.split('"')[1]
    assert code == 2
    assert err == f'error: {expected}: pip install "rascompile[{extra}]"\n'
    assert out == ""
    assert not (tmp_path / "unused").exists() and not (tmp_path / "out").exists()


def test_export_without_onnxruntime_is_fine_with_no_check(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = run(["export", str(tmp_path / "missing"), str(tmp_path / "out"), "--no-check"], capsys)
    assert code == 2 and "extra" not in err and "is not a directory" in err
