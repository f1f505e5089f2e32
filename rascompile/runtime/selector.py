"""Region selection for RAS: which image tokens a RAS step computes.

All functions are batched over rows (one row per image, or per classifier-free-guidance copy of an image) and
use no Python loop over tokens. Token order is row-major over the `(H/p) x (W/p)` token grid, the order of
diffusers' patch embedding: token `row * (W // p) + col`.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..config import METRICS
from .schedule import split_num_dropped

__all__ = [
    "token_metric",
    "packed_token_metric",
    "layout_token_metric",
    "initial_drop_counts",
    "select_active_tokens",
    "select_active_tokens_among",
]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: must be an int >= 1")
    return int(value)


def token_metric(delta: torch.Tensor, patch_size: int, metric: str) -> torch.Tensor:
    """
    Per-token change metric of a latent update.

    Args:
        delta: `[B, C, H, W]`, the update the sampler made to the latents, `x(s+1) - x(s)`.
        patch_size: `p`, the transformer's patch size; `H` and `W` must be divisible by it.
        metric: `"std"` (unbiased standard deviation over channels, needs `C >= 2`) or `"l2norm"` (L2 norm
            over channels), computed per latent pixel, then averaged over each `p x p` patch; or `"random"`
            (the ablation): uniform scores seeded by each row's update.

    Returns:
        `[B, N]` float32 with `N = (H / p) * (W / p)`, in row-major token order.
    """
    if not isinstance(delta, torch.Tensor) or delta.dim() != 4:
        shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"delta must be a [B, C, H, W] tensor, got {shape}")
    p = _check_positive_int("patch_size", patch_size)
    batch, channels, height, width = delta.shape
    if height % p or width % p:
        raise ValueError(f"latent height H={height} and width W={width} must be divisible by patch_size={p}")
    x = delta.to(torch.float32)
    if metric == "std":
        if channels < 2:
            raise ValueError(f"metric='std' needs at least 2 channels, got C={channels}")
        per_pixel = torch.std(x, dim=1, correction=1)
    elif metric == "l2norm":
        per_pixel = torch.linalg.vector_norm(x, ord=2, dim=1)
    elif metric == "random":
        return _random_scores(x, (height // p) * (width // p))
    else:
        raise ValueError(f"metric={metric!r} is invalid: must be one of {', '.join(map(repr, METRICS))}")
    grid = per_pixel.reshape(batch, height // p, p, width // p, p)
    return grid.mean(dim=(2, 4)).reshape(batch, (height // p) * (width // p))


def packed_token_metric(delta: torch.Tensor, metric: str) -> torch.Tensor:
    """
    Per-token change metric of an update to packed latents `[B, N, C]` (Flux, Qwen-Image, LTX: the pipeline
    packs each token's latent elements into its row): `"std"` (unbiased standard deviation over the token's
    C elements), `"l2norm"` (their L2 norm) or `"random"`. Returns `[B, N]` float32.
    """
    if not isinstance(delta, torch.Tensor) or delta.dim() != 3:
        shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"delta must be a [B, N, C] tensor of packed latents, got {shape}")
    x = delta.to(torch.float32)
    if metric == "std":
        if x.shape[2] < 2:
            raise ValueError(f"metric='std' needs at least 2 elements per token, got C={x.shape[2]}")
        return torch.std(x, dim=2, correction=1)
    if metric == "l2norm":
        return torch.linalg.vector_norm(x, ord=2, dim=2)
    if metric == "random":
        return _random_scores(x, x.shape[1])
    raise ValueError(f"metric={metric!r} is invalid: must be one of {', '.join(map(repr, METRICS))}")


def layout_token_metric(delta: torch.Tensor, layout, metric: str) -> torch.Tensor:
    """
    Per-token change metric of a latent update in any latent layout (``rascompile.passes.rules.latent_layout``).

    Args:
        delta: the update the sampler made to the latents, shaped like ``layout.shape``.
        layout: a ``LatentLayout``: which latent elements make up each token.
        metric: as in `token_metric`, per latent element over the channel axis, then averaged over the token's
            patch (a ``p x p`` square of an image, a ``p_t x p x p`` block of a video); packed latents as in
            `packed_token_metric`.

    Returns:
        `[B, N]` float32 in token order.
    """
    if layout.kind == "packed":
        return packed_token_metric(delta, metric)
    if layout.kind == "image":
        return token_metric(delta, layout.patch[-1], metric)
    if not isinstance(delta, torch.Tensor) or tuple(delta.shape[1:]) != tuple(layout.shape[1:]):
        shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"delta must be shaped like the latents {tuple(layout.shape)}, got {shape}")
    x = delta.to(torch.float32)
    channels = x.shape[layout.channel_axis]
    if metric == "std":
        if channels < 2:
            raise ValueError(f"metric='std' needs at least 2 channels, got C={channels}")
        per_element = torch.std(x, dim=layout.channel_axis, correction=1)
    elif metric == "l2norm":
        per_element = torch.linalg.vector_norm(x, ord=2, dim=layout.channel_axis)
    elif metric == "random":
        return _random_scores(x, layout.num_tokens)
    else:
        raise ValueError(f"metric={metric!r} is invalid: must be one of {', '.join(map(repr, METRICS))}")
    blocks = [x.shape[0]]
    for size, p in zip(layout.token_grid, layout.patch):
        blocks += [size, p]
    grid = per_element.reshape(blocks)
    return grid.mean(dim=tuple(range(2, len(blocks), 2))).reshape(x.shape[0], layout.num_tokens)


def _random_scores(delta: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Uniform scores per token, seeded by each row's update, so identical rows get identical scores."""
    rows = []
    for row in delta:
        seed = int(torch.round(row.double().abs().sum() * 1e6).item()) % (2**63 - 1)
        rows.append(torch.rand(num_tokens, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows).to(delta.device)


def initial_drop_counts(
    batch: int, num_tokens: int, num_steps: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Drop counts at the start of a generation of `num_steps` (`T`) steps: `[B, N]` float32 of `-(T + 1)`."""
    batch = _check_positive_int("batch", batch)
    num_tokens = _check_positive_int("num_tokens", num_tokens)
    num_steps = _check_positive_int("num_steps", num_steps)
    return torch.full((batch, num_tokens), -float(num_steps + 1), dtype=torch.float32, device=device)


def select_active_tokens(
    metric: torch.Tensor,
    drop_counts: torch.Tensor,
    num_dropped: int,
    high_ratio: float,
    starvation_scale: float,
    deadline: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Choose the tokens the next RAS step computes, independently for each row.

    Each token's score is `metric * exp(starvation_scale * drop_counts)`, ranked through its logarithm
    `log(metric) + starvation_scale * drop_counts` in float64: the same order, without the overflow or
    underflow of `exp` at large scales or long generations. The scores of a row are sorted ascending
    (stable: ties keep token order); the `floor(D * (1 - high_ratio))` lowest and the
    `floor(D * high_ratio)` highest are dropped and the others are active. `drop_counts` is incremented in
    place by 1 at every dropped token. Rows with identical `metric` and `drop_counts` get identical results.

    Args:
        metric: `[B, N]` per-token metric (see [`token_metric`]).
        drop_counts: `[B, N]` floating-point drop counts (see [`initial_drop_counts`]); updated in place.
        num_dropped: `D`, in `[0, N - 1]`.
        high_ratio: in `[0, 1]`.
        starvation_scale: finite float.
        deadline: optional `[B, N]` ints, the RAS steps left before each token must be computed (0: this step,
            negative: overdue by as many steps; `max_skip_steps` minus the RAS steps it has been skipped in a
            row). The step then computes, first, the fewest tokens that let every deadline be met if later steps
            compute as many tokens as this one (earliest deadline first, then highest score), in place of the
            lowest-scoring active tokens; `k` stays the same. When no choice meets them all, the earliest
            deadlines go first.

    Returns:
        `[B, k]` int64 active token indices, each row sorted ascending, with
        `k = N - floor(D * (1 - high_ratio)) - floor(D * high_ratio)`.
    """
    if metric.dim() != 2:
        raise ValueError(f"metric must be a [B, N] tensor, got shape {tuple(metric.shape)}")
    if drop_counts.shape != metric.shape:
        raise ValueError(f"drop_counts shape {tuple(drop_counts.shape)} must match metric shape {tuple(metric.shape)}")
    if not drop_counts.is_floating_point():
        raise ValueError(f"drop_counts must be a floating-point tensor, got {drop_counts.dtype}")
    num_tokens = metric.shape[1]
    if (
        isinstance(num_dropped, bool)
        or not isinstance(num_dropped, numbers.Integral)
        or not 0 <= num_dropped <= num_tokens - 1
    ):
        raise ValueError(f"num_dropped={num_dropped!r} is invalid: must be an int in [0, {num_tokens - 1}]")
    if not 0.0 <= high_ratio <= 1.0:
        raise ValueError(f"high_ratio={high_ratio!r} is invalid: must be in [0, 1]")
    if not math.isfinite(starvation_scale):
        raise ValueError(f"starvation_scale={starvation_scale!r} is invalid: must be finite")

    num_low, num_high = split_num_dropped(int(num_dropped), float(high_ratio))
    order = _rank(metric, drop_counts, float(starvation_scale))
    split = num_tokens - num_high
    if deadline is not None:
        order = _due_first(order, num_low, split, deadline)
        num_low, split = num_tokens - (split - num_low), num_tokens
    dropped = torch.cat([order[:, :num_low], order[:, split:]], dim=1)
    active = order[:, num_low:split]
    if dropped.shape[1]:
        drop_counts.scatter_add_(1, dropped, torch.ones_like(dropped, dtype=drop_counts.dtype))
    return torch.sort(active, dim=1).values


def _due_first(order: torch.Tensor, num_low: int, split: int, deadline: torch.Tensor) -> torch.Tensor:
    """``order`` re-ranked so that its last ``k = split - num_low`` tokens are the step's active ones: the tokens
    due now (the fewest that keep every later deadline reachable at k tokens a step, earliest deadline first, then
    highest score), then the tokens the score made active, highest-scoring first."""
    batch, num_tokens = order.shape
    k = split - num_low
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(num_tokens, device=order.device).expand(batch, num_tokens))
    chosen = (position >= num_low) & (position < split)
    deadline = deadline.to(torch.int64)
    horizon = torch.arange(int(deadline.clamp_min(0).max()) + 1, device=order.device)
    # tokens due within d steps, less what the next d steps can compute, must be computed now
    within = (deadline.unsqueeze(-1) <= horizon).sum(dim=1)
    must = (within - k * horizon).clamp_min(0).amax(dim=1, keepdim=True)
    # smaller: due sooner (the most overdue first when not all can be met), then scores higher
    urgency = (deadline - int(deadline.min())) * num_tokens + (num_tokens - 1 - position)
    due_rank = torch.empty_like(order)
    by_urgency = torch.sort(urgency, dim=1, stable=True).indices
    due_rank.scatter_(1, by_urgency, torch.arange(num_tokens, device=order.device).expand(batch, num_tokens))
    due = due_rank < must
    by_score = position.to(torch.float64) / num_tokens + 2.0 * chosen
    key = torch.where(due, 4.0 + 1.0 - due_rank.to(torch.float64) / num_tokens, by_score)
    return torch.sort(key, dim=1, stable=True).indices


# Past this |starvation_scale| one drop outweighs any ratio of two float32 metrics (log-ratio < 2 * 104), so the
# order is by drop count first and metric second; ranking that way avoids float64 overflow of the product.
_LEXICOGRAPHIC_SCALE = 256.0


def _rank(metric: torch.Tensor, drop_counts: torch.Tensor, starvation_scale: float) -> torch.Tensor:
    """Token indices of each row in ascending order of `metric * exp(starvation_scale * drop_counts)`."""
    log_metric = torch.log(metric.to(torch.float32).clamp_min(0)).to(torch.float64)  # log(0) = -inf ranks first
    counts = drop_counts.to(torch.float64)
    if abs(starvation_scale) <= _LEXICOGRAPHIC_SCALE:
        score = log_metric + starvation_scale * counts
        score = torch.where(torch.isneginf(log_metric), torch.full_like(score, -torch.inf), score)
        return torch.sort(score, dim=1, stable=True).indices
    by_metric = torch.sort(log_metric, dim=1, stable=True).indices
    signed_counts = torch.gather(counts, 1, by_metric) * (1.0 if starvation_scale > 0 else -1.0)
    return torch.gather(by_metric, 1, torch.sort(signed_counts, dim=1, stable=True).indices)


def select_active_tokens_among(
    metric: torch.Tensor,
    drop_counts: torch.Tensor,
    candidates: torch.Tensor,
    num_dropped: int,
    high_ratio: float,
    starvation_scale: float,
    deadline: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    `select_active_tokens` over the tokens `candidates` only (`[M]` int64, ascending): the others are never
    active and keep their drop counts. `num_dropped` is `D` of the `M` candidates. Returns `[B, k]` token indices
    (of all `N` tokens), each row ascending.
    """
    counts = drop_counts[:, candidates]
    due = deadline[:, candidates] if deadline is not None else None
    chosen = select_active_tokens(metric[:, candidates], counts, num_dropped, high_ratio, starvation_scale, due)
    drop_counts[:, candidates] = counts
    return candidates[chosen]
