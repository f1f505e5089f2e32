"""Quality against speed for RAS on the shipped shapes model: the paper's Table 2, Figure 2 and Table 3 in miniature.

    python benchmarks/quality.py [--samples 256] [--out docs/quality]

For every setting it generates ``--samples`` images from captions of held-out procedural scenes (the
same captions and seeds for every setting) and measures:

- throughput: images per second of the whole pipeline call (2-core CPU, eager), after a warm-up call;
- fidelity to the dense result with the same seed and step count: PSNR and SSIM;
- prompt adherence (the CLIP-score analogue): the share of each caption's (colour, shape) objects that
  the shipped classifier finds, and the share of images with exactly the captioned objects;
- distribution distance (the FID analogue): Fréchet distance between the classifier's penultimate
  features of the generated images and of real procedural images.

Settings: dense sampling at 3 to 28 steps; RAS at sample ratios 0.75, 0.5, 0.25, 0.125 at 12, 20 and
28 steps; and the Table 3 ablations at 20 steps and mean ratio about 0.25. As in the paper, the Table 3
default uses a dynamic sampling ratio (fewer tokens as the generation settles); the ablations are a static
ratio, random dropping, no error reset, no K/V cache, and the sign of the starvation term. Every row also
reports the share of token-steps the transformer computed. It writes ``results.json``, ``table2.md``,
``table3.md`` and ``pareto.png`` to ``--out``, and the tables of ``--out``'s README.md (between
the ``TABLE_MARKERS``); ``--render-only`` rewrites the tables from the results.json there without a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rascompile._extras import require_extra
from rascompile.cli.demo import demo_config
from rascompile.demo.shapes.classifier import ShapesClassifier, adherence
from rascompile.demo.shapes.data import ShapesDataset, render_batch
from rascompile.demo.shapes.generate import Generator
from rascompile.demo.shapes.model import ShapesModel
from rascompile.demo.shapes.quality import fidelity, frechet_distance
from rascompile.runtime.schedule import build_schedule

DENSE_STEPS = (3, 5, 8, 12, 20, 28)
RAS_STEPS = (12, 20, 28)
RATIOS = (0.75, 0.5, 0.25, 0.125)
ABLATION_STEPS, ABLATION_RATIO = 20, 0.25
# At 20 steps, groups of 4 steps compute 22, 18, 14 and 10 of the 64 tokens: 16.1 on average over the RAS
# steps, the same as the static ratio 0.25 (16 tokens) it is compared with.
DYNAMIC = {"sample_ratio": 0.21875, "skip_num_step": 4, "skip_num_step_length": 4, "dynamic_round_to": 1}
ABLATIONS = {
    "default (dynamic ratio)": {},
    "static sampling ratio": {"sample_ratio": ABLATION_RATIO, "skip_num_step": 0, "skip_num_step_length": 0},
    "random dropping": {"metric": "random"},
    "no error reset": {"error_reset_steps": ()},
    "no K/V cache": {"kv_cache": False},
    "starvation_scale -0.1": {"starvation_scale": -0.1},
    "starvation_scale 1, high_ratio 0.3": {"starvation_scale": 1.0, "high_ratio": 0.3},
}


def settings(quick: bool) -> list[dict]:
    dense_steps, ras_steps, ratios = (DENSE_STEPS, RAS_STEPS, RATIOS) if not quick else ((3, 8), (8,), (0.5,))
    rows = [{"name": f"dense {s}", "table": "2", "steps": s, "config": None} for s in dense_steps]
    for steps in ras_steps:
        for ratio in ratios:
            rows.append(
                {"name": f"RAS {ratio:g} @ {steps}", "table": "2", "steps": steps, "config": demo_config(steps, ratio)}
            )
    ablation_steps = ABLATION_STEPS if not quick else 8
    base = demo_config(ablation_steps, ABLATION_RATIO).replace(**DYNAMIC)
    for name, change in ABLATIONS.items():
        rows.append({"name": name, "table": "3", "steps": ablation_steps, "config": base.replace(**change)})
    return rows


def run(args) -> dict:
    model, classifier = ShapesModel.load(), ShapesClassifier.load()
    generate = Generator(model)
    scenes = [ShapesDataset(args.samples, seed=50_000).scene(i) for i in range(args.samples)]
    captions = [s.caption for s in scenes]
    batches = [captions[i : i + args.batch] for i in range(0, len(captions), args.batch)]
    real = ShapesDataset(args.real, seed=60_000)
    with torch.no_grad():
        real_features = classifier.features(render_batch([real.scene(i) for i in range(len(real))]))
    results, dense_images = [], {}
    from tqdm import tqdm

    for row in tqdm(settings(args.quick), desc="settings", file=sys.stderr):
        call = dict(config=row["config"], steps=row["steps"], guidance_scale=args.guidance_scale)
        generate(batches[0], **call, seed=0)  # warm-up: traces and plans
        images, seconds, counts = [], 0.0, []
        for i, batch in enumerate(batches):
            result = generate(batch, **call, seed=i)
            images.append(result.images)
            seconds += result.seconds
            if result.step_counts is not None:
                counts.append(result.step_counts.flatten(1))
        images = torch.cat(images)
        if row["config"] is None:
            dense_images[row["steps"]] = images
        with torch.no_grad():
            features = classifier.features(images)
        record = {
            "name": row["name"],
            "table": row["table"],
            "steps": row["steps"],
            "sample_ratio": None if row["config"] is None else row["config"].sample_ratio,
            "images_per_s": len(images) / seconds,
            **computation(row, torch.cat(counts) if counts else None, model.config.num_tokens),
            **adherence(classifier, images, captions),
            "frechet_distance": frechet_distance(features, real_features),
        }
        reference = dense_images.get(row["steps"])
        if row["config"] is not None and reference is not None:
            record |= fidelity(images, reference)
        results.append(record)
    return {"samples": args.samples, "real_samples": args.real, "guidance_scale": args.guidance_scale, "rows": results}


def computation(row: dict, step_counts: torch.Tensor | None, num_tokens: int) -> dict:
    """The share of token-steps computed, and how sticky the selection was: the share of tokens that the RAS
    steps computed every time or never (1.0 means the same tokens on every RAS step)."""
    if step_counts is None:
        return {"tokens_computed": 1.0}
    schedule = build_schedule(row["config"], row["steps"], num_tokens)
    ras_steps = sum(not plan.dense for plan in schedule)
    on_ras_steps = step_counts - (row["steps"] - ras_steps)
    sticky = (on_ras_steps == 0) | (on_ras_steps == ras_steps)
    return {
        "tokens_computed": step_counts.float().mean().item() / row["steps"],
        "always_or_never": sticky.float().mean().item(),
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "| setting | steps | tokens computed | always or never | images/s | PSNR dB | SSIM | objects found "
        "| exact objects | Fréchet distance |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        psnr = f"{r['psnr']:.1f}" if "psnr" in r else "-"
        ssim = f"{r['ssim']:.3f}" if "ssim" in r else "-"
        sticky = f"{r['always_or_never']:.2f}" if "always_or_never" in r else "-"
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['tokens_computed']:.2f} | {sticky} | "
            f"{r['images_per_s']:.1f} | {psnr} | {ssim} | "
            f"{r['object_recall']:.3f} | {r['exact_objects']:.3f} | {r['frechet_distance']:.2f} |"
        )
    return "\n".join(lines) + "\n"


#: Where docs/quality/README.md holds each table; ``write_docs`` rewrites what lies between the markers.
TABLE_MARKERS = {
    table: (f"<!-- table{table}: written by benchmarks/quality.py from results.json -->", f"<!-- table{table} end -->")
    for table in ("2", "3")
}


def table_rows(results: dict, table: str) -> list[dict]:
    return [r for r in results["rows"] if r["table"] == table]


def render_readme(text: str, results: dict) -> str:
    """``text`` (docs/quality/README.md) with each table between its markers rendered from ``results``."""
    for table, (start, end) in TABLE_MARKERS.items():
        i, j = text.find(start), text.find(end)
        if i < 0 or j < i:
            raise ValueError(f"the README has no table {table} between {start!r} and {end!r}")
        text = text[: i + len(start)] + "\n" + markdown(table_rows(results, table)) + text[j:]
    return text


def write_docs(out: Path, results: dict) -> list[str]:
    """Write table2.md, table3.md and, where ``out`` holds a README.md, its tables, from ``results``; the names."""
    written = []
    for table in TABLE_MARKERS:
        (out / f"table{table}.md").write_text(markdown(table_rows(results, table)))
        written.append(f"table{table}.md")
    readme = out / "README.md"
    if readme.exists():
        readme.write_text(render_readme(readme.read_text(), results))
        written.append("README.md")
    return written


def pareto_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "frechet_distance", "Fréchet distance to real images (lower is better)"),
        (axes[1], "object_recall", "captioned objects found (higher is better)"),
    ):
        dense = [r for r in rows if r["sample_ratio"] is None]
        ax.plot(
            [r["images_per_s"] for r in dense], [r[key] for r in dense], "o-", color="black", label="dense, 3-28 steps"
        )
        for r in dense:
            ax.annotate(
                str(r["steps"]), (r["images_per_s"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        for steps, marker in zip(RAS_STEPS, "s^D"):
            ras = [r for r in rows if r["sample_ratio"] is not None and r["steps"] == steps]
            if ras:
                ax.plot(
                    [r["images_per_s"] for r in ras], [r[key] for r in ras], marker + "--", label=f"RAS @ {steps} steps"
                )
                for r in ras:
                    ax.annotate(
                        f"{r['sample_ratio']:g}",
                        (r["images_per_s"], r[key]),
                        fontsize=7,
                        xytext=(3, -9),
                        textcoords="offset points",
                    )
        ax.set_xlabel("throughput (images/s, 2-core CPU)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Shapes model: quality against throughput (labels: steps for dense, sample ratio for RAS)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256, help="generated images per setting (default 256)")
    parser.add_argument("--batch", type=int, default=64, help="captions per pipeline call (default 64)")
    parser.add_argument("--real", type=int, default=2048, help="real images for the Fréchet distance")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--quick", action="store_true", help="a few settings only (tests)")
    parser.add_argument("--out", default="docs/quality", help="output directory (default docs/quality)")
    parser.add_argument(
        "--render-only", action="store_true", help="only rewrite the tables in --out from its results.json (no run)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render_only:
        written = write_docs(out, json.loads((out / "results.json").read_text()))
        print(f"wrote {', '.join(written)} in {out} from results.json")
        return 0
    require_extra("demo", feature="benchmarks/quality.py")  # tqdm, torchmetrics, matplotlib, transformers
    start = time.perf_counter()
    results = run(args)
    results["seconds"] = round(time.perf_counter() - start)
    results["command"] = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    written = write_docs(out, results)
    pareto_plot(table_rows(results, "2"), out / "pareto.png")
    print(markdown(results["rows"]))
    print(f"wrote results.json, {', '.join(written)}, pareto.png in {out} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
