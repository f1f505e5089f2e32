"""Generate images with the shapes model, dense or with RAS, through the diffusers pipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...api import apply
from ...config import RASConfig
from .model import ShapesModel, call_kwargs, make_pipeline, to_images


@dataclass
class Generation:
    images: torch.Tensor  # [B, 3, 32, 32] in [-1, 1]
    seconds: float  # wall time of the pipeline call (compilation excluded after the first call)
    call_seconds: list[float]  # wall time of each of the transformer's calls (one per step)
    step_counts: torch.Tensor | None  # [B, 8, 8]: how many steps computed each token (RAS only)
    # [B, 8, 8]: each token's longest run of RAS steps it was skipped in a row (RAS only)
    skip_runs: torch.Tensor | None = None

    @property
    def transformer_seconds(self) -> float:
        """The part of ``seconds`` spent in the transformer."""
        return sum(self.call_seconds)

    def select(self, indices: list[int]) -> Generation:
        """The images (and their step counts) at ``indices``; the timings stay those of the whole call."""
        counts = self.step_counts[indices] if self.step_counts is not None else None
        runs = self.skip_runs[indices] if self.skip_runs is not None else None
        return Generation(self.images[indices], self.seconds, self.call_seconds, counts, runs)


class _TimedTransformer(torch.nn.Module):
    """``pipe.transformer`` behind a clock: each call's wall time goes to ``call_seconds``. It wraps the compiled
    module from outside, so the clock is plain Python and never traced; attributes the pipeline reads
    (``config``, ``dtype``) come from the wrapped transformer."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.call_seconds: list[float] = []

    def forward(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.transformer(*args, **kwargs)
        finally:
            self.call_seconds.append(time.perf_counter() - start)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.transformer, name)


class Generator:
    """One pipeline per setting, compiled once and reused across calls (so timings exclude compilation)."""

    def __init__(self, model: ShapesModel, *, inner_backend: str = "eager"):
        self.model = model
        self.inner_backend = inner_backend
        self.pipes: dict = {}

    def __call__(
        self,
        captions: list[str],
        *,
        config: RASConfig | None,
        steps: int,
        guidance_scale: float = 4.0,
        seed: int = 0,
    ) -> Generation:
        """Dense when ``config`` is None; RAS with ``config`` otherwise (its step count is ``steps``)."""
        key = (config, steps)
        entry = self.pipes.get(key)
        if entry is None:
            pipe = make_pipeline(self.model)
            backend = None
            if config is not None:
                # Every setting compiles the same forward; start from a clean Dynamo cache so that many
                # settings in one process never reach Dynamo's recompile limit (which would run eagerly).
                torch._dynamo.reset()
                self.pipes = {k: v for k, v in self.pipes.items() if v[1] is None}
                backend = apply(pipe, config.replace(num_inference_steps=steps), inner_backend=self.inner_backend)
            # set directly: the pipeline's registered component stays the (compiled) transformer
            object.__setattr__(pipe, "transformer", _TimedTransformer(pipe.transformer))
            entry = self.pipes[key] = (pipe, backend)
        pipe, backend = entry
        pipe.transformer.call_seconds = []
        kwargs = call_kwargs(self.model, captions, steps=steps, guidance_scale=guidance_scale, seed=seed)
        start = time.perf_counter()
        with torch.no_grad():
            latents = pipe(**kwargs)[0]
        seconds = time.perf_counter() - start
        counts = runs = None
        if backend is not None and backend.graphs and backend.graphs[0].controller is not None:
            controller = backend.graphs[0].controller
            # CFG rows of one image share a selection: keep the conditional half
            counts = controller.step_count_grid()[-len(captions) :].clone()
            runs = controller.max_skip_run_grid()[-len(captions) :].clone()
        return Generation(to_images(latents), seconds, pipe.transformer.call_seconds, counts, runs)
