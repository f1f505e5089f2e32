"""``rascompile check``: the compiled-graph regression check to run in CI on your own model.

Put this in CI whenever you upgrade torch, diffusers or the model: it captures the transformer's Dynamo graph(s)
from one call, builds each graph's RAS step graph exactly as the ``ras`` backend does, and checks that the
rewritten graph computes what the uncompiled graph computes:

(a) ``capture``: a step over all N image tokens in order (the dense step that fills the caches) equals the
    uncompiled graph's output (with ``inner_backend="inductor"``: the dense graph compiled by inductor);
(b) ``permutation``: all N tokens, in a random order per batch row, equal dense (position tables and attention
    masks must follow the tokens);
(c) ``subset``: right after a capture step, a RAS step on the same inputs over a random subset of k < N tokens
    per row (k = N // 2, N // 4 and 1) reproduces the dense output (the caches hold what dense computes).

A graph the passes refuse runs dense in the backend, which is correct by construction: it passes, with the
reason, unless ``require_ras`` is set.

    report = rascompile.check(pipe, call_kwargs={"prompt_embeds": ..., "height": 1024, "width": 1024})
    print(report.format())          # a short table per graph; report.to_dict() for JSON; report.passed

    rascompile check ./sd3-medium --height 1024 --width 1024 --embeddings prompt.safetensors --require-ras

In a test suite use ``rascompile.testing.assert_ras_equivalent``, which raises ``AssertionError`` with this report.

Tolerances are relative to the scale of each output (its largest finite absolute value), per output dtype: see
``RELATIVE_TOLERANCE``. The graphs capture the one-step pipeline call with a small recording Dynamo backend
(``rascompile.capture.capture_pipeline_graphs``), which, like ``rascompile.export``, resets Dynamo's caches when it
is done.
"""

from __future__ import annotations

import math
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_leaves

from .capture import capture_graphs, capture_pipeline_graphs, unwrap
from .check_report import CheckError, CheckReport, CheckResult, GraphReport
from .runtime.memory import set_bytes

#: The largest ``max |RAS - dense|`` a check accepts, as a fraction of the output's scale (its largest finite
#: absolute value), by the output's dtype. Why these values: the RAS graph does the dense graph's arithmetic on
#: the same numbers, but its matrix products and attention run over k rows instead of N (other kernels and
#: blocking, so other summation orders) and read keys and values back from the caches, so results may differ by
#: rounding, about one unit of the dtype's precision (u = 2^-24 in float32, 2^-11 in float16, 2^-8 in bfloat16)
#: per op, adding up over the layers. Measured on the CPU: at most 4e-7 of the scale in float32 (the tiny SD3 and
#: Lumina-Next test models, and the 4-layer, hidden-768 SD3 of ``rascompile bench`` at 256 tokens), 4.4e-3 in
#: bfloat16 (the latter model), 0 in float16. A wrong rewrite changes the affected outputs by about their own size:
#: without the K/V caches that latter model is off by 7e-2 of the scale at k = N/2 and 2.5e-1 at k = 1, in float32
#: and bfloat16 alike. So: float32 1e-5 (25x the measured rounding, 7000x below that error), bfloat16 2e-2 (4.5x
#: and 3.5x), float16 and TF32 5e-3 (their u is 8x finer than bfloat16's; not measured on a GPU), float64 1e-10.
#: Pass ``relative_tolerance`` to ``check`` for another value.
RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}
#: float32 outputs of CUDA graphs when float32 matrix products may use TF32 (``torch.backends.cuda.matmul.
#: allow_tf32`` / ``torch.set_float32_matmul_precision("high")``): TF32 keeps float16's 10-bit mantissa.
TF32_RELATIVE_TOLERANCE = 5e-3
#: Subset sizes of check (c), as fractions of N (1 is always checked too).
SUBSET_FRACTIONS = (2, 4)


