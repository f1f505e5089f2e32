"""The step timing the ``sd3`` and ``flux`` stages share: each step variant of a RAS graph compiled at its own first
call (its compile time kept), checked against another's output, and timed in interleaved rounds with
``rascompile.bench``'s timer, allocator peak and FLOP model."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rascompile.bench.flops import ModelSpec, ideal_speedup, step_flops
from rascompile.bench.memory import allocator_peak
from rascompile.bench.runner import kv_writes
from rascompile.bench.timing import time_interleaved, timed_call

from .suite import Stage


def mib(nbytes: float) -> float:
    return nbytes / 2**20


def mib_peak(peak: dict | None) -> dict | None:
    """``memory.allocator_peak``'s bytes in MiB, as ``results.json`` keeps them."""
    if peak is None:
        return None
    return {"peak_mib": mib(peak["peak_bytes"]), "above_live_mib": mib(peak["above_live_bytes"])}


def peak_memory(fn: Callable, device: str) -> dict | None:
    """The allocator's peak during one call of ``fn`` in MiB: absolute, and above what was allocated before it
    (``None`` off CUDA)."""
    return mib_peak(allocator_peak(fn, device))


def fuse_summary(graph) -> dict:
    """How many K/V cache writes the fused projection took (``rascompile bench``'s count) and the first reasons why
    the others stay unfused."""
    writes = kv_writes(graph)
    return {
        "kv_writes": writes["kv_writes"],
        "fused_kv_writes": writes["fused_kv_writes"],
        "unfused_reasons": writes["unfused_kv_reasons"][:5],
    }


class StepBench:
    """Compiles (first calls) and times the step variants of one captured transformer graph within a stage:
    ``st.data["compile_s"]`` and ``st.data["per_step"]``. ``spec`` (an SD3 ``ModelSpec``) adds the FLOP ideal."""

    def __init__(self, st: Stage, device: str, inner: str, repeats: int, spec: ModelSpec | None = None):
        self.st, self.device, self.inner, self.repeats, self.spec = st, device, inner, repeats, spec
        self.compile_s = st.data.setdefault("compile_s", {})
        self.rows = st.data.setdefault("per_step", [])
        self.outputs: dict[str, torch.Tensor] = {}

    def compile(self, label: str, fn: Callable) -> None:
        with self.st.step(f"compile {label} ({self.inner})"):
            holder = {}
            self.compile_s[label] = timed_call(lambda: holder.setdefault("out", fn()), self.device)
            self.outputs[label] = holder["out"][0]

    def _compile_s_of(self, label: str) -> float | None:
        return self.compile_s.get(label.replace(" (capture)", ""))

    def check_equal(self, name: str, label: str, reference: str, tolerance: float) -> None:
        got, expected = self.outputs[label].float().cpu(), self.outputs[reference].float().cpu()
        err, scale = (got - expected).abs().max().item(), expected.abs().max().item()
        passed = bool(torch.isfinite(got).all()) and err <= tolerance * scale
        relative = err / max(scale, 1e-30)
        detail = f"max |diff| {err:.3g} = {relative:.2e} x max |{reference}| ({scale:.3g}); tolerance {tolerance:g}"
        self.st.check(name, passed, detail)

    def check_output(self, label: str) -> None:
        out = self.outputs[label].float()
        finite, scale = bool(torch.isfinite(out).all()), out.abs().max().item()
        self.st.check(
            f"{label} output is finite and not zero", finite and scale > 0, f"finite {finite}, max |x| {scale:.3g}"
        )

    def time_round(self, name: str, variants: dict[str, tuple]) -> None:
        """``variants``: label -> (ratio, k, fused, fn), the dense step first; speedups against its median."""
        fns = {label: v[3] for label, v in variants.items()}
        with self.st.step(f"time per step, round {name}: {', '.join(variants)}"):
            timed = time_interleaved(fns, self.repeats, self.device)
            dense_s = timed["dense"]["median_s"]
            for label, (ratio, k, fused, fn) in variants.items():
                m = timed[label]
                row = {
                    "variant": label, "round": name, "ratio": ratio, "k": k, "fused": fused,
                    "median_ms": 1e3 * m["median_s"], "times_ms": [1e3 * t for t in m["times_s"]],
                    "speedup": dense_s / m["median_s"], "compile_s": self._compile_s_of(label),
                    "memory": peak_memory(fn, self.device),
                }  # fmt: skip
                if self.spec is not None:
                    row["ideal_speedup"] = ideal_speedup(self.spec, k)
                    row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
                    row["gflop"] = step_flops(self.spec, k) / 1e9
                    row["tflops"] = row["gflop"] / row["median_ms"]
                self.rows.append(row)
