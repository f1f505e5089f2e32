"""A checkout of this repository on sys.path never shadows an installed distribution.

``python -m pytest``, ``python -c`` and pytest's ``pythonpath = ["."]`` put the repository root first on sys.path,
so each top-level folder there is a candidate for ``import <folder>``. transformers imports Hugging Face's
``kernels`` package; any distribution may be called ``passes``. Only ``rascompile`` (the package itself) and
``tests`` (the suite's own import root, never installed) are regular packages at the top level; ``passes/`` and
``kernels/`` are namespace folders that the links ``rascompile/passes`` and ``rascompile/kernels`` make
``rascompile.passes`` and ``rascompile.kernels``, and a regular package found later on sys.path wins over them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL_PACKAGES = {"rascompile", "tests"}


def _kernels_version() -> str:
    """A version of Hugging Face's kernels that the installed transformers accepts."""
    from transformers.utils import import_utils

    return getattr(import_utils, "KERNELS_MIN_VERSION", "0.19.1")


def _install_fake_distribution(site: Path, name: str, version: str, body: str) -> None:
    """A minimal installed distribution: the package ``name`` and its dist-info metadata."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(textwrap.dedent(body))
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(f"{name}\n")


FAKE_KERNELS = '''
"""Stands in for Hugging Face's kernels: the names transformers imports, doing nothing."""

__version__ = "{version}"


class CUDAProperties:
    pass


class _Names(type):
    def __getattr__(cls, name):  # Mode.INFERENCE and the like
        return name


class _Stub(metaclass=_Names):
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if args else None


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Stub
'''

CHECK = """
import importlib.util, os, sys

import diffusers.loaders.peft
import transformers.modeling_utils
from transformers.utils.import_utils import is_kernels_available

import kernels
import passes

site = os.environ["FAKE_SITE"]
assert kernels.__file__.startswith(site), f"import kernels gave {kernels.__file__}, not the installed package"
assert kernels.CUDAProperties.__module__ == "kernels", kernels.CUDAProperties
assert is_kernels_available(), "transformers does not see the installed kernels package"
assert passes.__file__.startswith(site) and passes.MARK == "installed passes", passes

import torch
from rascompile.kernels.linear_scatter import linear_scatter_
from rascompile.passes.pipeline import build_ras_graph
from torch._library.custom_ops import OPDEFS

assert OPDEFS["rascompile::linear_scatter_"] is linear_scatter_
gen = torch.Generator().manual_seed(0)
cache = torch.randn(2, 9, 6, generator=gen)
x, weight = torch.randn(2, 3, 4, generator=gen), torch.randn(6, 4, generator=gen)
idx = torch.tensor([[0, 4, 8], [7, 1, 2]])
expected = cache.clone()
for b in range(2):
    expected[b, idx[b]] = x[b] @ weight.T
linear_scatter_(cache, x, weight, None, idx, token_axis=1, head_dim=6)
torch.testing.assert_close(cache, expected)
print("ok")
"""


def test_the_root_folders_never_shadow_installed_packages(tmp_path):
    """From the repository root, ``import kernels`` and ``import passes`` give the installed distributions,
    transformers and diffusers' peft loader import, and rascompile's op still works."""
    site = tmp_path / "site"
    _install_fake_distribution(site, "kernels", _kernels_version(), FAKE_KERNELS.format(version=_kernels_version()))
    _install_fake_distribution(site, "passes", "1.0", 'MARK = "installed passes"\n')
    env = dict(os.environ, FAKE_SITE=str(site), PYTHONPATH=str(site))
    result = subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


#: names that the dependencies import and an installed distribution owns (Hugging Face's kernels, for one)
SHADOW_PRONE = {"kernels", "passes"}


def _installed_top_level_names() -> set[str]:
    import importlib.metadata

    return {name for name, dists in importlib.metadata.packages_distributions().items() if "rascompile" not in dists}


def test_no_script_folder_module_is_named_like_an_installed_package():
    """``python benchmarks/<script>.py`` puts benchmarks/ first on sys.path: a module there named like an installed
    package (benchmarks/kernels.py was) answers that package's imports for the whole run."""
    taken = SHADOW_PRONE | _installed_top_level_names()
    for folder in ("benchmarks",):
        clashes = sorted(p.name for p in (ROOT / folder).iterdir() if p.stem in taken and p.suffix in ("", ".py"))
        assert not clashes, f"{folder}/ shadows installed packages: {clashes}"
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")} - TOP_LEVEL_PACKAGES
    assert not {name for name in top if (ROOT / name / "__init__.py").exists()} & taken


def test_only_rascompile_and_tests_are_top_level_packages():
    """Every other top-level folder is at most a namespace portion, which a regular package elsewhere outranks."""
    regular = {p.parent.name for p in ROOT.glob("*/__init__.py") if not p.parent.name.startswith(".")}
    assert regular == TOP_LEVEL_PACKAGES
    for name in ("passes", "kernels"):
        link = ROOT / "rascompile" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), f"rascompile/{name} -> ../{name}"


@pytest.mark.parametrize(
    "module, path, op",
    [
        ("kernels.linear_scatter", "kernels/linear_scatter.py", "rascompile::linear_scatter_"),
        ("passes.ops", "passes/ops.py", "rascompile::scatter_rows_"),
    ],
)
def test_op_modules_refuse_a_second_name(module, path, op):
    """Run under another name, a module that defines a custom op raises before torch.library sees it, so the
    definition every caller holds survives."""
    code = f"""
import importlib.util, torch
import rascompile.kernels.linear_scatter, rascompile.passes.ops
from torch._library.custom_ops import OPDEFS
before = OPDEFS[{op!r}]
spec = importlib.util.spec_from_file_location({module!r}, {str(ROOT / path)!r})
try:
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
except ImportError as exc:
    assert "import rascompile." in str(exc), exc
else:
    raise AssertionError("the module ran under a second name")
assert OPDEFS[{op!r}] is before
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def _copy_checkout(dest: Path) -> None:
    """The files git would commit (tracked, or new and not ignored), links kept as links."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        src, dst = ROOT / name, dest / name
        if not src.exists() and not src.is_symlink():  # deleted in the work tree
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)


def test_the_wheel_holds_the_subpackages(tmp_path):
    """A wheel built from the checkout installs rascompile.passes and rascompile.kernels inside rascompile/ (the
    links followed) and nothing else at the top level, and imports from there alone."""
    build_meta = pytest.importorskip("setuptools.build_meta", reason="setuptools builds the wheel")
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    source = tmp_path / "source"
    _copy_checkout(source)
    out = tmp_path / "dist"
    out.mkdir()
    build = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    del build_meta
    [wheel] = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"rascompile"}, top
    for module in (
        "rascompile/passes/pipeline.py",
        "rascompile/passes/rules/__init__.py",
        "rascompile/kernels/linear_scatter.py",
    ):
        assert module in names, module
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    code = (
        "import rascompile.passes.pipeline as p, rascompile.kernels.linear_scatter as k, torch\n"
        f"assert p.__file__.startswith({str(installed)!r}) and k.__file__.startswith({str(installed)!r})\n"
        "assert hasattr(torch.ops.rascompile, 'linear_scatter_')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(installed))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
