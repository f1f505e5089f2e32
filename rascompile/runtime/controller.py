"""Per-generation RAS state of one compiled graph: schedule, selection, drop counts and caches.

The controller is plain Python over tensors. Each transformer call asks it for a ``Decision``:
run the original dense graph, run a dense step that also fills the caches (``capture``), or
run a RAS step over the active tokens it selected. Everything it holds is reset when a new
generation starts, and the caches are fully rewritten by the first (always dense) step, so no
state crosses generations.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import RASConfig
from . import memory, parallel
from .memory import CacheSet, cache_shapes
from .schedule import StepPlan, build_schedule
from .selector import (
    initial_drop_counts,
    layout_token_metric,
    packed_token_metric,
    select_active_tokens,
    select_active_tokens_among,
    token_metric,
)
from .staleness import advance_skip_runs, deadlines

if TYPE_CHECKING:
    from rascompile.passes.signature import StepSignature

    from .steps import StepInfo


@dataclass(frozen=True)
class GraphLayout:
    """What the controller needs to drive a graph (derived from its ``StepSignature``): sizes, cache shapes and
    dtypes, the latent layout. Graphs whose layouts differ only in cache shapes share one controller."""

    batch_size: int
    num_tokens: int
    patch_size: int
    output_cache: tuple[tuple[int, ...], torch.dtype]
    kv_caches: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    latent_layout: str = "image"  # "image": latents [B, C, H, W]; "packed": [B, N, C], one row per token
    latent: object = None  # the passes' LatentLayout (any layout, video included); None: ``latent_layout``
    parallel_group: str | None = None  # under context parallelism: the ranks decide about memory together

    @classmethod
    def from_signature(cls, signature: StepSignature) -> GraphLayout:
        """The controller's view of a step graph: the one place a ``StepSignature`` becomes a layout."""
        return cls(
            batch_size=signature.batch_size,
            num_tokens=signature.num_tokens,
            patch_size=signature.patch_size,
            output_cache=(signature.output_cache.shape, signature.output_cache.dtype),
            kv_caches=tuple((c.shape, c.dtype) for c in signature.kv_caches),
            latent_layout=signature.latent_kind,
            latent=signature.latent,
            parallel_group=signature.parallel_group,
        )


@dataclass(frozen=True)
class Decision:
    kind: str  # "dense" | "capture" | "ras"
    step: int
    active_idx: torch.Tensor | None = None
    reason: str | None = None  # why a step the schedule planned as RAS runs dense, for a warning
    branch: int = 0  # which call of this step (one call per guidance branch): the caches it uses

    @property
    def num_active(self) -> int | None:
        return None if self.active_idx is None else int(self.active_idx.shape[1])


