"""User-facing configuration of Region-Adaptive Sampling (RAS).

The parameter names and semantics follow the paper's public reference implementation (microsoft/RAS), and so
do the defaults but two, both chosen by measurement (``docs/quality/README.md``, Table 4): ``high_ratio`` defaults
to 0.1 where the reference's argparse has 1.0, and ``max_skip_steps`` (not in the reference) bounds how long a
token goes uncomputed. :meth:`RASConfig.reference_defaults` gives the reference's.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RASConfig",
    "METRICS",
    "REFERENCE_START_STEP",
    "REFERENCE_RESET_STEPS",
    "REFERENCE_NUM_STEPS",
    "REFERENCE_SELECTION",
]

#: Storage of the K/V caches other than the model's dtype (``kv_cache_dtype``).
KV_CACHE_DTYPES = ("fp8_e4m3",)

#: Per-pixel metrics understood by :func:`rascompile.runtime.selector.token_metric`.
METRICS = ("std", "l2norm", "random")

#: The reference implementation's step-indexed defaults, for its 28-step generations. When a user leaves
#: ``scheduler_start_step`` or ``error_reset_steps`` unset, they follow the generation's ``T`` (see
#: :meth:`RASConfig.resolved_start_step`), so the defaults work for every step count.
REFERENCE_NUM_STEPS = 28
REFERENCE_START_STEP = 4
REFERENCE_RESET_STEPS = (12, 22)

#: The reference implementation's defaults for the selection fields where rascompile's differ. Its example
#: scripts pass ``--starvation_scale 1 --high_ratio 0.3``, but its ``ras_manager.set_parameters`` never reads
#: ``starvation_scale``, so they run with 0.1 and 0.3.
REFERENCE_SELECTION = {"starvation_scale": 0.1, "high_ratio": 1.0, "max_skip_steps": None}


def _fail(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"RASConfig.{field}={value!r} is invalid: {allowed}")


def _as_int(field: str, value: Any) -> int:
    # bool is an int subclass, but `True` as a step count is a mistake, not a number.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(field, value, f"must be an int, got {type(value).__name__}")
    return int(value)


def _as_float(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(field, value, f"must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise _fail(field, value, "must be finite")
    return value


def _scaled_step(step: int, num_steps: int) -> int:
    """A step of the reference's 28-step schedule moved to a generation of `num_steps` steps (rounded half up)."""
    return (2 * step * num_steps + REFERENCE_NUM_STEPS) // (2 * REFERENCE_NUM_STEPS)


def _check_num_steps(num_steps: Any) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} is invalid: must be an int >= 1")
    return int(num_steps)


