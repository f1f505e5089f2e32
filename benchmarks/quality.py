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
from rascompile.bench.workload import machine_info
from rascompile.cli.demo import demo_config
from rascompile.cli.main import quiet_third_party
from rascompile.config import REFERENCE_SELECTION, RASConfig
from rascompile.demo.shapes.classifier import ShapesClassifier, adherence
from rascompile.demo.shapes.data import ShapesDataset, render_batch
from rascompile.demo.shapes.generate import Generator
from rascompile.demo.shapes.model import ShapesModel
from rascompile.demo.shapes.quality import fidelity, frechet_distance
from rascompile.demo.shapes.quality_docs import (  # noqa: F401 - the tables, settings and docs renderers
    ABLATION_RATIO,
    ABLATION_STEPS,
    ABLATIONS,
    CACHE_DTYPE_RATIOS,
    DENSE_STEPS,
    DYNAMIC,
    PROJECT_PAGES,
    RAS_STEPS,
    RATIOS,
    SELECTION_SETTINGS,
    STALENESS_RATIOS,
    STALENESS_SETTINGS,
    SWEEP_HIGH_RATIOS,
    SWEEP_STARVATION_SCALES,
    TABLES,
    cache_dtype_markdown,
    equal_throughput_pairs,
    findings,
    markdown,
    project_summary,
    provenance,
    render_configuration_page,
    render_demo_page,
    render_readme,
    selection_rows,
    sweep_name,
    table_markdown,
    table_rows,
)
from rascompile.demo.shapes.regions import (
    STALENESS_BOUND,
    computation_by_region,
    mark_stale,
    object_tokens,
    outline_objects,
)
from rascompile.runtime.schedule import build_schedule

DOCS = Path(__file__).resolve().parents[1] / "docs" / "quality"


def settings(quick: bool, tables: tuple[str, ...] = TABLES) -> list[dict]:
    """The rows of ``tables``. Without table 2, the dense row at the ablations' step count still runs (as
    ``"table": None``, not reported), since PSNR and SSIM compare with it."""
    dense_steps, ras_steps, ratios = (DENSE_STEPS, RAS_STEPS, RATIOS) if not quick else ((3, 8), (8,), (0.5,))
    ablation_steps = ABLATION_STEPS if not quick else 8
    rows = []
    if "2" in tables:
        rows += [{"name": f"dense {s}", "table": "2", "steps": s, "config": None} for s in dense_steps]
        for steps in ras_steps:
            for ratio in ratios:
                config = demo_config(steps, ratio)
                rows.append({"name": f"RAS {ratio:g} @ {steps}", "table": "2", "steps": steps, "config": config})
    else:
        rows.append({"name": f"dense {ablation_steps}", "table": None, "steps": ablation_steps, "config": None})
    if "3" in tables:
        base = demo_config(ablation_steps, ABLATION_RATIO).replace(**DYNAMIC)
        for name, change in ABLATIONS.items():
            rows.append({"name": name, "table": "3", "steps": ablation_steps, "config": base.replace(**change)})
    if "4" in tables:
        static = demo_config(ablation_steps, ABLATION_RATIO)
        high_ratios = SWEEP_HIGH_RATIOS if not quick else (SWEEP_HIGH_RATIOS[0], SWEEP_HIGH_RATIOS[-1])
        scales = SWEEP_STARVATION_SCALES if not quick else SWEEP_STARVATION_SCALES[:1]
        # the two knobs without a staleness bound, as the reference selects
        configs = [
            static.replace(high_ratio=high, starvation_scale=scale, max_skip_steps=None)
            for high in high_ratios
            for scale in scales
        ]
        staleness = STALENESS_SETTINGS if not quick else STALENESS_SETTINGS[-1:]
        for ratio in STALENESS_RATIOS if not quick else STALENESS_RATIOS[:1]:
            configs += [demo_config(ablation_steps, ratio).replace(**change) for change in staleness]
        for config in dict.fromkeys(configs):  # the sweeps share a row or two
            rows.append({"name": sweep_name(config), "table": "4", "steps": ablation_steps, "config": config})
    if "5" in tables:
        for ratio in CACHE_DTYPE_RATIOS if not quick else CACHE_DTYPE_RATIOS[:1]:
            config = demo_config(ablation_steps, ratio)
            for dtype in (None, "fp8_e4m3"):
                name = f"{'float8' if dtype else 'model-dtype'} caches @ ratio {ratio:g}"
                row_config = config.replace(kv_cache_dtype=dtype)
                rows.append({"name": name, "table": "5", "steps": ablation_steps, "config": row_config})
    return rows