def _graphs_of(source: Any, call_kwargs: dict) -> tuple[list[tuple], torch.nn.Module, Any]:
    """(captured graphs, the transformer, the pipeline or None) for a pipeline or a transformer. The graphs'
    inputs are copies, so that later in-place changes by the call do not reach them."""
    if isinstance(source, torch.nn.Module):
        transformer = unwrap(source)
        try:
            graphs = capture_graphs(transformer, lambda compiled: compiled(**call_kwargs), copy_inputs=True)
        except Exception as exc:
            raise CheckError(f"calling {type(transformer).__name__}(**call_kwargs) failed: {_first_line(exc)}") from exc
        return graphs, transformer, None
    original = getattr(source, "transformer", None)
    if not isinstance(unwrap(original), torch.nn.Module) or not callable(source):
        raise CheckError(
            f"check() takes a diffusers pipeline with a transformer, or the transformer (a torch.nn.Module); "
            f"got {type(source).__name__}"
        )
    try:
        graphs = capture_pipeline_graphs(source, call_kwargs, copy_inputs=True)
    except Exception as exc:
        raise CheckError(f"the one-step call of {type(source).__name__} failed: {_first_line(exc)}") from exc
    return graphs, unwrap(original), source


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ============================================================================================ the checks


def check(
    pipe_or_transformer: Any,
    call_kwargs: dict | None = None,
    *,
    require_ras: bool = False,
    seed: int = 0,
    inner_backend: str = "eager",
    fused_kv_projection: bool | None = None,
    relative_tolerance: float | None = None,
    config: Any = None,
    num_inference_steps: int = 28,
) -> CheckReport:
    """Check that RAS computes what the model computes, on every Dynamo graph of ``pipe_or_transformer``.

    This is the thing to put in CI when upgrading torch, diffusers or the model: a change that makes the passes
    misread the graph fails here, with the graph, the check, k and the difference (or shows up as a graph that
    now runs dense, with the reason; ``require_ras=True`` fails on it).

    Args:
        pipe_or_transformer: a diffusers pipeline, called once for one step (``num_inference_steps=1``,
            ``output_type="latent"``) with ``call_kwargs``; or its transformer, called as
            ``transformer(**call_kwargs)``. Either may be ``torch.compile``-d already (its module is used).
        call_kwargs: the call's arguments: resolution, batch, prompt or prompt embeddings, guidance. The check
            holds for the shapes they give (a resolution or batch size is one graph).
        require_ras: fail when a graph runs dense. Without it a dense graph passes: it is the unchanged model.
        seed: seeds the random active-token orders and subsets.
        inner_backend: how the graphs run for the check: ``"eager"`` (the default: the rewrite itself against
            the uncompiled graph, fastest), or ``"aot_eager"`` / ``"inductor"`` (what ``backend="ras"`` runs by
            default; one compile per k), checked against the dense graph compiled by the same backend (inductor's
            own rounding differs from eager by about 2e-6 of the scale on the tiny SD3 model).
        fused_kv_projection: as for ``RASBackend``: ``None`` fuses on CUDA with Triton, as the backend does.
        relative_tolerance: overrides ``RELATIVE_TOLERANCE`` (a fraction of each output's scale).
        config: the ``RASConfig`` whose selection the report describes (default: ``RASConfig()``): for each RAS
            graph, the longest a token goes uncomputed in a generation of ``num_inference_steps`` under it, with
            random update metrics (``runtime.staleness.simulated_staleness``).

    Returns a ``CheckReport``; ``report.passed`` is the verdict. Raises ``CheckError`` when the call fails or
    never calls the transformer. Like ``rascompile.export``, it resets Dynamo's caches when done.
    """
    from .config import RASConfig
    from .runtime.backend import RASBackend

    if relative_tolerance is not None and not (
        isinstance(relative_tolerance, (int, float)) and math.isfinite(relative_tolerance) and relative_tolerance >= 0
    ):
        raise ValueError(f"relative_tolerance={relative_tolerance!r} is invalid: must be a finite number >= 0")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} is invalid: must be an int")
    # The backend the graphs would get: it validates inner_backend and fused_kv_projection, and builds each RAS
    # graph exactly as torch.compile(..., backend="ras") does. Its controller is not used: the check drives the
    # RAS graph with its own index and caches.
    backend = RASBackend(
        RASConfig(num_inference_steps=1), inner_backend=inner_backend, fused_kv_projection=fused_kv_projection
    )
    graphs, transformer, pipe = _graphs_of(pipe_or_transformer, dict(call_kwargs or {}))
    if not graphs:
        raise CheckError(f"the call never ran {type(transformer).__name__}: no graph to check")
    config = RASConfig() if config is None else config
    reports = [
        _check_graph(i, backend, gm, inputs, seed, require_ras, relative_tolerance)
        for i, (gm, inputs) in enumerate(graphs)
    ]
    for report in reports:
        if report.ras:
            report.staleness = _staleness(config, report.num_tokens, num_inference_steps, seed)
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:  # pragma: no cover - diffusers is a dependency
        diffusers_version = None
    return CheckReport(
        model=type(transformer).__name__,
        pipeline=type(pipe).__name__ if pipe is not None else None,
        torch=torch.__version__,
        diffusers=diffusers_version,
        inner_backend=inner_backend,
        require_ras=require_ras,
        seed=seed,
        graphs=reports,
        passed=all(r.passed for r in reports),
    )