@dataclass(frozen=True)
class RASConfig:
    r"""
    Configuration for [Region-Adaptive Sampling](https://huggingface.co/papers/2502.10389) (RAS).

    On a RAS step, the transformer computes only the "active" image tokens; the others ("dropped") reuse the
    model output of the previous step. Tokens are chosen before each RAS step from the update the sampler just
    made to the latents. Steps are counted from 0; `T` below is the number of inference steps and `N` the
    number of image tokens of one image.

    The configuration is immutable: use [`~RASConfig.replace`] to derive a modified, validated copy. Every
    invalid value raises a `ValueError` that names the field, shows the value and states what is allowed.

    Args:
        sample_ratio (`float`, defaults to `0.5`):
            Fraction of the image tokens computed on a static RAS step, in `(0, 1]`. A RAS step drops
            `D = floor((1 - sample_ratio) * N)` tokens. `1.0` makes every step dense.
        scheduler_start_step (`int`, *optional*, defaults to `None`):
            First step that may be a RAS step; the steps before it are dense. When set, must be `>= 1`
            (selection needs a previous step, so step 0 is always dense) and `< num_inference_steps`. `None`
            follows `T`: the reference's step 4 of 28, scaled to `T` (`round(4 * T / 28)`, at least 1), so
            `4` at 28 steps, `3` at 20 and `1` at 10; a generation too short for any RAS step runs dense.
        scheduler_end_step (`int`, *optional*, defaults to `None`):
            Last step that may be a RAS step; the steps after it are dense. `None` means `T`, i.e. no dense
            tail. When given, must be `>= scheduler_start_step` and `<= T`.
        error_reset_steps (`tuple[int, ...]`, *optional*, defaults to `None`):
            Steps that are always dense, to reset the error accumulated by the reused outputs. A list is
            accepted and stored as a tuple. When set, each step must be `>= 0` and `< T`, without duplicates;
            `()` disables resets. `None` follows `T`: the reference's steps `(12, 22)` of 28, scaled to `T`
            (`(12, 22)` at 28 steps, `(9, 16)` at 20, `(4, 8)` at 10).
        metric (`str`, defaults to `"std"`):
            How a latent pixel's update is reduced over channels: `"std"` (unbiased standard deviation) or
            `"l2norm"` (Euclidean norm). A token's metric is the mean over its `p x p` pixels. `"random"` is
            the ablation that ignores the update: a uniform random score per token, reproducible from the
            update (copies of one image, such as the classifier-free-guidance rows, get the same scores).
        starvation_scale (`float`, defaults to `0.1`):
            A token's metric is multiplied by `exp(starvation_scale * d)`, `d` being its drop count:
            `-(T + 1)` at the start of a generation, `+1` each time it is dropped. Any finite value; `0`
            disables the scaling and negative values are allowed. A positive value lifts the score of a
            dropped token, so it rotates computation onto tokens dropped from the low end of the ranking
            but keeps tokens dropped from the high end dropped: with `high_ratio=1.0` it makes the selection
            stickier (see `docs/quality/README.md`).
        high_ratio (`float`, defaults to `0.1`):
            Split of the dropped tokens, in `[0, 1]`: the `floor(D * high_ratio)` highest-scoring and the
            `floor(D * (1 - high_ratio))` lowest-scoring tokens are dropped. When the two floors sum to less
            than `D`, fewer than `D` tokens are dropped. The reference implementation's default is `1.0`
            ([`~RASConfig.reference_defaults`]); `0.1` measured best on the shipped shapes model, where with
            `1.0` the same tokens are computed on every RAS step (Table 4 of `docs/quality/README.md`).
        skip_num_step (`int`, defaults to `0`):
            Dynamic mode when non-zero: step `s` in group `i = s // skip_num_step_length` drops
            `D = avg + skip_num_step * (i - ((T + scheduler_start_step) // skip_num_step_length) // 2)`
            tokens, rounded down to a multiple of `dynamic_round_to`, `avg` being the static `D`. May be
            negative. Every RAS step's `D` must lie in `[0, N - 1]`.
        skip_num_step_length (`int`, defaults to `0`):
            Length `L` of a dynamic-mode group of steps, `>= 0`; must be `> 0` when `skip_num_step != 0`. On
            its own (with `skip_num_step == 0`) it has no effect.
        dynamic_round_to (`int`, defaults to `64`):
            Dynamic mode rounds each step's `D` down to a multiple of this, `>= 1`. The default is the
            reference implementation's 64, sized for 1024-token images; small images (such as the 64 tokens of
            the shapes model) need a smaller multiple for the dynamic schedule to vary at all.
        num_inference_steps (`int`, *optional*, defaults to `None`):
            Number of inference steps `T`, `>= 1`. Required by the `torch.compile` path; `apply()` reads it
            from the pipeline's scheduler. When given, the checks that depend on `T` run at construction.
        kv_cache (`bool`, defaults to `True`):
            Whether attention on a RAS step also sees the keys and values of the dropped tokens (cached from
            the last step that computed them). `False` is an ablation: attention sees only the active tokens.
        graph_pieces (`bool`, defaults to `False`):
            Experimental: run RAS across the graphs Dynamo splits a transformer call into (graph breaks, group
            offloading, regional compilation, FirstBlockCache). An eager wrapper around the transformer's forward
            decides each step, every graph of the call runs that decision on its own caches, and the output's
            skipped tokens take their last prediction. The first call, during which Dynamo compiles the pieces,
            runs dense. Off by default until the quality of each model family across its pieces is measured; pieces
            that cannot all be rewritten run dense as a whole, with a warning.
        max_skip_steps (`int`, *optional*, defaults to `3`):
            A bound on staleness: no token is skipped on more than this many RAS steps in a row. Each RAS step
            first computes the fewest tokens that keep every token's deadline reachable, in place of the
            lowest-scoring active ones; the step size stays the same. A bound `b` can be kept when a step
            computes at least `N / (b + 1)` tokens (`3`: ratios from 0.25 up); below that the most overdue go
            first and staleness stays near `N / k`. `>= 1`, or `None` for no bound (the reference's behaviour,
            [`~RASConfig.reference_defaults`]). Chosen by measurement (Table 4 of `docs/quality/README.md`):
            without a bound the tokens the selection keeps dropping go uncomputed from one dense step to the next
            (8 RAS steps on the shapes model). A token's longest run of skipped RAS steps is reported by
            `rascompile demo`, `rascompile check` and `RASController.staleness()`.
    """

    sample_ratio: float = 0.5
    scheduler_start_step: int | None = None
    scheduler_end_step: int | None = None
    error_reset_steps: tuple[int, ...] | None = None
    metric: str = "std"
    starvation_scale: float = 0.1
    high_ratio: float = 0.1
    skip_num_step: int = 0
    skip_num_step_length: int = 0
    dynamic_round_to: int = 64
    num_inference_steps: int | None = None
    kv_cache: bool = True
    graph_pieces: bool = False
    max_skip_steps: int | None = 3
    keep_caches: bool = False
    kv_cache_dtype: str | None = None

    def __post_init__(self) -> None:
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        sample_ratio = _as_float("sample_ratio", self.sample_ratio)
        if not 0.0 < sample_ratio <= 1.0:
            raise _fail("sample_ratio", self.sample_ratio, "must be in (0, 1]")
        store("sample_ratio", sample_ratio)

        if self.scheduler_start_step is not None:
            start = _as_int("scheduler_start_step", self.scheduler_start_step)
            if start < 1:
                raise _fail(
                    "scheduler_start_step",
                    self.scheduler_start_step,
                    "must be None or >= 1 (step 0 is always dense: selection needs a previous step)",
                )
            store("scheduler_start_step", start)

        if self.scheduler_end_step is not None:
            end = _as_int("scheduler_end_step", self.scheduler_end_step)
            start = self.scheduler_start_step
            if start is not None and end < start:
                raise _fail(
                    "scheduler_end_step",
                    self.scheduler_end_step,
                    f"must be None or >= scheduler_start_step ({start})",
                )
            if end < 1:
                raise _fail("scheduler_end_step", self.scheduler_end_step, "must be None or >= 1")
            store("scheduler_end_step", end)

        steps = self.error_reset_steps
        if steps is not None:
            if isinstance(steps, (str, bytes)) or not isinstance(steps, (tuple, list, range)):
                raise _fail("error_reset_steps", steps, "must be None or a tuple or list of ints")
            normalized = []
            seen: set[int] = set()
            repeated: set[int] = set()
            for step in steps:
                if isinstance(step, bool) or not isinstance(step, numbers.Integral):
                    raise _fail("error_reset_steps", steps, f"must contain only ints, got {step!r}")
                if step < 0:
                    raise _fail("error_reset_steps", steps, f"steps must be >= 0, got {step}")
                step = int(step)
                (repeated if step in seen else seen).add(step)
                normalized.append(step)
            if repeated:
                raise _fail("error_reset_steps", steps, f"steps must be distinct, repeated: {sorted(repeated)}")
            store("error_reset_steps", tuple(normalized))

        if not isinstance(self.metric, str) or self.metric not in METRICS:
            raise _fail("metric", self.metric, f"must be one of {', '.join(map(repr, METRICS))}")

        store("starvation_scale", _as_float("starvation_scale", self.starvation_scale))

        high_ratio = _as_float("high_ratio", self.high_ratio)
        if not 0.0 <= high_ratio <= 1.0:
            raise _fail("high_ratio", self.high_ratio, "must be in [0, 1]")
        store("high_ratio", high_ratio)

        store("skip_num_step", _as_int("skip_num_step", self.skip_num_step))
        length = _as_int("skip_num_step_length", self.skip_num_step_length)
        if length < 0:
            raise _fail("skip_num_step_length", self.skip_num_step_length, "must be >= 0")
        if self.skip_num_step != 0 and length == 0:
            raise _fail(
                "skip_num_step_length",
                self.skip_num_step_length,
                f"must be > 0 when skip_num_step is non-zero (skip_num_step={self.skip_num_step})",
            )
        store("skip_num_step_length", length)
        round_to = _as_int("dynamic_round_to", self.dynamic_round_to)
        if round_to < 1:
            raise _fail("dynamic_round_to", self.dynamic_round_to, "must be >= 1")
        store("dynamic_round_to", round_to)

        if self.num_inference_steps is not None:
            num_steps = _as_int("num_inference_steps", self.num_inference_steps)
            if num_steps < 1:
                raise _fail("num_inference_steps", self.num_inference_steps, "must be None or >= 1")
            store("num_inference_steps", num_steps)

        if self.max_skip_steps is not None:
            bound = _as_int("max_skip_steps", self.max_skip_steps)
            if bound < 1:
                raise _fail("max_skip_steps", self.max_skip_steps, "must be None or >= 1")
            store("max_skip_steps", bound)

        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise _fail("kv_cache_dtype", self.kv_cache_dtype, f"must be None or one of {', '.join(KV_CACHE_DTYPES)}")

        for name in ("kv_cache", "graph_pieces", "keep_caches"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise _fail(name, value, f"must be a bool, got {type(value).__name__}")

        if self.num_inference_steps is not None:
            self._validate_steps(self.num_inference_steps)

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the configuration fields, i.e. the keys accepted by [`~RASConfig.from_options`]."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def reference_defaults(cls, **changes: Any) -> RASConfig:
        """The reference implementation's argparse defaults (``REFERENCE_SELECTION``: ``high_ratio=1.0``), with
        ``changes`` applied. Its example scripts' setting, as they run, is ``reference_defaults(high_ratio=0.3)``."""
        return cls(**{**REFERENCE_SELECTION, **changes})

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> RASConfig:
        """
        Build a configuration from a `torch.compile(..., options=...)` dictionary.

        The keys are the field names of this class; missing keys take their defaults and `None` means "all
        defaults". Keys that configure the backend rather than RAS (such as `"inner_backend"`) must be removed
        by the caller first: any unknown key raises a `ValueError` listing the allowed keys.
        """
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise ValueError(f"RAS options must be a dict, got {type(options).__name__}: {options!r}")
        allowed = cls.field_names()
        unknown = sorted(str(k) for k in options if k not in allowed)
        if unknown:
            raise ValueError(
                f"Unknown RAS option(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(allowed)}"
            )
        return cls(**options)

    def replace(self, **changes: Any) -> RASConfig:
        """Return a validated copy of this configuration with the given fields changed."""
        allowed = self.field_names()
        unknown = sorted(k for k in changes if k not in allowed)
        if unknown:
            raise ValueError(
                f"Unknown RASConfig field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
            )
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived values and checks

    @property
    def dynamic(self) -> bool:
        """Whether the number of dropped tokens varies over the steps (`skip_num_step != 0`)."""
        return self.skip_num_step != 0

    def resolved_start_step(self, num_steps: int) -> int:
        """The first step that may be a RAS step in a generation of `num_steps` steps: `scheduler_start_step`,
        or when unset the reference's step 4 of 28 scaled to `T` (at least 1; `>= T` means no RAS step)."""
        num_steps = _check_num_steps(num_steps)
        if self.scheduler_start_step is not None:
            return self.scheduler_start_step
        return max(1, _scaled_step(REFERENCE_START_STEP, num_steps))

    def resolved_error_reset_steps(self, num_steps: int) -> tuple[int, ...]:
        """The error-reset steps of a generation of `num_steps` steps: `error_reset_steps`, or when unset the
        reference's steps (12, 22) of 28 scaled to `T` (those that fall inside the generation, without
        repeats)."""
        num_steps = _check_num_steps(num_steps)
        if self.error_reset_steps is not None:
            return self.error_reset_steps
        scaled = (_scaled_step(s, num_steps) for s in REFERENCE_RESET_STEPS)
        return tuple(sorted({s for s in scaled if s < num_steps}))

    def resolved_end_step(self, num_steps: int) -> int:
        """The last step that may be a RAS step in a generation of `num_steps` steps."""
        num_steps = _check_num_steps(num_steps)
        return num_steps if self.scheduler_end_step is None else self.scheduler_end_step

    def static_num_dropped(self, num_tokens: int) -> int:
        """`D = floor((1 - sample_ratio) * N)`: the tokens a static RAS step drops (dynamic mode's `avg`)."""
        return math.floor((1.0 - self.sample_ratio) * num_tokens)

    def dynamic_num_dropped(self, step: int, num_steps: int, num_tokens: int) -> int:
        """
        The raw dynamic-mode `D` of `step`, rounded down to a multiple of `dynamic_round_to` (may lie outside
        `[0, N - 1]`; [`~RASConfig.validate_for`] rejects that for RAS steps). Only meaningful when
        `skip_num_step != 0`.
        """
        length = self.skip_num_step_length
        group = step // length
        center = ((num_steps + self.resolved_start_step(num_steps)) // length) // 2
        raw = self.static_num_dropped(num_tokens) + self.skip_num_step * (group - center)
        return (raw // self.dynamic_round_to) * self.dynamic_round_to

    def is_dense_step(self, step: int, num_steps: int) -> bool:
        """Whether the schedule makes `step` dense: before the start, after the end, or a reset step."""
        return (
            step < self.resolved_start_step(num_steps)
            or step > self.resolved_end_step(num_steps)
            or step in self.resolved_error_reset_steps(num_steps)
        )

    def _validate_steps(self, num_steps: int) -> None:
        """The checks that depend on the number of steps `T` only; they apply to the values a user set (the
        unset ones follow `T`)."""
        start = self.scheduler_start_step
        if start is not None and start >= num_steps:
            raise _fail(
                "scheduler_start_step",
                start,
                f"must be < num_inference_steps ({num_steps}), or None to follow the step count",
            )
        if self.scheduler_end_step is not None and self.scheduler_end_step > num_steps:
            raise _fail(
                "scheduler_end_step",
                self.scheduler_end_step,
                f"must be None or in [scheduler_start_step, num_inference_steps] = "
                f"[{self.resolved_start_step(num_steps)}, {num_steps}]",
            )
        beyond = [s for s in self.error_reset_steps or () if s >= num_steps]
        if beyond:
            raise _fail(
                "error_reset_steps",
                self.error_reset_steps,
                f"step(s) {beyond} are beyond the last step of a {num_steps}-step generation; "
                f"every step must be in [0, {num_steps - 1}], or None to follow the step count",
            )

    def validate_for(self, num_steps: int, num_tokens: int) -> None:
        """
        Check the configuration against a generation of `num_steps` steps (`T`) over `num_tokens` image tokens
        per image (`N`). Raises a `ValueError` naming the field, its value and the allowed range.

        Checks:
        - `num_inference_steps`, when set, equals `T`;
        - `scheduler_start_step < T` and `scheduler_end_step <= T` (`T` itself, the default, is valid);
        - every error-reset step is `< T`;
        - every RAS step drops `D` in `[0, N - 1]` tokens, so that it computes at least one. In dynamic mode
          this is checked for each RAS step; dense steps drop nothing, whatever the formula gives for them.
        """
        num_steps = _check_num_steps(num_steps)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens < 1:
            raise ValueError(f"num_tokens={num_tokens!r} is invalid: must be an int >= 1")
        num_tokens = int(num_tokens)
        if self.num_inference_steps is not None and self.num_inference_steps != num_steps:
            raise _fail(
                "num_inference_steps",
                self.num_inference_steps,
                f"does not match the generation's number of steps ({num_steps}); must be None or {num_steps}",
            )
        self._validate_steps(num_steps)
        if self.sample_ratio == 1.0:
            return  # every step is dense
        if not self.dynamic:
            num_dropped = self.static_num_dropped(num_tokens)
            if num_dropped > num_tokens - 1:
                raise _fail(
                    "sample_ratio",
                    self.sample_ratio,
                    f"drops {num_dropped} of {num_tokens} tokens, leaving none to compute; "
                    f"must leave at least one token (D in [0, {num_tokens - 1}])",
                )
            return
        for step in range(num_steps):
            if self.is_dense_step(step, num_steps):
                continue
            num_dropped = self.dynamic_num_dropped(step, num_steps, num_tokens)
            if not 0 <= num_dropped <= num_tokens - 1:
                raise _fail(
                    "skip_num_step",
                    self.skip_num_step,
                    f"gives D={num_dropped} dropped tokens at step {step} "
                    f"(skip_num_step_length={self.skip_num_step_length}, sample_ratio={self.sample_ratio}, "
                    f"T={num_steps}, N={num_tokens}); D must be in [0, {num_tokens - 1}]",
                )