def run(args) -> dict:
    model, classifier = ShapesModel.load(), ShapesClassifier.load()
    generate = Generator(model)
    scenes = [ShapesDataset(args.samples, seed=50_000).scene(i) for i in range(args.samples)]
    captions = [s.caption for s in scenes]
    batches = [captions[i : i + args.batch] for i in range(0, len(captions), args.batch)]
    real_scenes = [ShapesDataset(args.real, seed=60_000).scene(i) for i in range(args.real)]
    with torch.no_grad():
        real_images = render_batch(real_scenes)
        real_features = classifier.features(real_images)
        real_scores = adherence(classifier, real_images, [s.caption for s in real_scenes])
    results, dense_images, model_dtype_images = [], {}, {}
    from tqdm import tqdm

    for row in tqdm(settings(args.quick, args.tables), desc="settings", file=sys.stderr):
        call = dict(config=row["config"], steps=row["steps"], guidance_scale=args.guidance_scale)
        generate(batches[0], **call, seed=0)  # warm-up: traces and plans
        images, seconds, counts, runs = [], 0.0, [], []
        for i, batch in enumerate(batches):
            result = generate(batch, **call, seed=i)
            images.append(result.images)
            seconds += result.seconds
            if result.step_counts is not None:
                counts.append(result.step_counts.flatten(1))
                runs.append(result.skip_runs.flatten(1))
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
            "high_ratio": None if row["config"] is None else row["config"].high_ratio,
            "starvation_scale": None if row["config"] is None else row["config"].starvation_scale,
            "max_skip_steps": None if row["config"] is None else row["config"].max_skip_steps,
            "images_per_s": len(images) / seconds,
            **staleness(torch.cat(runs) if runs else None),
            **computation(row, torch.cat(counts) if counts else None, model.config.num_tokens, images),
            **adherence(classifier, images, captions),
            "frechet_distance": frechet_distance(features, real_features),
        }
        reference = dense_images.get(row["steps"])
        if row["config"] is not None and reference is not None:
            record |= fidelity(images, reference)
        if row["table"] == "5":
            record["kv_cache_dtype"] = row["config"].kv_cache_dtype
            key = (row["steps"], row["config"].sample_ratio)
            if row["config"].kv_cache_dtype is None:
                model_dtype_images[key] = images
            elif key in model_dtype_images:  # the float8 row against the same setting with model-dtype caches
                versus = fidelity(images, model_dtype_images[key])
                record |= {"psnr_vs_model_dtype": versus["psnr"], "ssim_vs_model_dtype": versus["ssim"]}
        if row["table"] is not None:
            results.append(record)
    return {
        "samples": args.samples,
        "real_samples": args.real,
        "guidance_scale": args.guidance_scale,
        "machine": machine(),
        "real": {k: real_scores[k] for k in ("object_recall", "exact_objects")},
        "rows": results,
    }


def machine() -> str:
    info = machine_info()
    return f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} threads"


def computation(row: dict, step_counts: torch.Tensor | None, num_tokens: int, images: torch.Tensor) -> dict:
    """The share of token-steps computed; how sticky the selection was: the share of tokens that the RAS
    steps computed every time or never (1.0 means the same tokens on every RAS step); and how often the RAS
    steps computed the tokens of each image's objects and of its background."""
    if step_counts is None:
        return {"tokens_computed": 1.0}
    schedule = build_schedule(row["config"], row["steps"], num_tokens)
    ras_steps = sum(not plan.dense for plan in schedule)
    dense_steps = row["steps"] - ras_steps
    on_ras_steps = step_counts - dense_steps
    sticky = (on_ras_steps == 0) | (on_ras_steps == ras_steps)
    objects = object_tokens(images).flatten(1)
    return {
        "tokens_computed": step_counts.float().mean().item() / row["steps"],
        "always_or_never": sticky.float().mean().item(),
        **computation_by_region(step_counts, objects, dense_steps, ras_steps),
    }


def staleness(runs: torch.Tensor | None) -> dict:
    """Each token's longest run of RAS steps skipped in a row ([images, N]): the maximum and 99th percentile."""
    if runs is None:
        return {}
    runs = runs.float().flatten()
    return {"max_staleness": int(runs.max().item()), "p99_staleness": float(torch.quantile(runs, 0.99).item())}


def write_docs(out: Path, results: dict) -> list[str]:
    """Write each table's tableN.md and, where ``out`` holds a README.md, its generated text, from ``results``; for
    docs/quality itself, the generated text of docs/demo.md and docs/configuration.md too. Returns the names written."""
    written = []
    for table in TABLES:
        (out / f"table{table}.md").write_text(table_markdown(results, table))
        written.append(f"table{table}.md")
    readme = out / "README.md"
    if readme.exists():
        readme.write_text(render_readme(readme.read_text(), results))
        written.append("README.md")
    for name, render in PROJECT_PAGES.items():
        page = out.resolve().parent / name
        if out.resolve() == DOCS.resolve() and page.exists():
            page.write_text(render(page.read_text(), results))
            written.append(str(page))
    return written


def table_list(text: str) -> tuple[str, ...]:
    tables = tuple(t.strip() for t in text.split(",") if t.strip())
    unknown = [t for t in tables if t not in TABLES]
    if not tables or unknown:
        raise argparse.ArgumentTypeError(f"--tables {text!r}: each must be one of {', '.join(TABLES)}")
    return tables


