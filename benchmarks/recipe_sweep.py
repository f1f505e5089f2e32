"""How the shapes model's training recipe was chosen: many recipes at the CPU's step budget, on a GPU.

A 90-minute training run on the 2-core CPU gives about 7 200 steps of batch 64, so one CPU run cannot
compare recipes. This script runs the same training (data stream, rectified-flow loss, schedule, EMA,
bf16 autocast) on a CUDA GPU, many recipes at once, and scores each recipe's EMA model along the way with
the shipped classifier, the way ``benchmarks/quality.py`` does: 256 held-out captions (``ShapesDataset``
seed 10 000), 20 Euler steps, guidance 4. The recipe it found best is ``rascompile.demo.shapes.train``'s default;
the CPU run of that recipe made the shipped weights. The model card (docs/shapes_model) reports the results.

    python benchmarks/recipe_sweep.py render 486400 /dev/shm/stream      # the scene stream, rendered once
    for name in base zero zero_lr16 ...; do
        SWEEP_COMPILE=1 SWEEP_START=$start SWEEP_SECONDS=470 \\
            python benchmarks/recipe_sweep.py train $name /dev/shm/stream &
    done; wait
    python benchmarks/recipe_sweep.py summary OUT_DIR base zero zero_lr16 ...   # results.json, grids.png

Differences from the CPU trainer, none of them part of a recipe: images are stored as 8-bit, the noise
comes from a CUDA generator, and ``SWEEP_COMPILE=1`` compiles the forward with ``torch.compile``. Each run
stops at ``SWEEP_SECONDS`` after ``SWEEP_START`` (a shared clock), so a sweep ends inside a time limit.
``check`` scores the shipped weights with this script's sampler (it gave the same figures as the pipeline).
"""

import json
import math
import os
import sys
import time
from multiprocessing import Pool

import numpy as np
import torch

from rascompile.demo.shapes.data import ShapesDataset, render, tokenize

START = float(os.environ.get("SWEEP_START", time.time()))
DEADLINE = float(os.environ.get("SWEEP_SECONDS", 480))
RESULTS = os.environ.get("SWEEP_TMP", "/tmp")

BASE = dict(
    steps=7600,
    batch=64,
    lr=8e-4,
    warmup=200,
    ema=0.999,
    init="default",
    shift=1.0,
    model={},
    betas=(0.9, 0.999),
    wd=0.01,
)
CONFIGS = {
    "base": {},  # the recipe of the first shipped weights
    "zero": dict(init="adaln-zero"),
    "zero_lr16": dict(init="adaln-zero", lr=1.6e-3),
    "zero_b32": dict(init="adaln-zero", batch=32, steps=15200),
    "zero_wide4": dict(init="adaln-zero", model=dict(layers=4, heads=8)),
    "zero_beta95": dict(init="adaln-zero", betas=(0.9, 0.95)),
    "z_lr16_b95": dict(init="adaln-zero", lr=1.6e-3, betas=(0.9, 0.95)),
    "z_lr24_b95": dict(init="adaln-zero", lr=2.4e-3, betas=(0.9, 0.95)),  # chosen
    "z_lr32_b95": dict(init="adaln-zero", lr=3.2e-3, betas=(0.9, 0.95)),
    "z_lr32": dict(init="adaln-zero", lr=3.2e-3),
    "w4_lr24_b95": dict(init="adaln-zero", lr=2.4e-3, betas=(0.9, 0.95), model=dict(layers=4, heads=8)),
    "z_lr24_b95_w500": dict(init="adaln-zero", lr=2.4e-3, betas=(0.9, 0.95), warmup=500),
}


def _render_chunk(args):
    start, count = args
    data = ShapesDataset(2**31 - 1, 0)
    images = np.empty((count, 3, 32, 32), np.uint8)
    ids = np.empty((count, 20), np.int64)
    for i in range(count):
        scene = data.scene(start + i)
        images[i] = np.round(render(scene) * 255).astype(np.uint8)
        ids[i] = tokenize(scene.caption)
    return images, ids


