"""Kernels behind rascompile's custom ops.

``linear_scatter_`` (``torch.ops.rascompile.linear_scatter_``): a K/V projection whose epilogue
(optional q/k norm, optional RoPE) writes each active token's row straight into its cache slot.
Triton on CUDA (``triton_linear_scatter``, imported only when launched), plain torch elsewhere.
"""

from .linear_scatter import NORMS, linear_scatter_, normalize_arguments, reference_rows, write_rows

__all__ = ["NORMS", "linear_scatter_", "normalize_arguments", "reference_rows", "write_rows"]
