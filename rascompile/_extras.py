"""Optional dependencies: which ``pip install "rascompile[...]"`` extra brings which module.

The core install (torch, diffusers) runs ``torch.compile(..., backend="ras")``, ``rascompile.apply``,
``rascompile.check`` and ``rascompile check``. The rest needs an extra:

- ``onnx``: ``rascompile.export``, ``rascompile.OnnxRunner``, ``rascompile export`` (onnx, onnxscript, onnxruntime);
- ``tensorrt``: TensorRT engines for exported graphs (``rascompile export --tensorrt``);
- ``demo``: ``rascompile demo``, ``rascompile bench`` and the quality harness (tqdm, pillow, matplotlib,
  torchmetrics, transformers for the shapes model's diffusers pipeline);
- ``test``: everything the test suite needs (``onnx`` and ``demo``, plus pytest, hypothesis, ruff, triton).

A feature used without its extra raises :class:`MissingExtra` (an ``ImportError``) whose message is one line
naming the extra: ``rascompile export needs the "onnx" extra: pip install "rascompile[onnx]"``.
"""

from __future__ import annotations

import importlib.util
import sys

#: extra -> the modules it provides (import names), as ``pyproject.toml`` lists their distributions
EXTRAS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "tensorrt": ("tensorrt",),
    "demo": ("tqdm", "PIL", "matplotlib", "torchmetrics", "transformers"),
}


class MissingExtra(ImportError):
    """A feature was used without the optional dependencies of its extra; the message is the one line to show."""

    def __init__(self, feature: str, extra: str, missing: str | None = None):
        self.feature, self.extra, self.missing = feature, extra, missing
        super().__init__(f'{feature} needs the "{extra}" extra: pip install "rascompile[{extra}]"', name=missing)


def missing_modules(*modules: str) -> list[str]:
    """The modules of ``modules`` that are not installed (found without importing them, so checking is cheap;
    ``sys.modules[name] = None``, which makes ``import name`` fail, counts as missing)."""
    missing = []
    for name in modules:
        if sys.modules.get(name) is not None:  # imported already (or put there by the caller)
            continue
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            missing.append(name)
    return missing


def require_extra(extra: str, *modules: str, feature: str | None = None) -> None:
    """Raise :class:`MissingExtra` unless every module of ``modules`` (default: all of the extra's) imports.

    ``feature`` names what needs them in the message (default ``rascompile``); for example
    ``require_extra("onnx", "onnx", "onnxscript", feature="rascompile export")``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}: one of {', '.join(EXTRAS)}")
    missing = missing_modules(*(modules or EXTRAS[extra]))
    if missing:
        raise MissingExtra(feature or "rascompile", extra, missing[0])
