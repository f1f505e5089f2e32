"""``rascompile demo``: the shipped shapes model, dense and with RAS, side by side.

Generates one image per caption densely and with RAS at each sample ratio (same seeds), prints time,
speedup and quality (PSNR/SSIM against dense, prompt adherence from the shipped classifier), and
writes ``grid.png`` (rows: dense, then each ratio) and ``heatmaps.png`` (per image, how many of the
steps computed each region, as in the RAS paper's Figure 10).
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
        default=20,
        help=f"denoising steps, >= {MIN_STEPS} (default 20)",
    )
    parser.add_argument(
        "--ratios",
        type=ratio_list(include_one=True),
        default="0.5,0.25",
        help="comma-separated RAS sample ratios in (0, 1] (default 0.5,0.25)",
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
    runs = [("dense", None)] + [(f"RAS {c.sample_ratio:g}", c) for c in configs]
    results = {}
    with tqdm(total=2 * len(runs), desc="generating", disable=args.no_progress, file=sys.stderr) as bar:
        for name, config in runs:
            call = dict(config=config, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed)
            generate(captions, **call)  # first call traces the graph; the second is timed
            bar.update()
            results[name] = generate(captions, **call)
            bar.update()

    dense = results["dense"]
    print(
        f"shapes model, {len(captions)} captions, {args.steps} steps, guidance {args.guidance_scale}, seed {args.seed}"
    )
    header = f"{'':<10} {'seconds':>8} {'speedup':>8} {'PSNR dB':>8} {'SSIM':>6} {'objects':>8} {'exact':>6}"
    print(header)
    for name, result in results.items():
        scores = adherence(classifier, result.images, captions)
        quality = fidelity(result.images, dense.images) if name != "dense" else None
        psnr = f"{quality['psnr']:8.1f}" if quality else f"{'-':>8}"
        ssim = f"{quality['ssim']:6.3f}" if quality else f"{'-':>6}"
        print(
            f"{name:<10} {result.seconds:8.2f} {dense.seconds / result.seconds:7.2f}x {psnr} {ssim} "
            f"{scores['object_recall']:8.2f} {scores['exact_objects']:6.2f}"
        )
    print("  objects: share of the captions' objects the classifier finds; exact: images with exactly those objects")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_grid(out / "grid.png", results, captions)
    write_heatmaps(out / "heatmaps.png", results, args.steps)
    print(f"wrote {out / 'grid.png'} and {out / 'heatmaps.png'}")
    return 0


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

    ras = [(name, r) for name, r in results.items() if r.step_counts is not None]
    if not ras:
        return
    cols = ras[0][1].images.shape[0]
    fig, axes = plt.subplots(2 * len(ras), cols, figsize=(2.2 * cols, 4.4 * len(ras)), squeeze=False)
    for i, (name, result) in enumerate(ras):
        for j in range(cols):
            axes[2 * i, j].imshow(((result.images[j].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            shown = axes[2 * i + 1, j].imshow(result.step_counts[j].numpy(), cmap="magma", vmin=0, vmax=steps)
            axes[2 * i, j].set_title(name if j == 0 else "", loc="left", fontsize=9)
            for ax in (axes[2 * i, j], axes[2 * i + 1, j]):
                ax.set_xticks([])
                ax.set_yticks([])
        fig.colorbar(shown, ax=list(axes[2 * i + 1]), shrink=0.8, label="steps computed")
    fig.suptitle(f"How many of the {steps} steps computed each region")
    fig.savefig(path, dpi=110)
    plt.close(fig)
