"""Test-suite helpers: pin RAS's equivalence to the model in your own tests.

    from rascompile.testing import assert_ras_equivalent

    def test_ras_matches_the_model():
        pipe = load_my_pipeline()
        assert_ras_equivalent(pipe, call_kwargs={"prompt_embeds": ..., "height": 1024, "width": 1024})

Keep such a test in CI and run it whenever you upgrade torch, diffusers or the model: it fails when the RAS
rewrite of the model's graph stops computing what the model computes, or (with ``require_ras=True``, the
default here) when a graph that ran with RAS starts running dense.
"""

from __future__ import annotations

from typing import Any

from .check import CheckReport, check


def assert_ras_equivalent(
    pipe_or_transformer: Any,
    call_kwargs: dict | None = None,
    *,
    require_ras: bool = True,
    **options: Any,
) -> CheckReport:
    """Run ``rascompile.check`` and raise ``AssertionError`` with its report when a check fails.

    ``pipe_or_transformer`` and ``call_kwargs`` are as for ``rascompile.check``: a pipeline is called once for
    one step with ``call_kwargs``, a transformer as ``transformer(**call_kwargs)``. With ``require_ras=True`` (the
    default) a graph that runs dense fails too; pass ``require_ras=False`` for models that are allowed to.
    ``options`` go to ``check`` (``seed``, ``inner_backend``, ``fused_kv_projection``, ``relative_tolerance``).

    This is the assertion to keep in CI when upgrading torch, diffusers or the model. Returns the report when
    every check passes.
    """
    report = check(pipe_or_transformer, call_kwargs, require_ras=require_ras, **options)
    if not report.passed:
        raise AssertionError("RAS is not equivalent to the model:\n" + report.format(verbose=True))
    return report


__all__ = ["assert_ras_equivalent"]