def merged(path: Path, results: dict, tables: tuple[str, ...]) -> dict:
    """``results`` (a run of ``tables``) with the other tables' rows kept from the results.json at ``path``;
    ``runs`` records the command, seconds and tables of each run whose rows are still there."""
    if not path.exists():
        return results
    previous = json.loads(path.read_text())
    if (previous["samples"], previous["real_samples"], previous["guidance_scale"]) != (
        results["samples"],
        results["real_samples"],
        results["guidance_scale"],
    ):
        raise SystemExit(f"error: {path} was made with other --samples/--real/--guidance-scale; rerun every table")
    rows = {t: table_rows(results if t in tables else previous, t) for t in TABLES}
    runs = previous.get("runs", [{"command": previous["command"], "seconds": previous["seconds"], "tables": TABLES}])
    kept = [run | {"tables": [t for t in run.get("tables", TABLES) if t not in tables]} for run in runs]
    this = {"command": results["command"], "seconds": results["seconds"], "tables": list(tables)}
    return results | {"rows": [r for t in TABLES for r in rows[t]], "runs": [r for r in kept if r["tables"]] + [this]}


def regions_figure(path: Path, count: int = 8, steps: int = ABLATION_STEPS, ratio: float = ABLATION_RATIO) -> None:
    """``count`` held-out captions at ``ratio`` and ``steps``: each image, its object tokens, and how many steps
    computed each token with rascompile's default selection and with the reference's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generate = Generator(ShapesModel.load())
    captions = [ShapesDataset(count, seed=50_000).scene(i).caption for i in range(count)]
    config = demo_config(steps, ratio)
    ours = generate(captions, config=config, steps=steps)
    reference = generate(captions, config=config.replace(**REFERENCE_SELECTION), steps=steps)
    objects = object_tokens(ours.images)
    rows = [
        ("image (defaults)", None),
        ("object tokens", objects),
        (f"steps computed,\n{_short(config)}", ours.step_counts),
        ("steps computed,\nreference", reference.step_counts),
    ]
    runs = {id(ours.step_counts): ours.skip_runs, id(reference.step_counts): reference.skip_runs}
    fig, axes = plt.subplots(
        len(rows), count, figsize=(1.6 * count + 1.2, 1.7 * len(rows)), squeeze=False, layout="constrained"
    )
    for i, (label, grid) in enumerate(rows):
        for j in range(count):
            ax = axes[i, j]
            if grid is None:
                ax.imshow(((ours.images[j].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
            elif grid.dtype == torch.bool:
                ax.imshow(grid[j].float().numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                shown = ax.imshow(grid[j].numpy(), cmap="magma", vmin=0, vmax=steps)
                outline_objects(ax, objects[j])
                mark_stale(ax, runs[id(grid)][j])
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(label, fontsize=8)
    fig.colorbar(shown, ax=list(axes.flatten()), shrink=0.5, label="steps computed")
    fig.suptitle(
        f"Where RAS computes: ratio {ratio:g}, {steps} steps (cyan: object tokens; x: skipped on more than "
        f"{STALENESS_BOUND} RAS steps in a row)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(config: RASConfig) -> str:
    bound = f", max_skip_steps {config.max_skip_steps}" if config.max_skip_steps is not None else ""
    return f"high_ratio {config.high_ratio:g}{bound}"


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
    parser.add_argument(
        "--tables",
        type=table_list,
        default=",".join(TABLES),
        help="comma-separated tables to run (default 2,3,4); the others' rows are kept from --out's results.json",
    )
    parser.add_argument("--out", default="docs/quality", help="output directory (default docs/quality)")
    parser.add_argument(
        "--render-only", action="store_true", help="only rewrite the tables in --out from its results.json (no run)"
    )
    parser.add_argument("--regions-only", action="store_true", help="only draw --out/regions.png (a few seconds)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render_only:
        written = write_docs(out, json.loads((out / "results.json").read_text()))
        print(f"wrote {', '.join(written)} in {out} from results.json")
        return 0
    require_extra("demo", feature="benchmarks/quality.py")  # tqdm, torchmetrics, matplotlib, transformers
    quiet_third_party()
    if args.regions_only:
        out.mkdir(parents=True, exist_ok=True)
        regions_figure(out / "regions.png")
        print(f"wrote {out / 'regions.png'}")
        return 0
    start = time.perf_counter()
    results = run(args)
    seconds = results["seconds"] = round(time.perf_counter() - start)
    results["command"] = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out.mkdir(parents=True, exist_ok=True)
    if set(args.tables) != set(TABLES):
        results = merged(out / "results.json", results, args.tables)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    written = write_docs(out, results)
    pareto_plot(table_rows(results, "2"), out / "pareto.png")
    regions_figure(out / "regions.png", steps=ABLATION_STEPS if not args.quick else 8)
    print(markdown(results["rows"]))
    print(f"wrote results.json, {', '.join(written)}, pareto.png, regions.png in {out} in {seconds} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
