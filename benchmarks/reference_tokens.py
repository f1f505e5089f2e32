"""How to treat tokens whose latents never change under RAS, measured on tiny FLUX.1 Kontext and Ideogram 4.

FluxKontextPipeline joins the reference image's latents to the token axis; Ideogram4Pipeline packs zero rows for
its text before the image tokens (``[left-pad][text][image]``, the text features in another input). Those rows
never change, so their update metric is 0. Three policies, each a whole 8-step generation, compared with the dense
generation of the same seed (relative L2 error of the final latents, median over seeds), with the tokens a RAS step
computes:

* ``never``: the controller's policy. Those tokens are never selected; their outputs and K/V come from the dense
  steps; the ratio counts the generated image's tokens.
* ``always``: every RAS step computes all of them (fresh K/V) besides the selected image tokens.
* ``counted``: the ratio counts them as tokens like the others (RAS before the policy): their zero metric
  drops most of them, the rest are computed by the accident of token order.

    python benchmarks/reference_tokens.py [--model flux-kontext|ideogram4] [--seeds 5]

The model is tiny and random (no trained weights are downloadable here): the figures compare policies with each
other, not with the quality of a trained model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rascompile.runtime.controller import RASController  # noqa: E402
from rascompile.runtime.registry import controllers_of  # noqa: E402
from tests.support import models_editing as editing  # noqa: E402
from tests.support import models_layouts as layouts  # noqa: E402

POLICIES = ("never", "always", "counted")
# name: (transformer, pipeline, pipeline kwargs, what is measured)
MODELS = {
    "flux-kontext": (
        editing.tiny_flux_kontext_transformer,
        editing.tiny_flux_kontext_pipeline,
        editing.flux_kontext_pipeline_kwargs,
        "tiny FLUX.1 Kontext, 64 image + 64 reference tokens",
    ),
    "ideogram4": (
        layouts.tiny_ideogram4_transformer,
        layouts.tiny_ideogram4_pipeline,
        layouts.ideogram4_pipeline_kwargs,
        "tiny Ideogram 4 (RAS on the conditional transformer), 64 image + 5 text rows",
    ),
}


@contextlib.contextmanager
def policy(name: str):
    """Patch the controller to follow ``name`` (``never`` is the controller as it is)."""
    select, find = RASController._select, RASController._find_held_tokens

    def always(self, delta, plan):
        idx = select(self, delta, plan)
        if self.held_tokens is not None and self.held_tokens.numel():
            idx = torch.cat([idx, self.held_tokens.expand(idx.shape[0], -1)], 1).sort(1).values
        return idx

    def counted(self, delta):
        self.candidates = torch.arange(self.layout.num_tokens, device=self.device)
        self.held_tokens = self.candidates[:0]
        return True

    if name == "always":
        RASController._select = always
    elif name == "counted":
        RASController._find_held_tokens = counted
    try:
        yield
    finally:
        RASController._select, RASController._find_held_tokens = select, find


def generate(model_name: str, transformer, seed: int, ratio: float | None, name: str = "never"):
    """(final latents, tokens of the first RAS step) of one generation; ``ratio`` None: dense."""
    _, build_pipeline, pipeline_kwargs, _ = MODELS[model_name]
    torch._dynamo.reset()
    model = copy.deepcopy(transformer)
    pipe = build_pipeline(model)
    if ratio is not None:
        options = dict(num_inference_steps=8, scheduler_start_step=2, error_reset_steps=(5,), sample_ratio=ratio)
        pipe.transformer = torch.compile(model, backend="ras", options={**options, "inner_backend": "aot_eager"})
    with policy(name), torch.no_grad():
        out = pipe(**pipeline_kwargs(seed=seed))[0]
    if ratio is None:
        return out, None
    (control,) = controllers_of(pipe.transformer)
    return out, next(d.num_active for d in control.history if d.kind == "ras")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="flux-kontext")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    build_transformer, _, _, described = MODELS[args.model]
    transformer = build_transformer()
    runs = [(name, ratio) for ratio in (0.5, 0.25) for name in POLICIES]
    errors = {run: [] for run in runs}
    tokens = {}
    for seed in tqdm(range(args.seeds), desc="seeds"):
        dense, _ = generate(args.model, transformer, seed, None)
        for name, ratio in runs:
            out, k = generate(args.model, transformer, seed, ratio, name)
            errors[(name, ratio)].append(float((out - dense).norm() / dense.norm()))
            tokens[(name, ratio)] = k
    print(f"{described}, 8 steps, CPU")
    print("| policy | ratio | tokens per RAS step | relative error vs dense (median) |")
    print("|---|---|---|---|")
    for name, ratio in runs:
        print(f"| {name} | {ratio} | {tokens[(name, ratio)]} | {statistics.median(errors[(name, ratio)]):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
