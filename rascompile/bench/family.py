"""What every model family of ``rascompile bench`` provides (:class:`BenchModel`) and the random weights they share
(:func:`randomize_`). The families are in ``sd3.py``, ``flux.py`` and ``wan.py``; ``models.py`` is their registry.

A family builds its transformer and draws its inputs on the CPU by default (``rascompile bench``); the GPU suite
(``benchmarks/gpu_suite.py``) asks for them on CUDA in bf16 with the same code (``device``, ``dtype``)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable

import torch


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Redraw every parameter (diffusers zero-initialises some layers): matrices ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.02^2), biases ~ N(0, 0.02^2), from one seeded generator in parameter order.

    The generator lives on the parameters' device: on CUDA the same seed gives other numbers than on the CPU, but
    a full-size model is not drawn element by element on the host."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, device=device)
            if param.dim() >= 2:
                value = noise / math.sqrt(param[0].numel())
            elif name.endswith("weight"):
                value = 1.0 + 0.02 * noise
            else:
                value = 0.02 * noise
            param.copy_(value.to(param.dtype))
    return model


def _moved(value, device: str | torch.device | None, dtype: torch.dtype | None):
    """``value`` on ``device``; a floating tensor also cast to ``dtype`` (ids and masks keep theirs)."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device=device, dtype=dtype if value.is_floating_point() else None)


class BenchModel:
    """One family. ``s`` is a ``BenchSettings``; ``inputs`` what :meth:`make_inputs` returned."""

    name = ""
    class_name = ""
    #: transformer calls per denoising step (one per guidance branch for pipelines that call it per branch)
    calls_per_step = 1
    guidance = ""

    def construct(self, s, **overrides) -> torch.nn.Module:
        """The diffusers transformer at the sizes of ``s`` (diffusers' initial weights)."""
        raise NotImplementedError

    def draw_inputs(self, s):
        """The pipeline inputs of one image, drawn on the CPU from ``s.seed``."""
        raise NotImplementedError

    def build(
        self, s, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **overrides
    ) -> torch.nn.Module:
        """The transformer with seeded random weights (:func:`randomize_`) in eval mode, constructed on ``device``
        (default: the CPU) and then cast to ``dtype`` (default: float32). ``overrides`` are constructor arguments
        the settings do not hold (the GPU suite builds SD3-medium's ``pos_embed_max_size``)."""
        with contextlib.nullcontext() if device is None else torch.device(device):
            model = self.construct(s, **overrides)
        model = randomize_(model, s.seed)
        return (model if dtype is None else model.to(dtype)).eval()

    def make_inputs(self, s, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """:meth:`draw_inputs` (the same numbers on every device), moved to ``device`` with the floating tensors cast
        to ``dtype``."""
        inputs = self.draw_inputs(s)
        if device is None and dtype is None:
            return inputs
        fields = {f.name: _moved(getattr(inputs, f.name), device, dtype) for f in dataclasses.fields(inputs)}
        return dataclasses.replace(inputs, **fields)

    def call_kwargs(self, s, inputs, latents: torch.Tensor, t: torch.Tensor, branch: int = 0) -> dict:
        """The keyword arguments of the transformer call of guidance branch ``branch`` at timestep ``t`` (a
        scheduler timestep, on the CPU) for the current ``latents`` (the pipeline's latents, one image); the
        timestep goes to the latents' device."""
        raise NotImplementedError

    def combine(self, s, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The prediction the scheduler steps with, from the outputs of the step's calls."""
        raise NotImplementedError

    def make_scheduler(self, s):
        raise NotImplementedError

    def set_timesteps(self, s, scheduler, steps: int) -> None:
        scheduler.set_timesteps(steps)

    def describe(self, s) -> str:
        raise NotImplementedError

    def shapes(self, s) -> dict:
        """The sizes of the model and its latents, for the report's JSON."""
        return {
            "layers": s.layers,
            "hidden": s.hidden,
            "heads": s.heads,
            "head_dim": s.head_dim,
            "latent_size": s.latent_size,
            "num_tokens": s.num_tokens,
            "text_tokens": s.text_tokens,
            "batch": s.batch,
        }

    def denoise(self, transformer: Callable, s, inputs, steps: int, on_step=None) -> torch.Tensor:
        """The pipeline's denoising loop around ``transformer``; returns the final latents."""
        scheduler = self.make_scheduler(s)
        self.set_timesteps(s, scheduler, steps)
        x = inputs.latents
        for t in scheduler.timesteps:
            outs = [transformer(**self.call_kwargs(s, inputs, x, t, b))[0] for b in range(self.calls_per_step)]
            x = scheduler.step(self.combine(s, outs), t, x, return_dict=False)[0]
            if on_step is not None:
                on_step()
        return x
