"""Train the shapes model: ``python -m rascompile.demo.shapes.train [--steps N] [--minutes M] [--out FILE]``.

Rectified flow as in SD3: for data ``x0`` and noise ``e`` at level ``s`` (logit-normal), the model
sees ``(1 - s) x0 + s e`` and regresses the velocity ``e - x0``. Captions are dropped (replaced by
the empty caption) 10% of the time, so classifier-free guidance works. The saved weights are an
exponential moving average of the trained ones. Batches come from ``ShapesDataset`` in order, so a
run is reproducible from its seed.

The shipped run's recipe is the default: DiT's adaLN-Zero initialisation (``weight_init="default"`` keeps
diffusers' instead), AdamW with ``adam_beta2=0.95``, and ``precision="bf16"``, which runs the forward and
backward under CPU autocast (weights, optimizer and EMA stay float32), with attention as plain matmul and
softmax because PyTorch's fused CPU attention is several times slower in bfloat16 backward for sequences
this short. ``sigma_shift`` moves the noise levels trained on towards noise (SD3's timestep shift,
``s' = shift * s / (1 + (shift - 1) * s)``; the default 1 leaves them); the model card reports what a run
with shift 2 gave.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .data import ShapesDataset, render_batch, tokenize
from .model import WEIGHTS, ShapesModel, ShapesModelConfig, initialize_adaln_zero, to_latents


def batches(batch_size: int, seed: int):
    """An endless, reproducible stream of (images, token ids) batches."""
    data = ShapesDataset(2**31 - 1, seed)
    index = 0
    while True:
        scenes = [data.scene(index + i) for i in range(batch_size)]
        index += batch_size
        yield render_batch(scenes), torch.tensor([tokenize(s.caption) for s in scenes])


PRECISIONS = ("fp32", "bf16")
WEIGHT_INITS = ("default", "adaln-zero")


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift: ``shift > 1`` moves noise levels towards 1 (more noise), 1 leaves them."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_loss(
    model: ShapesModel,
    images: torch.Tensor,
    ids: torch.Tensor,
    generator: torch.Generator,
    dropout: float,
    sigma_shift: float = 1.0,
):
    latents = to_latents(images)
    batch = latents.shape[0]
    sigma = shift_sigma(torch.sigmoid(torch.randn(batch, generator=generator)), sigma_shift)
    noise = torch.randn(latents.shape, generator=generator)
    keep = (torch.rand(batch, generator=generator) >= dropout).long().unsqueeze(1)
    noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
    prediction = model.velocity(noisy, sigma, ids * keep)
    return torch.nn.functional.mse_loss(prediction.float(), noise - latents)


def train(
    *,
    steps: int = 7200,
    minutes: float | None = None,
    batch_size: int = 64,
    lr: float = 2.4e-3,
    adam_beta2: float = 0.95,
    warmup: int = 200,
    ema_decay: float = 0.999,
    caption_dropout: float = 0.1,
    sigma_shift: float = 1.0,
    precision: str = "bf16",
    weight_init: str | None = None,
    seed: int = 0,
    out: str | Path | None = WEIGHTS,
    checkpoint_every: int = 500,
    model: ShapesModel | None = None,
    progress: bool = True,
) -> tuple[ShapesModel, list[dict]]:
    """Train (or continue training ``model``); returns the EMA model and the loss log."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    if weight_init is not None and weight_init not in WEIGHT_INITS:
        raise ValueError(f"weight_init={weight_init!r} is not supported; choose one of {', '.join(WEIGHT_INITS)}")
    if model is not None and weight_init is not None:
        raise ValueError(f"weight_init={weight_init!r} applies to a new model, not to one whose training continues")
    if not 0 < adam_beta2 < 1:
        raise ValueError(f"adam_beta2={adam_beta2!r} must be in (0, 1)")
    if not sigma_shift > 0:
        raise ValueError(f"sigma_shift={sigma_shift!r} must be > 0")
    torch.manual_seed(seed)
    if model is None:
        weight_init = weight_init or "adaln-zero"
        model = ShapesModel(ShapesModelConfig())
        if weight_init == "adaln-zero":
            initialize_adaln_zero(model.transformer)
    model.train()
    ema = ShapesModel(model.config)
    ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, adam_beta2), weight_decay=0.01)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed + 1)
    log: list[dict] = []
    start = time.perf_counter()
    stream = batches(batch_size, seed)
    from tqdm import tqdm

    bar = tqdm(range(steps), desc="training", disable=not progress, file=sys.stderr)
    smoothed = None
    attention = (lambda: sdpa_kernel(SDPBackend.MATH)) if precision == "bf16" else contextlib.nullcontext
    for step in bar:
        images, ids = next(stream)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"), attention():
            loss = flow_loss(model, images, ids, generator, caption_dropout, sigma_shift)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            decay = min(ema_decay, (step + 1) / (step + 10))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        value = loss.item()
        smoothed = value if smoothed is None else 0.98 * smoothed + 0.02 * value
        elapsed = time.perf_counter() - start
        log.append({"step": step + 1, "loss": value, "seconds": round(elapsed, 2), "lr": scheduler.get_last_lr()[0]})
        bar.set_postfix(loss=f"{smoothed:.4f}")
        done = minutes is not None and elapsed > minutes * 60
        if out is not None and ((step + 1) % checkpoint_every == 0 or done or step + 1 == steps):
            meta = {"steps": step + 1, "seconds": round(elapsed), "seed": seed, "batch_size": batch_size, "lr": lr}
            recipe = {"adam_beta2": adam_beta2, "sigma_shift": sigma_shift, "precision": precision}
            ema.save(out, meta | recipe | {"weight_init": weight_init or "continued"})
        if done:
            break
    return ema, log


