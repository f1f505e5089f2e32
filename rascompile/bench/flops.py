"""FLOPs of a transformer step, for the ideal speedup of RAS at k active tokens: an analytic model of an SD3 MMDiT
step, and FLOPs measured with ``FlopCounterMode`` for any model (:func:`count_flops`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """The sizes of an SD3 MMDiT (``SD3Transformer2DModel``) that its FLOPs depend on.

    ``num_tokens`` is N, the image tokens of one image; ``text_tokens`` is L; ``batch`` is the batch the
    transformer sees (2 with classifier-free guidance). ``hidden`` = heads x head_dim.
    """

    hidden: int
    layers: int
    num_tokens: int
    text_tokens: int
    batch: int = 2
    patch: int = 2
    in_channels: int = 16
    out_channels: int = 16
    joint_dim: int = 4096
    pooled_dim: int = 2048
    mlp_ratio: int = 4
    freq_dim: int = 256  # sinusoidal timestep embedding width


def step_flops(spec: ModelSpec, num_active: int) -> float:
    """FLOPs (2 x multiply-adds of the matrix products) of one transformer call computing ``num_active`` (k)
    of the N image tokens of every image, the others coming from the RAS caches.

    Per joint block, with hidden size D, text tokens L and MLP expansion 4 (so ``12 D^2`` multiply-adds per
    token: ``3 D^2`` Q/K/V projections, ``D^2`` output projection, ``8 D^2`` MLP):

    - image tokens: ``12 D^2 * k`` (the K/V of the dropped tokens come from the cache);
    - text tokens: ``12 D^2 * L``, except in the last block (``context_pre_only``: only the ``3 D^2`` Q/K/V
      projections) -- the same on RAS and dense steps;
    - attention: ``(k + L)`` queries against ``(N + L)`` keys (the K/V cache keeps all N image keys), for
      ``Q K^T`` and ``P V``: ``2 D (k + L)(N + L)``;
    - adaLN modulation (``D -> 6 D`` for image and text, ``D -> 2 D`` for the last block's text norm) is per
      sample, not per token.

    Outside the blocks: the patch embedding runs on all N tokens (the RAS graph gathers the active tokens
    after it), the final projection ``D -> p^2 C_out`` on the k active ones; the text, pooled and timestep
    embeddings and the final adaLN are per sample or per text token. Element-wise work (norms, softmax,
    activations, gathers, scatters) is not counted. Everything is multiplied by the batch.

    ``num_active == N`` gives the FLOPs of a dense step.
    """
    n, k, length, d = spec.num_tokens, num_active, spec.text_tokens, spec.hidden
    if not 1 <= k <= n:
        raise ValueError(f"num_active={k!r} is invalid: must be in [1, {n}]")
    per_token = (3 + 1 + 2 * spec.mlp_ratio) * d * d  # QKV + out projection + MLP, multiply-adds
    macs = 0.0
    for layer in range(spec.layers):
        last = layer == spec.layers - 1
        macs += per_token * k  # image tokens
        macs += (3 * d * d if last else per_token) * length  # text tokens
        macs += 2 * d * (k + length) * (n + length)  # attention
        macs += d * 6 * d + d * (2 if last else 6) * d  # adaLN modulation (per sample)
    macs += spec.patch**2 * spec.in_channels * d * n  # patch embedding (before the gather)
    macs += d * spec.patch**2 * spec.out_channels * k  # final projection (before the scatter)
    macs += d * 2 * d  # final adaLN modulation
    macs += spec.joint_dim * d * length  # context embedder
    macs += spec.freq_dim * d + d * d + spec.pooled_dim * d + d * d  # timestep and pooled-text embeddings
    return 2.0 * macs * spec.batch


def ideal_speedup(spec: ModelSpec, num_active: int) -> float:
    """``step_flops(N) / step_flops(k)``: the speedup of a RAS step over a dense one if time followed FLOPs."""
    return step_flops(spec, spec.num_tokens) / step_flops(spec, num_active)


def loop_ideal_speedup(spec: ModelSpec, active_per_step: Sequence[int]) -> float:
    """The ideal speedup of a whole generation whose step ``i`` computes ``active_per_step[i]`` tokens
    (N for a dense step) over the same generation with every step dense."""
    dense = step_flops(spec, spec.num_tokens) * len(active_per_step)
    return dense / sum(step_flops(spec, k) for k in active_per_step)


# ============================================================================================ measured FLOPs
# For the families without an analytic model (and as a check of the SD3 one): FLOPs counted by
# ``torch.utils.flop_counter.FlopCounterMode`` while a step runs eagerly. It counts matrix products
# (mm, addmm, bmm, baddbmm), convolutions and attention; element-wise work is not counted, as above.


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _linear_scatter_flops(cache_shape, x_shape, weight_shape, *args, **kwargs) -> int:
    """``rascompile::linear_scatter_`` (the fused K/V projection): ``x @ weight.T`` over x's rows."""
    out_features, in_features = weight_shape
    rows = math.prod(x_shape) // in_features
    return 2 * rows * in_features * out_features


def _extra_formulas() -> dict:
    """Formulas FlopCounterMode lacks: the CPU flash attention kernel that ``scaled_dot_product_attention``
    dispatches to on the CPU (torch registers only the CUDA kernels), and the fused K/V projection op."""
    import torch

    formulas = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        formulas[cpu_flash] = _sdpa_flops
    try:
        import rascompile.kernels.linear_scatter  # noqa: F401 - registers rascompile::linear_scatter_

        formulas[torch.ops.rascompile.linear_scatter_] = _linear_scatter_flops
    except (ImportError, AttributeError):  # pragma: no cover - the op ships with the package
        pass
    return formulas


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs (2 x multiply-adds) of the matrix products, convolutions and attention that ``fn(*args, **kwargs)``
    runs through torch ops, counted with ``FlopCounterMode``. Run it eagerly (an FX graph module, the model):
    a compiled graph's kernels are not torch ops."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def measured_loop_ideal_speedup(
    flops_at: Mapping[int, float], num_tokens: int, active_per_step: Sequence[int]
) -> float:
    """:func:`loop_ideal_speedup` from measured per-step FLOPs ``flops_at[k]`` (``flops_at[num_tokens]`` is a
    dense step's)."""
    dense = flops_at[num_tokens] * len(active_per_step)
    return dense / sum(flops_at[k] for k in active_per_step)