def _check_graph(
    index: int,
    backend: Any,
    gm: torch.fx.GraphModule,
    inputs: list,
    seed: int,
    require_ras: bool,
    relative_tolerance: float | None,
) -> GraphReport:
    with warnings.catch_warnings():  # the reason for running dense goes into the report instead
        warnings.simplefilter("ignore")
        graph = backend.new_graph(gm, inputs)
    if graph.ras_gm is None:
        reason = graph.fallback_reason or "the passes did not rewrite it"
        return GraphReport(index, False, reason, None, None, None, None, None, passed=not require_ras)
    layout = graph.layout
    n, b = layout.num_tokens, layout.batch_size
    with torch.no_grad():
        dense = [t for t in tree_leaves(_reference(backend.inner_backend, gm, inputs)) if isinstance(t, torch.Tensor)]
    floating = [t for t in dense if t.is_floating_point()]
    reference = floating[0] if floating else None
    rtol = relative_tolerance if relative_tolerance is not None else _relative_tolerance(reference)
    device = inputs[graph.latents_index].device
    runner = _RASRunner(graph, inputs, device)
    generator = torch.Generator().manual_seed(seed)

    def random_rows(k: int) -> torch.Tensor:
        return torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(b)]).to(device)

    identity = torch.arange(n, device=device).expand(b, n).contiguous()
    checks = [runner.compare("capture", identity, dense, rtol)]
    checks.append(runner.compare("permutation", random_rows(n), dense, rtol))
    subsets = sorted({n // f for f in SUBSET_FRACTIONS if 1 <= n // f < n} | ({1} if n > 1 else set()), reverse=True)
    for k in subsets:
        runner.run(identity)  # a capture step fills the caches from these inputs
        checks.append(runner.compare("subset", random_rows(k), dense, rtol))
    scale = max((_scale(t) for t in floating), default=0.0)
    return GraphReport(
        index=index,
        ras=True,
        reason=None,
        num_tokens=n,
        batch_size=b,
        dtype=str(reference.dtype).removeprefix("torch.") if reference is not None else None,
        relative_tolerance=rtol,
        output_scale=scale,
        k_values=[c.k for c in checks],
        checks=checks,
        summary=graph.summary,
        passed=all(c.passed for c in checks),
        cache_bytes=set_bytes(layout.output_cache, layout.kv_caches),
        kv_cache_count=len(layout.kv_caches),
    )


def _staleness(config: Any, num_tokens: int, num_steps: int, seed: int) -> dict:
    from .runtime.staleness import simulated_staleness

    bound = f"max_skip_steps {config.max_skip_steps}" if config.max_skip_steps is not None else "no staleness bound"
    described = f"ratio {config.sample_ratio:g}, high_ratio {config.high_ratio:g}, {bound}"
    return {"config": described, "steps": num_steps} | simulated_staleness(config, num_tokens, num_steps, seed)


def _reference(inner_backend: str, gm: torch.fx.GraphModule, inputs: list) -> Any:
    """The dense output the RAS graph must reproduce: the uncompiled graph's; with a compiling inner backend, the
    dense graph compiled by it, so that the checks measure RAS and not the compiler's rounding against eager."""
    if inner_backend == "eager":
        return gm(*inputs)
    from rascompile.passes.graph_utils import copy_graph_module

    from .runtime.backend import compile_inner

    return compile_inner(inner_backend, copy_graph_module(gm), list(inputs))(*inputs)


class _RASRunner:
    """Runs one RAS graph with the check's own caches; the caches start as NaN, so a row a capture step fails
    to write poisons the output instead of passing on leftover values."""

    def __init__(self, graph: Any, inputs: list, device: torch.device):
        from rascompile.passes.graph_utils import copy_graph_module

        self.graph, self.inputs = graph, inputs
        shape, dtype = graph.layout.output_cache
        self.caches = [_poisoned(shape, dtype, device)] + [_poisoned(s, d, device) for s, d in graph.layout.kv_caches]
        self._compile = lambda args: graph.backend.compile_graph(copy_graph_module(graph.ras_gm), args)
        self._variants: dict[int, Callable] = {}

    def run(self, idx: torch.Tensor) -> list[torch.Tensor]:
        args = list(self.graph.signature.bind(self.inputs, idx, self.caches[0], self.caches[1:]))
        k = int(idx.shape[1])
        if k not in self._variants:
            self._variants[k] = self._compile(args)
        with torch.no_grad():
            out = self._variants[k](*args)
        return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]

    def compare(self, name: str, idx: torch.Tensor, dense: list[torch.Tensor], rtol: float) -> CheckResult:
        k = int(idx.shape[1])
        try:
            got = self.run(idx)
        except Exception as exc:  # noqa: BLE001 - a RAS graph that fails to run is a failed check, reported
            return CheckResult(name, k, math.inf, math.nan, False, error=_first_line(exc))
        if len(got) != len(dense):
            return CheckResult(name, k, math.inf, math.nan, False, error=f"{len(got)} outputs, dense has {len(dense)}")
        outcomes = []  # (diff, tolerance) per output; the worst relative to its tolerance is reported
        for ours, theirs in zip(got, dense):
            tolerance = rtol * _scale(theirs) if theirs.is_floating_point() else 0.0
            outcomes.append((_difference(ours, theirs), tolerance))
        passed = all(diff <= tolerance for diff, tolerance in outcomes)
        worst = max(outcomes, key=lambda o: _ratio(*o), default=(0.0, 0.0))
        return CheckResult(name, k, worst[0], worst[1], passed)


def _ratio(diff: float, tolerance: float) -> float:
    if tolerance > 0:
        return diff / tolerance
    return math.inf if diff > 0 else 0.0


def _poisoned(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    cache = torch.empty(tuple(shape), dtype=dtype, device=device)
    return cache.fill_(math.nan) if cache.is_floating_point() or cache.is_complex() else cache.zero_()


def _difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| in float64; equal values (infinities included) and NaN against NaN count as equal,
    a NaN or inf in one of them only as an infinite difference, a shape or dtype change likewise."""
    if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
        return math.inf
    if ours.numel() == 0:
        return 0.0
    a, b = ours.detach().double(), theirs.detach().double()
    same = (a == b) | (a.isnan() & b.isnan())
    diff = torch.where(same, torch.zeros_like(a), (a - b).abs())
    return float(torch.nan_to_num(diff, nan=math.inf).max())


def _scale(t: torch.Tensor) -> float:
    if not t.is_floating_point() or t.numel() == 0:
        return 0.0
    finite = t.detach().abs()[torch.isfinite(t)]
    return float(finite.max()) if finite.numel() else 0.0


def _relative_tolerance(output: torch.Tensor | None) -> float:
    if output is None:
        return 0.0  # integer outputs must match exactly
    if output.dtype == torch.float32 and output.is_cuda and torch.get_float32_matmul_precision() != "highest":
        return TF32_RELATIVE_TOLERANCE
    return RELATIVE_TOLERANCE.get(output.dtype, RELATIVE_TOLERANCE[torch.float32])


# ``rascompile.check(...)`` calls ``check``: ``import rascompile.check`` makes ``rascompile.check`` this module (a
# package attribute a function of that name could not keep), so the module itself is callable.
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> CheckReport:
        return check(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
