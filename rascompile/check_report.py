"""What ``rascompile.check`` reports: per graph, RAS or dense and why, the checks it ran (capture, permutation,
subsets) with their differences against the dense graph and tolerances, the caches' size; as text or JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .runtime.memory import gib

CHECK_NAMES = {
    "capture": "all N in order (fills the caches)",
    "permutation": "all N, random order per row",
    "subset": "random subset per row, after a capture step",
}


class CheckError(ValueError):
    """The check cannot run: the object is neither a pipeline nor a transformer, or its call fails or never
    reaches the transformer. (A check that runs and fails is reported, not raised.)"""


# ============================================================================================ the report


@dataclass
class CheckResult:
    """One check of one graph."""

    name: str  # "capture", "permutation" or "subset" (see CHECK_NAMES)
    k: int  # active tokens per batch row
    max_abs_diff: float  # max |RAS - dense| over every output element (inf where NaN/inf appear in one only)
    tolerance: float  # the largest accepted max_abs_diff: relative tolerance x output scale
    passed: bool
    error: str | None = None  # the exception the RAS graph raised, when it did not run


@dataclass
class GraphReport:
    """What the check found for one Dynamo graph."""

    index: int  # the graph's position in Dynamo's compile order
    ras: bool  # whether the backend runs this graph with RAS (False: dense)
    reason: str | None  # why it runs dense (the passes' RewriteError, or their internal error)
    num_tokens: int | None  # N, image tokens
    batch_size: int | None  # B, as the transformer sees it (twice the images with classifier-free guidance)
    dtype: str | None  # dtype of the graph's (first floating) output
    relative_tolerance: float | None
    output_scale: float | None  # largest finite |dense output|
    k_values: list[int] = field(default_factory=list)  # active-token counts checked, in check order
    checks: list[CheckResult] = field(default_factory=list)
    summary: str = ""  # rascompile.passes.snapshot.graph_summary of the rewritten graph (what the passes found and did)
    passed: bool = True  # every check passed (a dense graph passes unless RAS is required)
    # the selection of ``config`` over this graph's N tokens in a generation of ``num_inference_steps`` with random
    # update metrics: each token's longest run of skipped RAS steps, its maximum and 99th percentile
    staleness: dict | None = None
    # bytes of one guidance branch's caches (the output cache and each K/V cache), as rascompile.plan counts them
    cache_bytes: int | None = None
    kv_cache_count: int | None = None


@dataclass
class CheckReport:
    """The result of ``check``: one ``GraphReport`` per Dynamo graph of the transformer."""

    model: str  # the transformer's class
    pipeline: str | None  # the pipeline's class, when a pipeline was checked
    torch: str
    diffusers: str | None
    inner_backend: str  # how the RAS graphs ran; the reference is the uncompiled graph with "eager", else the
    # dense graph compiled by the same backend
    require_ras: bool
    seed: int
    graphs: list[GraphReport]
    passed: bool

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (non-finite floats become the strings "inf", "-inf", "nan")."""
        return _json_safe(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def failures(self) -> list[str]:
        """One line per failed check or refused dense graph; empty when the report passed."""
        lines = []
        for g in self.graphs:
            if not g.ras and self.require_ras:
                lines.append(f"graph {g.index} runs dense ({g.reason}) and RAS is required")
            for c in g.checks:
                if not c.passed:
                    what = f"error: {c.error}" if c.error else f"max |diff| {c.max_abs_diff:.3g} > {c.tolerance:.3g}"
                    lines.append(f"graph {g.index}: {c.name} at k={c.k} failed ({what})")
        return lines

    def format(self, verbose: bool = False) -> str:
        """The human report: a short table per graph; ``verbose`` adds each graph's whole rewrite summary."""
        head = f"rascompile check: {self.model}" + (f" of {self.pipeline}" if self.pipeline else "")
        versions = f"torch {self.torch}" + (f", diffusers {self.diffusers}" if self.diffusers else "")
        lines = [f"{head} ({versions}; inner backend {self.inner_backend}; seed {self.seed})"]
        for g in self.graphs:
            lines += _format_graph(g, self.require_ras, verbose)
        ras = sum(g.ras for g in self.graphs)
        counts = f"{len(self.graphs)} graph{'s' * (len(self.graphs) != 1)}: {ras} RAS, {len(self.graphs) - ras} dense"
        if self.passed:
            lines.append(f"PASS ({counts})")
        else:
            lines.append(f"FAIL ({counts})")
            lines += [f"  {line}" for line in self.failures()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _format_graph(g: GraphReport, require_ras: bool, verbose: bool) -> list[str]:
    if not g.ras:
        verdict = "FAIL: RAS is required" if require_ras else "pass: a dense graph runs the model unchanged"
        return [f"graph {g.index}: dense ({g.reason}); {verdict}"]
    lines = [
        f"graph {g.index}: RAS, N={g.num_tokens} image tokens, B={g.batch_size}, {g.dtype}, output scale "
        f"{g.output_scale:.3g}, tolerance {g.relative_tolerance:g} x scale"
    ]
    rows = [("check", "k", "tokens", "max |diff|", "tolerance", "result")]
    for c in g.checks:
        result = "pass" if c.passed else "FAIL" + (f" ({c.error})" if c.error else "")
        rows.append((c.name, str(c.k), CHECK_NAMES[c.name], f"{c.max_abs_diff:.2e}", f"{c.tolerance:.2e}", result))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2])]
        cells += [r[3].rjust(widths[3]), r[4].rjust(widths[4]), r[5]]
        lines.append("  " + "  ".join(cells))
    if g.cache_bytes is not None:
        lines.append(
            f"  caches per guidance branch: {gib(g.cache_bytes)} (1 output cache, {g.kv_cache_count} K/V caches; "
            "rascompile plan gives weights, caches and activations at any size)"
        )
    if g.staleness is not None:
        st = g.staleness
        lines.append(
            f"  selection ({st['config']}, {st['steps']} steps, random update metrics): a token goes uncomputed at "
            f"most {st['max']} RAS steps in a row (99th percentile {st['p99']:g})"
        )
    summary = g.summary.splitlines()
    shown = summary if verbose else summary[:4]
    lines += [f"  | {line}" for line in shown]
    if len(summary) > len(shown):
        lines.append(f"  | ... {len(summary) - len(shown)} more rewrite lines (verbose / --json)")
    return lines


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# ============================================================================================ capturing the graphs