# ============================================================================================ the benchmark's FLOPs


def dense_step_flops(model, call: dict) -> int:
    """Measured FLOPs of one dense step: the eager ``model(**call)`` under ``FlopCounterMode``."""
    import torch

    outputs = []
    with torch.no_grad():
        flops = count_flops(lambda: outputs.append(model(**call)))
    # Under context parallelism the output comes from an asynchronous gather (an AsyncCollectiveTensor): wait for
    # it, so that no collective is left pending.
    for leaf in torch.utils._pytree.tree_leaves(outputs):
        if hasattr(leaf, "trigger_wait"):
            leaf.trigger_wait()
    return flops


def ras_step_flops(graph, args: list, active_idx) -> int:
    """Measured FLOPs of one RAS step over the tokens ``active_idx`` [B, k]: the rewritten graph (what the inner
    backend compiles) of the ``RASGraph`` ``graph`` run eagerly under ``FlopCounterMode`` with the controller's
    caches (which it writes)."""
    import torch

    output_cache, kv_caches = graph.controller.caches(0)
    with torch.no_grad():
        return count_flops(graph.ras_gm, *graph.signature.bind(args, active_idx, output_cache, kv_caches))


@dataclass
class StepFlops:
    """The FLOPs of each variant of the per-step table (dense first, then the capture step, then the RAS steps):
    measured for all, and from the analytic model where ``spec`` is given (SD3), which then sets the ideal
    speedups."""

    dense_measured: int  # a dense step, measured on the eager model
    ks: list[int]  # active tokens per variant
    measured: list[int]  # per variant
    spec: ModelSpec | None = None

    def row(self, i: int) -> dict:
        """The FLOP columns of variant ``i``'s per-step row."""
        k, measured = self.ks[i], self.measured[i]
        row = {"measured_flops": measured, "measured_ideal_speedup": self.dense_measured / measured}
        if self.spec is not None:
            row["ideal_speedup"] = ideal_speedup(self.spec, k)
            row["flops"] = step_flops(self.spec, k)
        else:
            row["ideal_speedup"] = row["measured_ideal_speedup"]
            row["flops"] = measured
        return row

    def summary(self) -> dict:
        """The report's ``flops`` entry: the source of the ideal speedups and how far the measurement is from the
        analytic model, over the per-step rows."""
        info: dict = {"dense_measured": self.dense_measured}
        if self.spec is not None:
            info["source"] = "analytic"
            info["measured_vs_analytic_max_relative_difference"] = max(
                abs(m / step_flops(self.spec, k) - 1) for k, m in zip(self.ks, self.measured)
            )
        else:
            info["source"] = "measured"
        return info

    def loop_ideal_speedup(self, num_tokens: int, active_per_step: Sequence[int]) -> float:
        """The ideal speedup of a loop computing ``active_per_step[i]`` tokens at step i: from the analytic model,
        or from the measured FLOPs of the RAS variants (the third on) and of a dense step."""
        if self.spec is not None:
            return loop_ideal_speedup(self.spec, active_per_step)
        flops_at = dict(zip(self.ks[2:], self.measured[2:])) | {num_tokens: self.dense_measured}
        return measured_loop_ideal_speedup(flops_at, num_tokens, active_per_step)


def count_step_flops(spec: ModelSpec | None, graph, args: list, variants: Sequence, dense_measured: int) -> StepFlops:
    """:class:`StepFlops` of ``variants`` (``rascompile.bench.workload.StepVariant``): the dense step's are
    ``dense_measured``, a RAS step's the rewritten graph run eagerly at its k (:func:`ras_step_flops`)."""
    measured = [dense_measured if v.idx is None else ras_step_flops(graph, args, v.idx) for v in variants]
    return StepFlops(dense_measured, [v.k for v in variants], measured, spec)