def render_stream(n: int, out: str) -> None:
    """The first ``n`` scenes of the training stream (seed 0, in order) as ``images.npy`` and ``ids.npy``."""
    os.makedirs(out, exist_ok=True)
    chunk = 4096
    jobs = [(i, min(chunk, n - i)) for i in range(0, n, chunk)]
    images = np.lib.format.open_memmap(f"{out}/images.npy", "w+", np.uint8, (n, 3, 32, 32))
    ids = np.lib.format.open_memmap(f"{out}/ids.npy", "w+", np.int64, (n, 20))
    with Pool(os.cpu_count()) as pool:
        for (start, count), (im, tok) in zip(jobs, pool.imap(_render_chunk, jobs)):
            images[start : start + count] = im
            ids[start : start + count] = tok
    images.flush()
    ids.flush()
    print(f"rendered {n} scenes in {time.time() - START:.0f}s", flush=True)


@torch.no_grad()
def sample(model, captions, device, steps=20, cfg=4.0, seed=0):
    """Euler sampling with classifier-free guidance over noise levels evenly spaced from 1 to 1 / steps.

    The pipeline's ``FlowMatchEulerDiscreteScheduler`` spaces them from 1 to 0.001 instead; on the first
    shipped weights the two gave the same scores (objects found 0.526 here, 0.527 through the pipeline).
    """
    from rascompile.demo.shapes.model import to_images

    ids = torch.tensor([tokenize(c) for c in captions], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(len(captions), 12, 16, 16, generator=g, device=device)
    sigmas = torch.cat([torch.linspace(1.0, 1.0 / steps, steps), torch.zeros(1)]).tolist()
    both = torch.cat([ids, torch.zeros_like(ids)])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = model.velocity(torch.cat([x, x]), torch.full((2 * len(captions),), s, device=device), both)
        conditional, unconditional = v.chunk(2)
        x = x + (s_next - s) * (unconditional + cfg * (conditional - unconditional))
    return to_images(x)


def train(name: str, data_dir: str) -> None:
    from rascompile.demo.shapes.classifier import ShapesClassifier, adherence
    from rascompile.demo.shapes.model import ShapesModel, ShapesModelConfig, initialize_adaln_zero, to_latents
    from rascompile.demo.shapes.train import shift_sigma

    c = {**BASE, **CONFIGS[name]}
    device = os.environ.get("SWEEP_DEVICE", "cuda")
    torch.manual_seed(0)
    model = ShapesModel(ShapesModelConfig(**c["model"]))
    if c["init"] == "adaln-zero":
        initialize_adaln_zero(model.transformer)
    model.to(device).train()
    params = sum(p.numel() for p in model.parameters())
    ema = ShapesModel(model.config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=c["lr"], weight_decay=c["wd"], betas=c["betas"], fused=device == "cuda"
    )
    steps, warmup, batch = c["steps"], c["warmup"], c["batch"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    velocity = model.velocity
    if os.environ.get("SWEEP_COMPILE") == "1":
        velocity = torch.compile(model.velocity)
    images = torch.from_numpy(np.load(f"{data_dir}/images.npy", mmap_mode="r")[: steps * batch].copy()).to(device)
    all_ids = torch.from_numpy(np.load(f"{data_dir}/ids.npy", mmap_mode="r")[: steps * batch].copy()).to(device)
    classifier = ShapesClassifier.load().to(device)
    held_out = ShapesDataset(256, seed=10_000)
    captions = [held_out.scene(i).caption for i in range(256)]
    grid_data = ShapesDataset(10, seed=70_000)
    grid_captions = [grid_data.scene(i).caption for i in range(10)]
    g = torch.Generator(device=device).manual_seed(1)
    evals, losses = [], []
    eval_at = sorted({steps // 4, steps // 2, 3 * steps // 4, steps})
    t0 = time.time()
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    done = 0
    for step in range(steps):
        x0 = to_latents(images[step * batch : (step + 1) * batch].float() / 127.5 - 1)
        ids = all_ids[step * batch : (step + 1) * batch]
        sigma = shift_sigma(torch.sigmoid(torch.randn(batch, generator=g, device=device)), c["shift"])
        noise = torch.randn(x0.shape, generator=g, device=device)
        keep = (torch.rand(batch, generator=g, device=device) >= 0.1).long().unsqueeze(1)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        with torch.autocast(device, torch.bfloat16):
            try:
                prediction = velocity(noisy, sigma, ids * keep)
            except Exception as error:  # a compiler failure: go on eagerly rather than lose the run
                print(name, "compile failed, eager:", repr(error)[:300], flush=True)
                velocity = model.velocity
                prediction = velocity(noisy, sigma, ids * keep)
        loss = torch.nn.functional.mse_loss(prediction.float(), noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model_params, 1.0)
        optimizer.step()
        scheduler.step()
        decay = min(c["ema"], (step + 1) / (step + 10))
        torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        done = step + 1
        if step % 100 == 0:
            losses.append((step, loss.item()))
        if step in (20, 200, 1000):
            print(f"{name}: {time.time() - t0:.1f}s at step {step}", flush=True)
        out_of_time = time.time() - START > DEADLINE
        if done in eval_at or out_of_time:
            scores = adherence(classifier, sample(ema, captions, device), captions)
            evals.append({"step": done, **{k: round(v, 4) for k, v in scores.items()}})
            print(name, evals[-1], f"{time.time() - t0:.0f}s", flush=True)
        if out_of_time:
            break
    torch.save(sample(ema, grid_captions, device).cpu(), f"{RESULTS}/{name}_grid.pt")
    result = {"name": name, "config": c, "params": params, "steps_done": done, "seconds": round(time.time() - t0)}
    with open(f"{RESULTS}/{name}_result.json", "w") as f:
        json.dump(result | {"evals": evals, "losses": losses}, f)


def summary(out_dir: str, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rascompile.demo.shapes.data import render_batch

    results = [
        json.load(open(f"{RESULTS}/{n}_result.json"))
        for n in names or CONFIGS
        if os.path.exists(f"{RESULTS}/{n}_result.json")
    ]
    json.dump(results, open(f"{out_dir}/results.json", "w"), indent=1)
    data = ShapesDataset(10, seed=70_000)
    rows = [("data", render_batch([data.scene(i) for i in range(10)]))]
    rows += [(r["name"], torch.load(f"{RESULTS}/{r['name']}_grid.pt")) for r in results]
    fig, axes = plt.subplots(len(rows), 10, figsize=(15, 1.6 * len(rows)))
    for r, (label, images) in enumerate(rows):
        for i in range(10):
            axes[r, i].imshow(((images[i].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            axes[r, i].axis("off")
        axes[r, 0].set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(f"{out_dir}/grids.png", dpi=80)
    for r in results:
        print(r["name"], r["steps_done"], r["seconds"], r["evals"][-1] if r["evals"] else None)


def check() -> None:
    from rascompile.demo.shapes.classifier import ShapesClassifier, adherence
    from rascompile.demo.shapes.model import ShapesModel

    held_out = ShapesDataset(256, seed=10_000)
    captions = [held_out.scene(i).caption for i in range(256)]
    model = ShapesModel.load().cuda()
    scores = adherence(ShapesClassifier.load().cuda(), sample(model, captions, "cuda"), captions)
    print("shipped weights, this sampler:", scores, flush=True)


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "render":
        render_stream(int(sys.argv[2]), sys.argv[3])
    elif command == "train":
        train(sys.argv[2], sys.argv[3])
    elif command == "check":
        check()
    else:
        summary(sys.argv[2], sys.argv[3:])