def write_card_figures(log: list[dict], out_dir: str | Path, model: ShapesModel | None = None) -> None:
    """``loss.png`` (the training loss) and ``samples.png`` (real and generated images) for the model card."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import ShapesDataset
    from .generate import Generator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = torch.tensor([r["step"] for r in log], dtype=torch.float32)
    loss = torch.tensor([r["loss"] for r in log])
    window = 50
    smooth = torch.nn.functional.avg_pool1d(loss.view(1, 1, -1), window, stride=1).view(-1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, loss, color="lightgray", lw=0.5, label="batch loss")
    ax.plot(steps[window - 1 :], smooth, color="black", label=f"mean of {window}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    model = model if model is not None else ShapesModel.load()
    data = ShapesDataset(8, seed=70_000)
    scenes = [data.scene(i) for i in range(8)]
    generated = Generator(model)([s.caption for s in scenes], config=None, steps=20).images
    real = render_batch(scenes)
    fig, axes = plt.subplots(2, 8, figsize=(16, 4.6))
    for i, scene in enumerate(scenes):
        for row, images in enumerate((real, generated)):
            axes[row, i].imshow(((images[i].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            axes[row, i].set_xticks([])
            axes[row, i].set_yticks([])
        words = scene.caption.replace(" on a ", "\non a ").replace(" and ", "\nand ")
        axes[0, i].set_title(words, fontsize=6)
    axes[0, 0].set_ylabel("data")
    axes[1, 0].set_ylabel("model, 20 steps")
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from ..._extras import require_extra

    require_extra("demo", "tqdm", "matplotlib", feature="python -m rascompile.demo.shapes.train")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7200, help="optimizer steps (the cosine schedule's length)")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long, saving the weights")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2.4e-3, help="peak learning rate (cosine schedule)")
    parser.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW's second-moment decay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(WEIGHTS), help=f"weights file (default {WEIGHTS})")
    parser.add_argument("--init", default=None, help="start from these weights (a second, shorter schedule)")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--sigma-shift", type=float, default=1.0, help="shift noise levels towards noise (SD3's shift)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="bf16",
        help="bf16: CPU autocast, float32 weights (faster where the CPU has bfloat16 instructions)",
    )
    parser.add_argument(
        "--weight-init",
        choices=WEIGHT_INITS,
        default=None,
        help="a new model's initialisation: adaln-zero is DiT's (the default), default is diffusers'",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--log", default=None, help="write the loss log (JSON) here")
    parser.add_argument("--card", default=None, help="write the model card's loss.png and samples.png here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ShapesModel.load(args.init).train() if args.init else None
    _, log = train(
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        adam_beta2=args.adam_beta2,
        warmup=args.warmup,
        sigma_shift=args.sigma_shift,
        precision=args.precision,
        weight_init=args.weight_init,
        seed=args.seed,
        out=args.out,
        model=model,
    )
    if args.log:
        Path(args.log).write_text(json.dumps(log))
    if args.card:
        write_card_figures(log, args.card)
    print(f"trained {len(log)} steps in {log[-1]['seconds'] / 60:.1f} min; final loss {log[-1]['loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
