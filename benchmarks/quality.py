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
from rascompile.demo.shapes.regions import (
    STALENESS_BOUND,
    computation_by_region,
    mark_stale,
    object_tokens,
    outline_objects,
)
from rascompile.runtime.schedule import build_schedule

DOCS = Path(__file__).resolve().parents[1] / "docs" / "quality"
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
    "reference defaults (high_ratio 1)": {"high_ratio": 1.0},
    "random dropping": {"metric": "random"},
    "no error reset": {"error_reset_steps": ()},
    "no K/V cache": {"kv_cache": False},
    "starvation_scale -0.1": {"starvation_scale": -0.1},
    # The reference's example scripts pass --starvation_scale 1 --high_ratio 0.3, but its
    # ras_manager.set_parameters never reads starvation_scale: they run with the constructor's 0.1.
    "reference example scripts (as they run: starvation_scale 0.1, high_ratio 0.3)": {
        "starvation_scale": 0.1,
        "high_ratio": 0.3,
    },
}
# Table 4: how the selection's two knobs interact, at the static ratio 0.25 and 20 steps.
SWEEP_HIGH_RATIOS = (1.0, 0.5, 0.3, 0.1)
SWEEP_STARVATION_SCALES = (0.1, 0.0, -0.1)
# ... and what bounds staleness, at the static ratios 0.5 and 0.25 (starvation_scale 0.1): low high_ratios, which
# drop only (or mostly) the lowest-scoring tokens, and max_skip_steps
STALENESS_RATIOS = (0.5, 0.25)
STALENESS_SETTINGS = (
    {"high_ratio": 1.0, "max_skip_steps": None},
    {"high_ratio": 0.1, "max_skip_steps": None},
    {"high_ratio": 0.05, "max_skip_steps": None},
    {"high_ratio": 0.0, "max_skip_steps": None},
    {"high_ratio": 0.1, "max_skip_steps": 4},
    {"high_ratio": 0.1, "max_skip_steps": 3},
    {"high_ratio": 0.1, "max_skip_steps": 2},
    {"high_ratio": 0.0, "max_skip_steps": 4},
)
# Table 5: float8 K/V caches against caches in the model's dtype, at 20 steps and the static ratios 0.5 and 0.25
CACHE_DTYPE_RATIOS = (0.5, 0.25)
TABLES = ("2", "3", "4", "5")


def sweep_name(config: RASConfig, at_sweep_ratio: bool = False) -> str:
    """The name of the Table 4 row with ``config``'s selection fields (and its ratio, when not 0.25);
    ``at_sweep_ratio``: of the row at 0.25 whatever ``config``'s ratio (a default configuration's row)."""
    if at_sweep_ratio:
        config = config.replace(sample_ratio=ABLATION_RATIO)
    name = f"high_ratio {config.high_ratio:g}, starvation_scale {config.starvation_scale:g}"
    if config.max_skip_steps is not None:
        name += f", max_skip_steps {config.max_skip_steps}"
    return name if config.sample_ratio == ABLATION_RATIO else f"{name} @ ratio {config.sample_ratio:g}"


#: The Table 4 rows docs/configuration.md shows: the reference's argparse default, what
#: its example scripts run, rascompile's default before the staleness bound, and rascompile's default.
SELECTION_SETTINGS = (
    ("reference default", RASConfig.reference_defaults()),
    ("reference example scripts, as run", RASConfig.reference_defaults(high_ratio=0.3)),
    ("rascompile default before max_skip_steps", RASConfig(max_skip_steps=None)),
    ("rascompile default", RASConfig()),
)


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


