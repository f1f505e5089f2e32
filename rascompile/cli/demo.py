"""``rascompile demo``: the shipped shapes model, dense and with RAS, side by side.

Generates ``--images-per-caption`` images per caption in one pipeline call, densely and with RAS at each
sample ratio (same seeds), and prints the pipeline's and the transformer's time and speedup, where the
rest of the time went, and quality (PSNR/SSIM against dense, prompt adherence from the shipped
classifier). A batch of images keeps the transformer's work large against each step's fixed cost, as in
real use. Writes ``grid.png`` (rows: dense, then each ratio; the first image of each caption) and
``heatmaps.png`` (per image, how many of the steps computed each region, as in the RAS paper's Figure 10,
with the objects outlined).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DEFAULT_CAPTIONS = (
    "a large red circle on a flat background",
    "a small blue square and a large yellow triangle on a gradient background",
    "a large green triangle and a small white circle on a textured background",
    "a large purple square and a small red circle and a small blue triangle on a flat background",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .main import finite_float, int_at_least, ratio_list

    parser.add_argument(
        "--caption", action="append", default=None, help="a caption (repeat for several; default: four examples)"
    )
    parser.add_argument(
        "--steps",
        type=int_at_least(MIN_STEPS, " (step 0 is always dense, so RAS needs a second step)"),
        default=DEFAULT_STEPS,
        help=f"denoising steps, >= {MIN_STEPS} (default {DEFAULT_STEPS}, as the reference's SD3 runs)",
    )
    parser.add_argument(
        "--ratios",
        type=ratio_list(include_one=True),
        default="0.5,0.25",
        help="comma-separated RAS sample ratios in (0, 1] (default 0.5,0.25)",
    )
    parser.add_argument(
        "--images-per-caption",
        type=int_at_least(1),
        default=DEFAULT_IMAGES_PER_CAPTION,
        help=f"images generated per caption, all in one pipeline call (default {DEFAULT_IMAGES_PER_CAPTION}: a "
        f"batch of {DEFAULT_IMAGES_PER_CAPTION * len(DEFAULT_CAPTIONS)} for the four default captions)",
    )
    parser.add_argument("--guidance-scale", type=finite_float, default=4.0, help="classifier-free guidance (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="rascompile-demo", help="directory for the PNGs (default rascompile-demo)")
    parser.add_argument(
        "--weights", metavar="FILE", default=None, help="shapes model weights (default: the shipped model)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


#: Fewest denoising steps the demo runs: step 0 is always dense, RAS starts at step 1 at the earliest.
MIN_STEPS = 2
DEFAULT_STEPS = 28
#: A batch of images keeps the transformer's work large against each step's fixed costs, as in real use; 12
#: per caption keeps the default demo under a minute on 2 CPU cores.
DEFAULT_IMAGES_PER_CAPTION = 12


def demo_config(steps: int, ratio: float):
    from ..config import RASConfig

    start = max(1, min(4, steps // 5))
    resets = tuple(s for s in (round(steps * 0.6),) if start < s < steps - 1)
    return RASConfig(
        sample_ratio=ratio, scheduler_start_step=start, error_reset_steps=resets, num_inference_steps=steps
    )


def check_caption(caption: str) -> None:
    """Raise ``ValueError`` if the shapes model cannot read ``caption`` (echoing long text only in part)."""
    from ..demo.shapes.data import MAX_CAPTION_TOKENS, TOKEN_IDS, VOCABULARY
    from .main import echo

    words = caption.lower().split()
    unknown = list(dict.fromkeys(w for w in words if w not in TOKEN_IDS or w == "<pad>"))
    if unknown:
        shown = ", ".join(echo(w, 20) for w in unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise ValueError(
            f"--caption {echo(caption)} has word(s) outside the vocabulary: {shown}; "
            f"the vocabulary is: {', '.join(VOCABULARY[1:])}"
        )
    if len(words) > MAX_CAPTION_TOKENS:
        raise ValueError(f"--caption {echo(caption)} has {len(words)} words; at most {MAX_CAPTION_TOKENS} are allowed")


def main_from_args(args: argparse.Namespace) -> int:
    from .._extras import require_extra
    from .main import quiet_third_party

    require_extra("demo", feature="rascompile demo")  # tqdm, PIL, matplotlib, torchmetrics, transformers
    quiet_third_party()
    from safetensors import SafetensorError
    from tqdm import tqdm

    from ..demo.shapes.classifier import WEIGHTS as CLASSIFIER_WEIGHTS
    from ..demo.shapes.classifier import ShapesClassifier, adherence
    from ..demo.shapes.generate import Generator
    from ..demo.shapes.model import WEIGHTS, ShapesModel
    from ..demo.shapes.quality import fidelity
    from .main import check_output_directory

    captions = list(args.caption or DEFAULT_CAPTIONS)
    try:
        for caption in captions:
            check_caption(caption)
        check_output_directory(args.out, "--out")
        ratios = list(args.ratios)
        configs = [demo_config(args.steps, r) for r in ratios]
        if args.weights is not None and not Path(args.weights).exists():
            raise FileNotFoundError(f"--weights {args.weights} does not exist")
        model = ShapesModel.load(args.weights or WEIGHTS)
        for config in configs:
            config.validate_for(args.steps, model.config.num_tokens)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        classifier = ShapesClassifier.load()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (SafetensorError, OSError, RuntimeError) as exc:  # a damaged file: unreadable, or other tensors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: shapes classifier weights {CLASSIFIER_WEIGHTS} cannot be loaded: {reason}", file=sys.stderr)
        return 2

    generate = Generator(model)
    batch = [caption for caption in captions for _ in range(args.images_per_caption)]
    firsts = list(range(0, len(batch), args.images_per_caption))  # the first image of each caption
    runs = [("dense", None)] + [(f"RAS {c.sample_ratio:g}", c) for c in configs]
    results = {}
    with tqdm(total=2 * len(runs), desc="generating", disable=args.no_progress, file=sys.stderr) as bar:
        for name, config in runs:
            call = dict(config=config, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed)
            # Untimed first call: it compiles RAS's graphs; dense runs eagerly, and 2 steps warm it up.
            generate(batch, **(call if config is not None else call | {"steps": min(2, args.steps)}))
            bar.update()
            results[name] = generate(batch, **call)
            bar.update()

    dense = results["dense"]
    print(
        f"shapes model, {len(captions)} caption(s) x {args.images_per_caption} image(s) in one call (batch "
        f"{len(batch)}, {2 * len(batch)} with guidance), {args.steps} steps, guidance {args.guidance_scale}, "
        f"seed {args.seed}"
    )
    print(
        f"{'':<10} {'pipeline s':>10} {'speedup':>8} {'transformer s':>13} {'speedup':>8} {'PSNR dB':>8} "
        f"{'SSIM':>6} {'objects':>8} {'exact':>6}"
    )
    for name, result in results.items():
        scores = adherence(classifier, result.images, batch)
        quality = fidelity(result.images, dense.images) if name != "dense" else None
        psnr = f"{quality['psnr']:8.1f}" if quality else f"{'-':>8}"
        ssim = f"{quality['ssim']:6.3f}" if quality else f"{'-':>6}"
        print(
            f"{name:<10} {result.seconds:10.2f} {dense.seconds / result.seconds:7.2f}x "
            f"{result.transformer_seconds:13.2f} {dense.transformer_seconds / result.transformer_seconds:7.2f}x "
            f"{psnr} {ssim} {scores['object_recall']:8.2f} {scores['exact_objects']:6.2f}"
        )
    print("  objects: share of the captions' objects the classifier finds; exact: images with exactly those objects")
    for config in configs:
        print("  " + where_time_went(results[f"RAS {config.sample_ratio:g}"], dense, config, args.steps, model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shown = {name: result.select(firsts) for name, result in results.items()}
    write_grid(out / "grid.png", shown, captions)
    write_heatmaps(out / "heatmaps.png", shown, args.steps)
    print(f"wrote {out / 'grid.png'} and {out / 'heatmaps.png'}")
    return 0


def where_time_went(result, dense, config, steps: int, model) -> str:
    """Two lines: what the RAS run's dense steps cost, how much faster its RAS steps ran than a dense step, the
    time outside the transformer; how often its RAS steps computed the objects and the background."""
    from ..demo.shapes.regions import computation_by_region, object_tokens
    from ..runtime.schedule import build_schedule

    schedule = build_schedule(config, steps, model.config.num_tokens)
    dense_steps = [p.step for p in schedule if p.dense]
    ras_steps = [p.step for p in schedule if not p.dense]
    name = f"RAS {config.sample_ratio:g}:"
    if result.step_counts is None:
        return f"{name} ran dense (the warning above says why)"
    if not ras_steps:
        return f"{name} no RAS step in {steps} steps (every step ran dense)"
    dense_s = sum(result.call_seconds[s] for s in dense_steps)
    ras_s = sum(result.call_seconds[s] for s in ras_steps)
    dense_step_s = dense.transformer_seconds / steps
    regions = computation_by_region(result.step_counts, object_tokens(result.images), len(dense_steps), len(ras_steps))
    ras_step_s = ras_s / len(ras_steps)
    runs = result.skip_runs.flatten().float()
    bound = f" (max_skip_steps {config.max_skip_steps})" if config.max_skip_steps is not None else " (no bound)"
    return (
        f"{name} its {len(dense_steps)} dense steps (the first and the resets) took {dense_s:.2f} s, its "
        f"{len(ras_steps)} RAS steps {ras_step_s:.3f} s each ({dense_step_s / ras_step_s:.2f}x faster than a dense "
        f"step); outside the transformer: {result.seconds - result.transformer_seconds:.2f} s\n"
        f"  {' ' * len(name)} its RAS steps computed the objects' tokens {regions['objects_computed']:.0%} of the "
        f"time, the background's {regions['background_computed']:.0%}; the longest a token went uncomputed: "
        f"{int(runs.max())} RAS steps in a row (99th percentile {torch.quantile(runs, 0.99).item():g}){bound}"
    )


def write_grid(path: Path, results: dict, captions: list[str], scale: int = 4) -> None:
    from PIL import Image, ImageDraw

    rows = [r.images for r in results.values()]
    size = rows[0].shape[-1] * scale
    label = 90
    canvas = Image.new("RGB", (label + size * len(captions), size * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (name, images) in enumerate(zip(results, rows)):
        draw.text((4, row * size + size // 2 - 6), name, fill="black")
        for col, image in enumerate(images):
            pixels = ((image.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
            tile = Image.fromarray(pixels).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label + col * size, row * size))
    canvas.save(path)


def write_heatmaps(path: Path, results: dict, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..demo.shapes.regions import STALENESS_BOUND, mark_stale, object_tokens, outline_objects

    ras = [(name, r) for name, r in results.items() if r.step_counts is not None]
    if not ras:
        return
    cols = ras[0][1].images.shape[0]
    objects = [object_tokens(result.images) for _, result in ras]
    fig, axes = plt.subplots(
        2 * len(ras), cols, figsize=(2.2 * cols + 1, 4.4 * len(ras)), squeeze=False, layout="constrained"
    )
    for i, (name, result) in enumerate(ras):
        for j in range(cols):
            axes[2 * i, j].imshow(((result.images[j].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            shown = axes[2 * i + 1, j].imshow(result.step_counts[j].numpy(), cmap="magma", vmin=0, vmax=steps)
            outline_objects(axes[2 * i + 1, j], objects[i][j])
            mark_stale(axes[2 * i + 1, j], result.skip_runs[j] if result.skip_runs is not None else None)
            axes[2 * i, j].set_title(name if j == 0 else "", loc="left", fontsize=9)
            for ax in (axes[2 * i, j], axes[2 * i + 1, j]):
                ax.set_xticks([])
                ax.set_yticks([])
        fig.colorbar(shown, ax=list(axes[2 * i : 2 * i + 2].flatten()), shrink=0.6, label="steps computed")
    fig.suptitle(
        f"How many of the {steps} steps computed each region (cyan: the objects in the image; x: skipped on more "
        f"than {STALENESS_BOUND} RAS steps in a row)"
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