class RASController:
    def __init__(self, config: RASConfig, layout: GraphLayout, steps, device: torch.device):
        self.config = config
        self.layout = layout
        self.steps = steps
        self.device = device
        self.schedule: tuple[StepPlan, ...] = ()
        self.drop_counts: torch.Tensor | None = None
        self.previous_latents: torch.Tensor | None = None
        # the caches per (guidance branch, piece): branch 0 is every pipeline's, the others exist for pipelines
        # that call the transformer once per branch; pieces are the graphs of a transformer Dynamo split (None:
        # a whole graph). One live set per key: a graph of other cache shapes replaces it.
        self.cache_sets: dict[tuple, CacheSet] = {}
        # the most cache bytes and guidance branches with caches held at once in the current generation
        self.cache_peak_bytes = 0
        self.cache_peak_branches = 0
        # why the current generation runs dense although its schedule has RAS steps (its caches do not fit)
        self.memory_reason: str | None = None
        self.generations = 0
        self.history: list[Decision] = []  # this generation's decisions, for inspection and tests
        self.branch_history: list[Decision] = []  # the decisions of the further guidance branches' calls
        self.step_counts: torch.Tensor | None = None  # per token: how many steps computed it
        # per token: the RAS steps it has been skipped in a row now, and the longest such run this generation
        self.skip_run: torch.Tensor | None = None
        self.max_skip_run: torch.Tensor | None = None
        # the tokens a RAS step may select (None: not known yet this generation) and those whose latents never
        # change (the reference images editing pipelines join to the token axis): never selected
        self.candidates: torch.Tensor | None = None
        self.held_tokens: torch.Tensor | None = None
        self.last_step = -1  # the last step this controller ran in the current generation
        self.step_decision: Decision | None = None  # the decision of the current step's first call
        self.branch = 0  # the current call's branch within its step
        self.branch_steps: dict[int, int] = {}  # per branch: the last step it ran
        self.owner: int | None = None  # the thread running the current generation
        self.step_generation = -1  # the step source's generation this controller's schedule belongs to
        self.busy = threading.Lock()  # held while a call runs: a second thread's call at the same time is refused

    def reset(self) -> None:
        """Forget the current generation. Calls run dense until the step source reports a new one
        (with ``backend="ras"`` that is the next call; with ``apply`` the next pipeline call)."""
        self.schedule = ()
        self.previous_latents = None
        self.drop_counts = None
        self.owner = None
        self.steps.reset()
        if not self.config.keep_caches:
            self.free_caches()

    def check_thread(self, latents: torch.Tensor, timestep: torch.Tensor | None) -> None:
        """Refuse a call from another thread while a generation runs: one controller holds the caches of one
        generation, and interleaving two would silently mix their images."""
        me = threading.get_ident()
        if self.owner is None or self.owner == me or self._finished():
            return
        if self.steps.starts_generation(latents, timestep):
            return  # a new generation replaces the one under way; that thread's next call is refused
        raise RuntimeError(
            "rascompile: this compiled transformer is running a generation in another thread; one RAS-compiled "
            "transformer serves one generation at a time (its controller holds that generation's caches). "
            "Compile one transformer per thread (torch.compile of a copy, or rascompile.apply on each pipeline)."
        )

    def _finished(self) -> bool:
        return bool(self.schedule) and self.last_step >= len(self.schedule) - 1

    @property
    def branch_caches(self) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Every branch's caches of whole graphs (pieces aside), in branch order."""
        keys = sorted((k for k in self.cache_sets if k[1] is None), key=lambda k: k[0])
        return [(self.cache_sets[k].output, self.cache_sets[k].kv) for k in keys]

    @property
    def held_branches(self) -> int:
        """How many guidance branches hold caches now."""
        return len({k[0] for k in self.cache_sets})

    def _ras_after(self, step: int) -> bool:
        """Whether a step after ``step`` of this generation's schedule is a RAS step (and so reads the caches)."""
        return any(not p.dense for p in self.schedule[step + 1 :])

    @property
    def cache_bytes(self) -> int:
        """Bytes of the caches this controller holds now."""
        return sum(c.nbytes for c in self.cache_sets.values())

    @property
    def output_cache(self) -> torch.Tensor | None:
        """Branch 0's output cache (the only one unless the pipeline calls the transformer per guidance branch)."""
        return self.branch_caches[0][0] if self.branch_caches else None

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        return self.branch_caches[0][1] if self.branch_caches else []

    def caches(
        self, branch: int = 0, layout: GraphLayout | None = None, piece: object = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(output cache, K/V caches)`` of one guidance branch for a graph of ``layout`` (default: the
        controller's), allocated on first use. ``piece``: which piece of a transformer that Dynamo split the graph
        is (each piece has its own caches, even where two pieces' shapes agree)."""
        held = self.cache_set(branch, layout, piece)
        return held.output, held.kv

    def cache_set(self, branch: int = 0, layout: GraphLayout | None = None, piece: object = None) -> CacheSet:
        """The ``CacheSet`` behind ``caches``: one live set per branch and piece, so a graph of other cache
        shapes replaces the set instead of adding one."""
        layout = layout or self.layout
        key = (branch, piece)
        held = self.cache_sets.get(key)
        if held is None or held.shapes != cache_shapes(layout):
            self.cache_sets.pop(key, None)  # freed before its replacement is allocated
            held = self.cache_sets[key] = CacheSet.allocate(layout, self.device)
            self.cache_peak_bytes = max(self.cache_peak_bytes, self.cache_bytes)
            self.cache_peak_branches = max(self.cache_peak_branches, self.held_branches)
        return held

    def free_caches(self, branch: int | None = None) -> None:
        """Drop the caches of guidance branch ``branch`` (every branch: None); the next step that needs them
        allocates them again and fills them in full (the first step of a generation always does)."""
        for key in [k for k in self.cache_sets if branch is None or k[0] == branch]:
            del self.cache_sets[key]

    def finish_call(self, decision: Decision) -> None:
        """After a call ran ``decision``: free its branch's caches when no later step of the generation reads
        them, so the VAE decode and the next models get the memory back (unless ``RASConfig.keep_caches``)."""
        if self.config.keep_caches or not self.cache_sets:
            return
        if not self._ras_after(decision.step):
            self.free_caches(decision.branch)

    def release(self) -> None:
        """Free every cache now (``RASBackend.release``). The record of the last generation (``history``,
        ``step_counts``) stays for inspection; a generation under way goes on, its next step refilling the caches."""
        self.free_caches()

    def decide(self, latents: torch.Tensor, timestep: torch.Tensor | None) -> Decision:
        """Plan one transformer call. A call that repeats the previous call's latents and timestep is the next
        guidance branch of the same step: it runs the step's decision (the same active tokens, as the rows of
        batched guidance share one selection) on that branch's own caches."""
        info = self.steps.advance(latents, timestep)
        if info.dense_reason is not None:
            self.step_decision = None
            return Decision("dense", info.step, reason=info.dense_reason)
        if info.repeat:
            return self._next_branch(info)
        if info.new_generation:
            self._begin(info.num_steps)
            self.step_generation = info.generation
            if self.memory_reason is not None:
                return self._memory_dense(info.step, self.memory_reason)
        elif self.memory_reason is not None and info.generation == self.step_generation:
            return self._memory_dense(info.step)
        elif not self.schedule or len(self.schedule) != info.num_steps or info.generation != self.step_generation:
            # This graph joined a generation already under way (e.g. Dynamo recompiled mid-generation):
            # without its earlier steps there is nothing to reuse, so it runs dense until the next one.
            self.step_decision = None
            return Decision("dense", info.step)
        if not 0 <= info.step < len(self.schedule):
            self.step_decision = None
            return Decision("dense", info.step, reason=f"a call at step {info.step}, after the last step, runs dense")
        decision = self._plan(latents, info.step)
        self.previous_latents = latents.detach().clone()
        self.last_step = info.step
        self.step_decision, self.branch = decision, 0
        self.branch_steps[0] = info.step
        self._count(decision)
        self.history.append(decision)
        return decision

    def _memory_dense(self, step: int, reason: str | None = None) -> Decision:
        """A step of a generation whose caches do not fit: dense (the warning goes with its first step)."""
        decision = Decision("dense", step, reason=reason)
        self.step_decision, self.last_step = None, step
        self.history.append(decision)
        self._count(decision)
        return decision

    def _plan(self, latents: torch.Tensor, step: int) -> Decision:
        consecutive = step == self.last_step + 1
        held_still, delta = True, None
        if consecutive and not self.schedule[step].dense:
            delta = latents.detach().float() - self.previous_latents.float()
            held_still = self._find_held_tokens(delta)
        plan = self.schedule[step]
        needs_cache = self._ras_after(step)
        capture = Decision("capture", step, self._all_tokens()) if needs_cache else Decision("dense", step)
        if plan.dense:
            return capture
        if not consecutive or not held_still:
            # Steps ran elsewhere (another graph of this transformer, e.g. a grad-mode call), or tokens held still
            # so far began to change: the caches are older than one step, so this step refills them.
            return capture
        return Decision("ras", step, self._select(delta, plan))

    def _find_held_tokens(self, delta: torch.Tensor) -> bool:
        """Find, at a generation's first RAS step, the tokens whose latents did not change in any row (the
        reference images of an editing pipeline, joined to the token axis): RAS steps never select them, so their
        outputs and K/V come from the dense steps, and the schedule's ratio counts the other tokens only. False
        when tokens found held still have changed since: the step refills the caches and they are found again at
        the next RAS step. ``delta``: the step's latent update."""
        if self.candidates is not None and not self.held_tokens.numel():
            return True  # no token held still this generation: nothing to watch
        unchanged = (self._metric(delta, "l2norm") == 0).all(dim=0)
        if self.candidates is not None:
            if not unchanged[self.held_tokens].all():
                self.candidates = self.held_tokens = None
                self.schedule = build_schedule(self.config, len(self.schedule), self.layout.num_tokens)
                return False
            return True
        held = unchanged.nonzero().flatten()
        moving = (~unchanged).nonzero().flatten()
        if held.numel() and moving.numel():
            try:
                self.schedule = build_schedule(self.config, len(self.schedule), int(moving.numel()))
            except ValueError:
                held, moving = held[:0], torch.arange(self.layout.num_tokens, device=self.device)
        self.candidates, self.held_tokens = moving, held
        return True

    def _next_branch(self, info) -> Decision:
        first = self.step_decision
        if first is None or first.step != info.step:
            return Decision("dense", info.step)  # the step's first call ran dense outside a RAS generation
        self.branch += 1
        branch, previous = self.branch, self.branch_steps.get(self.branch)
        self.branch_steps[branch] = info.step
        if first.kind != "dense" and not any(k[0] == branch for k in self.cache_sets):
            reason = self.caches_do_not_fit(sets=1)
            if reason is not None:  # this branch's caches would not fit: the generation runs dense from here on
                self.memory_reason, self.step_decision = reason, None
                self.free_caches()
                decision = Decision("dense", info.step, reason=reason, branch=branch)
                self.branch_history.append(decision)
                return decision
        if first.kind == "ras" and previous != info.step - 1:
            # this branch did not run the previous step (it is new, or it skipped one): its caches are stale
            decision = Decision("capture", info.step, self._all_tokens(), branch=branch)
        else:
            decision = Decision(first.kind, info.step, first.active_idx, branch=branch)
        self.branch_history.append(decision)
        return decision

    def count_missed_call(self, info: StepInfo | None = None) -> None:
        """Count a call of this transformer that ran before this controller could see it (the call during which
        Dynamo compiled the pieces of a split transformer): dense, as a step of its generation. ``info``: what this
        controller's step source said when the call ran (``RASBackend.step_source``); None when its inputs are
        unknown (counted now). The next step that plans RAS refills the caches first."""
        info = self.steps.advance_missed() if info is None else info
        if info.repeat:
            return  # another guidance branch of the missed step
        if info.new_generation:
            self._begin(info.num_steps)
            self.step_generation = info.generation
            decision = Decision("dense", info.step)
            self.history.append(decision)
            self._count(decision)

    def skip(self, latents: torch.Tensor, timestep: torch.Tensor | None) -> None:
        """Count a call that runs elsewhere (dense, outside RAS, e.g. in grad mode) as a step of the step source,
        so graphs sharing it keep the right step; their next step refills the caches."""
        self.steps.advance(latents, timestep)

    def _begin(self, num_steps: int) -> None:
        layout = self.layout
        self.schedule = build_schedule(self.config, num_steps, layout.num_tokens)
        self.drop_counts = initial_drop_counts(layout.batch_size, layout.num_tokens, num_steps, self.device)
        self.previous_latents = None
        self.history, self.branch_history = [], []
        self.step_counts = torch.zeros(layout.batch_size, layout.num_tokens, dtype=torch.int32, device=self.device)
        self.skip_run = torch.zeros_like(self.step_counts)
        self.max_skip_run = torch.zeros_like(self.step_counts)
        self.candidates = self.held_tokens = None
        self.generations += 1
        self.last_step = -1
        self.step_decision, self.branch, self.branch_steps = None, 0, {}
        self.owner = threading.get_ident()
        expected_branches = max(1, self.cache_peak_branches)  # as many as the last generation had
        held = self.held_branches
        self.cache_peak_bytes, self.cache_peak_branches = self.cache_bytes, held
        self.memory_reason = None
        if any(not p.dense for p in self.schedule):
            self.memory_reason = self.caches_do_not_fit(sets=expected_branches - held)
            if self.memory_reason is None:
                self.allocate_caches()
            else:
                self.free_caches()

    def caches_do_not_fit(self, sets: int = 1, layout: GraphLayout | None = None) -> str | None:
        """Why ``sets`` more cache sets of ``layout`` would not fit the device's free memory (checked on CUDA
        only); None when they fit."""
        free = memory.free_bytes(self.device) if sets > 0 else None
        if free is None:
            return None
        layout = layout or self.layout
        held = self.cache_bytes  # counted on both sides: the reason gives the generation's whole need
        need = held + sets * memory.set_bytes(layout.output_cache, layout.kv_caches)
        reason = None
        if need > free + held:
            branches, dtype = self.held_branches + sets, self.config.kv_cache_dtype
            reason = memory.too_big_reason(need, free + held, branches, layout.num_tokens, self.device, dtype)
        if layout.parallel_group is not None and parallel.any_rank(reason is not None, layout.parallel_group):
            reason = reason or "context parallelism: another rank's caches do not fit its free memory"
        return reason

    def step_count_grid(self) -> torch.Tensor | None:
        """``step_counts`` on the token grid of the latent layout: ``[B, H/p, W/p]`` for images, ``[B, F/p_t, H/p,
        W/p]`` for video (one heatmap per frame), ``[B, N]`` when the layout is unknown or packed."""
        if self.step_counts is None or self.layout.latent is None:
            return self.step_counts
        return self.layout.latent.to_grid(self.step_counts)

    def max_skip_run_grid(self) -> torch.Tensor | None:
        """``max_skip_run`` (each token's longest run of skipped RAS steps this generation) on the token grid, as
        ``step_count_grid``."""
        if self.max_skip_run is None or self.layout.latent is None:
            return self.max_skip_run
        return self.layout.latent.to_grid(self.max_skip_run)

    def allocate_caches(self, branch: int = 0) -> None:
        """Allocate the output and K/V caches of branches up to ``branch`` if they are not held (a branch's first
        step in a generation is dense and rewrites them in full)."""
        for b in range(branch + 1):
            self.caches(b)

    def _all_tokens(self) -> torch.Tensor:
        n, b = self.layout.num_tokens, self.layout.batch_size
        return torch.arange(n, device=self.device).expand(b, n).contiguous()

    def _metric(self, delta: torch.Tensor, metric: str) -> torch.Tensor:
        if self.layout.latent is not None:
            return layout_token_metric(delta, self.layout.latent, metric)
        if self.layout.latent_layout == "packed":
            return packed_token_metric(delta, metric)
        return token_metric(delta, self.layout.patch_size, metric)

    def _select(self, delta: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        metric = self._metric(delta, self.config.metric)
        deadline = deadlines(self.config, self.skip_run)
        rules = (plan.num_dropped, self.config.high_ratio, self.config.starvation_scale, deadline)
        if self.held_tokens is not None and self.held_tokens.numel():
            idx = select_active_tokens_among(metric, self.drop_counts, self.candidates, *rules)
        else:
            idx = select_active_tokens(metric, self.drop_counts, *rules)
        if idx.shape[1] != plan.num_active:
            raise AssertionError(f"selected {idx.shape[1]} tokens, schedule says {plan.num_active}")
        return idx

    def _count(self, decision: Decision) -> None:
        if decision.active_idx is None:
            self.step_counts += 1
        else:
            self.step_counts.scatter_add_(
                1, decision.active_idx, torch.ones_like(decision.active_idx, dtype=self.step_counts.dtype)
            )
        # a dense or capture step computes every token
        self.skip_run = advance_skip_runs(self.skip_run, decision.active_idx if decision.kind == "ras" else None)
        if self.held_tokens is not None and self.held_tokens.numel():
            self.skip_run[:, self.held_tokens] = 0  # never selected by design (reference tokens): not stale
        torch.maximum(self.max_skip_run, self.skip_run, out=self.max_skip_run)

    def staleness(self) -> dict | None:
        """The longest runs of RAS steps a token of this generation was skipped in a row: their maximum and 99th
        percentile over the tokens (reference tokens, never selected by design, left out); None before any."""
        if self.max_skip_run is None:
            return None
        runs = self.max_skip_run
        if self.candidates is not None and self.held_tokens is not None and self.held_tokens.numel():
            runs = runs[:, self.candidates]
        runs = runs.flatten().float()
        return {"max": int(runs.max().item()), "p99": float(torch.quantile(runs, 0.99).item())}