def markdown(rows: list[dict]) -> str:
    stale = any("max_staleness" in r for r in rows)
    head = (
        "| setting | steps | tokens computed | always or never | objects / background computed "
        + ("| staleness max / p99 " if stale else "")
        + "| images/s | PSNR dB | SSIM | objects found | exact objects | Fréchet distance |"
    )
    lines = [head, "|---|---|---|---|---|" + ("---|" if stale else "") + "---|---|---|---|---|---|"]
    for r in rows:
        psnr = f"{r['psnr']:.1f}" if "psnr" in r else "-"
        ssim = f"{r['ssim']:.3f}" if "ssim" in r else "-"
        sticky = f"{r['always_or_never']:.2f}" if "always_or_never" in r else "-"
        regions = f"{r['objects_computed']:.2f} / {r['background_computed']:.2f}" if "objects_computed" in r else "-"
        runs = f"{r['max_staleness']} / {r['p99_staleness']:g} | " if "max_staleness" in r else "- | "
        lines.append(
            f"| {r['name']} | {r['steps']} | {r['tokens_computed']:.2f} | {sticky} | {regions} | "
            + (runs if stale else "")
            + f"{r['images_per_s']:.1f} | {psnr} | {ssim} | "
            f"{r['object_recall']:.3f} | {r['exact_objects']:.3f} | {r['frechet_distance']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def cache_dtype_markdown(rows: list[dict]) -> str:
    """Table 5: each float8 row beside the model-dtype row of its ratio, against dense and against each other."""
    head = (
        "| setting | PSNR dB | SSIM | PSNR dB / SSIM against model-dtype caches | objects found | exact objects "
        "| Fréchet distance | images/s |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        versus = (
            f"{r['psnr_vs_model_dtype']:.1f} / {r['ssim_vs_model_dtype']:.3f}" if "psnr_vs_model_dtype" in r else "-"
        )
        lines.append(
            f"| {r['name']} | {r['psnr']:.1f} | {r['ssim']:.3f} | {versus} | {r['object_recall']:.3f} | "
            f"{r['exact_objects']:.3f} | {r['frechet_distance']:.2f} | {r['images_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def table_markdown(results: dict, table: str) -> str:
    rows = table_rows(results, table)
    return cache_dtype_markdown(rows) if table == "5" else markdown(rows)


def table_rows(results: dict, table: str) -> list[dict]:
    return [r for r in results["rows"] if r["table"] == table]


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: written by benchmarks/quality.py from results.json -->", f"<!-- {name} end -->"


def _between(text: str, name: str, body: str, where: str) -> str:
    start, end = _markers(name)
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"{where} has no {name} between {start!r} and {end!r}")
    return text[: i + len(start)] + "\n" + body + text[j:]


def render_readme(text: str, results: dict) -> str:
    """``text`` (docs/quality/README.md) with its tables, how it was made and its findings rendered from
    ``results`` between their markers."""
    for table in TABLES:
        text = _between(text, f"table{table}", table_markdown(results, table), "the README")
    text = _between(text, "provenance", provenance(results), "the README")
    return _between(text, "findings", findings(results), "the README")


def render_demo_page(text: str, results: dict) -> str:
    """``text`` (docs/demo.md) with its summary of the harness rendered from ``results``."""
    return _between(text, "quality summary", project_summary(results), "docs/demo.md")


def render_configuration_page(text: str, results: dict) -> str:
    """``text`` (docs/configuration.md) with the rows behind the default selection rendered from ``results``."""
    return _between(text, "selection defaults", markdown(selection_rows(results)), "docs/configuration.md")


#: The project's pages that carry generated text of the harness, and their renderers.
PROJECT_PAGES = {"demo.md": render_demo_page, "configuration.md": render_configuration_page}


def selection_rows(results: dict) -> list[dict]:
    rows = ((label, sweep_name(config, at_sweep_ratio=True)) for label, config in SELECTION_SETTINGS)
    return [_row(results, name) | {"name": f"{label}: {name}"} for label, name in rows]


# ----------------------------------------------------------------------------------- text from the data


def _row(results: dict, name: str) -> dict:
    for r in results["rows"]:
        if r["name"] == name:
            return r
    raise KeyError(f"results.json has no row {name!r}")


def _speedups(results: dict, steps: int) -> list[float]:
    dense = _row(results, f"dense {steps}")["images_per_s"]
    return [_row(results, f"RAS {ratio:g} @ {steps}")["images_per_s"] / dense for ratio in RATIOS]


def _x(values) -> str:
    return ", ".join(f"{v:.2f}x" for v in values)


def _quality(r: dict) -> str:
    return (
        f"{r['psnr']:.1f} dB / SSIM {r['ssim']:.3f}, objects found {r['object_recall']:.3f}, "
        f"exact {r['exact_objects']:.3f}"
    )


def _regions(r: dict) -> str:
    objects, background = r["objects_computed"], r["background_computed"]
    return f"objects' tokens on {objects:.0%} of the RAS steps and the background's on {background:.0%}"


def _more_or_less(a: float, b: float, margin: float) -> str:
    return "about as often as" if abs(a - b) <= margin else ("more often than" if a > b else "less often than")


def equal_throughput_pairs(results: dict) -> list[tuple[dict, dict]]:
    """Each RAS row of Table 2 with the dense row of the most steps that is at least as fast (none: left out)."""
    dense = sorted((r for r in table_rows(results, "2") if r["sample_ratio"] is None), key=lambda r: -r["steps"])
    pairs = []
    for r in table_rows(results, "2"):
        if r["sample_ratio"] is not None:
            faster = [d for d in dense if d["images_per_s"] >= r["images_per_s"]]
            if faster:
                pairs.append((r, faster[0]))
    return pairs


def provenance(results: dict) -> str:
    runs = results.get("runs") or [{"command": results["command"], "seconds": results["seconds"]}]
    made = "; ".join(
        f"`{run['command']}` in {run['seconds']} s"
        + (f" (Table{'s' if len(run['tables']) > 1 else ''} {', '.join(run['tables'])})" if "tables" in run else "")
        for run in runs
    )
    lines = [f"Made by {made}."]
    if "machine" in results:
        lines.append(
            f"- Machine: {results['machine']}, eager inner backend, settings one after another in one process."
        )
    lines.append(
        f"- Samples: {results['samples']} captions of held-out procedural scenes per setting, the same captions and "
        f"seeds in every setting; guidance {results['guidance_scale']:g}; the Fréchet distance against "
        f"{results['real_samples']} real images."
    )
    if "real" in results:
        real = results["real"]
        lines.append(
            f"- Real images score {real['object_recall']:.3f} (objects found) and {real['exact_objects']:.3f} "
            "(exact objects)."
        )
    return "\n".join(lines) + "\n"


def findings(results: dict) -> str:
    """The README's "What the numbers say", its figures computed from ``results``."""
    out = []
    d20 = _row(results, "dense 20")
    real = results.get("real")
    real_text = f" (real images: {real['object_recall']:.3f} and {real['exact_objects']:.3f})" if real else ""
    out.append(
        f"- **The model.** Dense sampling at 20 steps finds {d20['object_recall']:.3f} of the captioned objects and "
        f"the exact set in {d20['exact_objects']:.3f} of the images{real_text}."
    )
    ratios = ", ".join(f"{r:g}" for r in RATIOS)
    speed = "; ".join(f"at {s} steps {_x(_speedups(results, s))}" for s in RAS_STEPS)
    out.append(f"- **Throughput against dense at the same steps,** at ratios {ratios}: {speed}.")
    same = [
        _row(results, "RAS 0.25 @ 20"),
        _row(results, "static sampling ratio"),
        _row(results, sweep_name(RASConfig(max_skip_steps=None), at_sweep_ratio=True)),
    ]
    rates = [r["images_per_s"] for r in same]
    out.append(
        "- **Throughput noise.** `RAS 0.25 @ 20` (Table 2), the static-ratio row of Table 3 and the unbounded "
        f"defaults' row of Table 4 are one setting; they measured {', '.join(f'{v:.1f}' for v in rates)} images/s "
        f"({(max(rates) - min(rates)) / min(rates):.0%} apart). Read single throughput figures with that in mind."
    )
    at20 = [_row(results, f"RAS {ratio:g} @ 20") for ratio in RATIOS]
    out.append(
        f"- **Fidelity to the dense image of the same seed** at 20 steps, from ratio {RATIOS[0]:g} to "
        f"{RATIOS[-1]:g}: PSNR {' / '.join(format(r['psnr'], '.1f') for r in at20)} dB, SSIM "
        f"{' / '.join(format(r['ssim'], '.3f') for r in at20)}."
    )
    pairs = equal_throughput_pairs(results)
    wins = [(r, d) for r, d in pairs if d["object_recall"] > r["object_recall"]]
    listed = "".join(
        f"\n  - {d['name']} ({d['images_per_s']:.1f} images/s, {d['object_recall']:.3f}) against {r['name']} "
        f"({r['images_per_s']:.1f} images/s, {r['object_recall']:.3f})"
        for r, d in pairs
    )
    out.append(
        f"- **Equal throughput.** For {len(pairs)} of the {len(table_rows(results, '2')) - len(DENSE_STEPS)} RAS "
        f"settings a dense setting with fewer steps is at least as fast; it finds more of the captioned objects in "
        f"{len(wins)} of them (objects found; sampling error about ±0.03):{listed}"
    )
    default, static = _row(results, "default (dynamic ratio)"), _row(results, "static sampling ratio")
    no_reset, no_cache = _row(results, "no error reset"), _row(results, "no K/V cache")
    random = _row(results, "random dropping")
    out.append(
        f"- **Ablations (Table 3).** The default with the dynamic ratio: {_quality(default)}. Without the error "
        f"reset: {_quality(no_reset)}. Without the K/V cache: {_quality(no_cache)}. Static ratio: "
        f"{_quality(static)}. Random dropping: {_quality(random)}."
    )
    chosen, reference_config = RASConfig(), RASConfig.reference_defaults()
    best = _row(results, sweep_name(chosen, at_sweep_ratio=True))
    reference = _row(results, sweep_name(reference_config, at_sweep_ratio=True))
    sweep = table_rows(results, "4")
    top_psnr = max(sweep, key=lambda r: r["psnr"])
    top_objects = max(sweep, key=lambda r: r["object_recall"])
    out.append(
        f"- **The selection (Table 4).** The reference's defaults ({sweep_name(reference_config, True)}) compute the "
        f"same tokens on every RAS step or on none for {reference['always_or_never']:.0%} of the tokens: "
        f"{_quality(reference)}. rascompile's defaults ({sweep_name(chosen, True)}): "
        f"{best['always_or_never']:.0%} always or never, {_quality(best)}. Highest PSNR "
        f"in the sweep: {top_psnr['name']} ({top_psnr['psnr']:.1f} dB); most objects found: {top_objects['name']} "
        f"({top_objects['object_recall']:.3f})."
    )
    out.append(f"- **Staleness (Table 4).** {_staleness_finding(results)}")
    if table_rows(results, "5"):
        out.append(f"- **Float8 caches (Table 5).** {_cache_dtype_finding(results)}")
    out.append(
        f"- **Where RAS computes.** With rascompile's defaults (ratio 0.25, 20 steps) the RAS steps computed the "
        f"{_regions(best)}: the objects {_more_or_less(best['objects_computed'], best['background_computed'], 0.02)} "
        f"the background ({best['objects_computed'] / best['background_computed']:.2f} times as often). With the "
        f"reference's defaults: {_regions(reference)}."
    )
    dense = [r for r in table_rows(results, "2") if r["sample_ratio"] is None]
    out.append(
        "- **Fréchet distance by dense steps:** "
        + ", ".join(f"{r['steps']}: {r['frechet_distance']:.0f}" for r in dense)
        + ". It is reported because the harness computes it; see below for why it is not used as evidence."
    )
    return "\n".join(out) + "\n"


def _cache_dtype_finding(results: dict) -> str:
    """What float8 K/V caches changed at each ratio, against the same setting with model-dtype caches."""
    parts = []
    for ratio in CACHE_DTYPE_RATIOS:
        plain, fp8 = (_row(results, f"{name} caches @ ratio {ratio:g}") for name in ("model-dtype", "float8"))
        parts.append(
            f"at ratio {ratio:g}, float8 against model-dtype caches: {fp8['psnr_vs_model_dtype']:.1f} dB / SSIM "
            f"{fp8['ssim_vs_model_dtype']:.3f}; against dense {plain['psnr']:.1f} -> {fp8['psnr']:.1f} dB, objects "
            f"found {plain['object_recall']:.3f} -> {fp8['object_recall']:.3f}, exact {plain['exact_objects']:.3f} "
            f"-> {fp8['exact_objects']:.3f}, images/s {plain['images_per_s']:.1f} -> {fp8['images_per_s']:.1f}"
        )
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + " (dequantizing each layer's cache costs throughput on this CPU)."


def _staleness_finding(results: dict) -> str:
    """How long tokens went uncomputed without a bound and with rascompile's, at both ratios, and what it cost."""
    parts = []
    for ratio in STALENESS_RATIOS:
        bounded = RASConfig(sample_ratio=ratio)
        free = _row(results, sweep_name(bounded.replace(max_skip_steps=None)))
        kept = _row(results, sweep_name(bounded))
        parts.append(
            f"at ratio {ratio:g}, unbounded: at most {free['max_staleness']} RAS steps in a row (99th percentile "
            f"{free['p99_staleness']:g}), {_quality(free)}; with `max_skip_steps={bounded.max_skip_steps}`: "
            f"{kept['max_staleness']} ({kept['p99_staleness']:g}), {_quality(kept)}"
        )
    return "Each token's longest run of skipped RAS steps, " + "; ".join(parts) + "."


def project_summary(results: dict) -> str:
    """docs/demo.md's bullets on the quality harness."""
    speedups = [v for s in RAS_STEPS for v in _speedups(results, s)]
    pairs = equal_throughput_pairs(results)
    wins = sum(d["object_recall"] > r["object_recall"] for r, d in pairs)
    dense = {r["steps"]: r["object_recall"] for r in table_rows(results, "2") if r["sample_ratio"] is None}
    chosen, reference_config = RASConfig(max_skip_steps=None), RASConfig.reference_defaults()
    best = _row(results, sweep_name(chosen, at_sweep_ratio=True))
    reference = _row(results, sweep_name(reference_config, at_sweep_ratio=True))
    default, no_reset, no_cache = (
        _row(results, n) for n in ("default (dynamic ratio)", "no error reset", "no K/V cache")
    )
    real = results.get("real")
    real_text = f" (real images: {real['object_recall']:.0%})" if real else ""
    return (
        f"- dense sampling at 20 steps draws {dense[20]:.0%} of the captioned objects that the shipped classifier "
        f"looks for{real_text};\n"
        f"- on this model RAS speeds sampling up {min(speedups):.2f}x to {max(speedups):.2f}x (sample ratios "
        f"{RATIOS[0]:g} to {RATIOS[-1]:g}, {RAS_STEPS[0]} to {RAS_STEPS[-1]} steps);\n"
        f"- at equal throughput, fewer dense steps find more of the captioned objects than RAS in {wins} of "
        f"{len(pairs)} comparisons (dense sampling finds {dense[8]:.3f} of the objects at 8 steps and "
        f"{dense[max(dense)]:.3f} at {max(dense)}: this model saturates early);\n"
        f"- error reset and the K/V cache matter: without them SSIM falls from {default['ssim']:.2f} to "
        f"{no_reset['ssim']:.2f} and {no_cache['ssim']:.2f};\n"
        f"- `high_ratio={chosen.high_ratio:g}` (rascompile's default; both without a staleness bound) against the "
        "reference's "
        f"`{reference_config.high_ratio:.1f}`, at ratio 0.25: "
        f"{best['psnr']:.1f} against {reference['psnr']:.1f} dB PSNR, objects found {best['object_recall']:.3f} "
        f"against {reference['object_recall']:.3f}, and {best['always_or_never']:.0%} against "
        f"{reference['always_or_never']:.0%} of the tokens computed on every RAS step or on none;\n"
        f"- {_staleness_finding(results)}\n"
    )


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
