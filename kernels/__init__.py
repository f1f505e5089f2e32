"""Kernels behind rascompile's custom ops.

``linear_scatter_`` (``torch.ops.rascompile.linear_scatter_``): a K/V projection whose epilogue
(optional q/k norm, optional RoPE) writes each active token's row straight into its cache slot.
Triton on CUDA (``triton_linear_scatter``, imported only when launched), plain torch elsewhere.
"""

if __name__ != "rascompile.kernels":
    # With the repository root on sys.path (``python -m pytest`` puts the working directory there) this directory
    # is also the top-level package ``kernels``: the name of Hugging Face's kernels package, which transformers
    # imports to see whether it is installed. Running linear_scatter.py a second time would define
    # ``rascompile::linear_scatter_`` again, and torch.library destroys the first definition while
    # ``rascompile.kernels.linear_scatter_`` (and every caller holding it) still points at it: a freed operator
    # (``ValueError: vector::reserve`` or a segmentation fault in ``OpOverload.__call__``). Hand out this package
    # under its own name instead; it has no ``__version__``, so transformers reads the kernels package as absent.
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("rascompile.kernels")
else:
    from .linear_scatter import NORMS, linear_scatter_, normalize_arguments, reference_rows, write_rows

__all__ = ["NORMS", "linear_scatter_", "normalize_arguments", "reference_rows", "write_rows"]
