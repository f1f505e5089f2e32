"""The README's memory table: ``rascompile.plan`` of published models at the sizes people generate.

    python benchmarks/memory_table.py            # plan every row (a few minutes), write docs/memory/plans.json
    python benchmarks/memory_table.py --render   # re-render the README's table from plans.json

Each model is built on the meta device from its published config (``rascompile.published_configs``): nothing is
downloaded or allocated. A row fits one 80 GB GPU when weights, caches and the estimated activation peak stay
under ``BUDGET_GIB`` (what is left of 80 GB for PyTorch after the CUDA context).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "docs" / "memory" / "plans.json"
README = ROOT / "docs" / "memory.md"
START, END = "<!-- memory-table:start -->", "<!-- memory-table:end -->"
BUDGET_GIB = 78.0

#: (published model, label, height, width, frames, batch, branches)
ROWS = (
    ("sd3-medium", "SD3-medium, CFG batch 2", 1024, 1024, None, 2, 1),
    ("flux-dev", "FLUX.1-dev", 2048, 2048, None, 1, 1),
    ("qwen-image", "Qwen-Image, true CFG", 1328, 1328, None, 1, 2),
    ("wan2.1-t2v-14b", "Wan2.1-T2V-14B, 2 branches", 480, 832, 81, 1, 2),
    ("wan2.1-t2v-14b", "Wan2.1-T2V-14B, 2 branches", 720, 1280, 81, 1, 2),
    ("hunyuan-video", "HunyuanVideo", 720, 1280, 129, 1, 1),
)


def plan_rows() -> list[dict]:
    import rascompile
    from rascompile.published_configs import build_on_meta

    rows = []
    for name, label, height, width, frames, batch, branches in ROWS:
        print(f"planning {label} at {width}x{height}{f'x{frames}' if frames else ''} ...", file=sys.stderr)
        plan = rascompile.plan(
            build_on_meta(name), height=height, width=width, frames=frames, batch=batch, branches=branches
        )
        fp8 = plan.with_kv_cache_dtype("fp8_e4m3")
        rows.append(
            {
                "model": name,
                "label": label,
                "size": f"{width}x{height}" + (f", {frames} frames" if frames else ""),
                "num_tokens": plan.num_tokens,
                "weights_bytes": plan.weights_bytes,
                "cache_bytes": plan.cache_bytes,
                "fp8_cache_bytes": fp8.cache_bytes,
                "activation_peak_bytes": plan.activation_peak_bytes,
            }
        )
    return rows


def _gib(num_bytes: int) -> float:
    return num_bytes / (1 << 30)


def fits(row: dict, caches: str) -> bool:
    return _gib(row["weights_bytes"] + row[caches] + row["activation_peak_bytes"]) <= BUDGET_GIB


def verdict(row: dict) -> str:
    if fits(row, "cache_bytes"):
        return "yes"
    if fits(row, "fp8_cache_bytes"):
        return 'with `kv_cache_dtype="fp8_e4m3"`'
    return "no: fewer frames or a lower resolution"


def render(rows: list[dict]) -> str:
    lines = [
        "| model | size | N | caches GiB | fp8 caches GiB | weights GiB | activations GiB (est.) "
        "| fits one 80 GB GPU? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['size']} | {r['num_tokens']:,} | {_gib(r['cache_bytes']):.1f} | "
            f"{_gib(r['fp8_cache_bytes']):.1f} | {_gib(r['weights_bytes']):.1f} | "
            f"{_gib(r['activation_peak_bytes']):.1f} | {verdict(r)} |"
        )
    return "\n".join(lines) + "\n"


def render_readme(text: str, rows: list[dict]) -> str:
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise ValueError(f"README.md has no memory table between {START!r} and {END!r}")
    return text[: i + len(START)] + "\n" + render(rows) + text[j:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only re-render the README from plans.json")
    args = parser.parse_args(argv)
    if not args.render:
        PLANS.parent.mkdir(parents=True, exist_ok=True)
        PLANS.write_text(json.dumps({"budget_gib": BUDGET_GIB, "rows": plan_rows()}, indent=2) + "\n")
    rows = json.loads(PLANS.read_text())["rows"]
    README.write_text(render_readme(README.read_text(), rows))
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
