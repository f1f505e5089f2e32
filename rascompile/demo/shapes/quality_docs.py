"""The quality harness's settings and its documents (``benchmarks/quality.py`` runs the rows): which rows each
table holds, their markdown, and the text generated from them (docs/quality/README.md, the summary in docs/demo.md,
the default selection's rows in docs/configuration.md)."""

from __future__ import annotations

from rascompile.config import RASConfig

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
