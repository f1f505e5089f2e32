"""docs/quality's tables and figures, and the README's summary of them, are rendered from docs/quality/results.json
by benchmarks/quality.py, never pasted."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "quality"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_harness", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results():
    return json.loads((DOCS / "results.json").read_text())


def test_committed_tables_equal_what_the_harness_renders_from_results_json(quality, results):
    for table in quality.TABLES:
        assert (DOCS / f"table{table}.md").read_text() == quality.table_markdown(results, table)
    readme = (DOCS / "README.md").read_text()
    assert quality.render_readme(readme, results) == readme, (
        "docs/quality/README.md differs from results.json: python benchmarks/quality.py --render-only"
    )


@pytest.mark.parametrize("page", ["demo.md", "configuration.md"])
def test_project_pages_equal_what_the_harness_renders(quality, results, page):
    text = (ROOT / "docs" / page).read_text()
    assert quality.PROJECT_PAGES[page](text, results) == text, (
        f"docs/{page} differs from docs/quality/results.json: python benchmarks/quality.py --render-only"
    )


def test_rendered_text_carries_the_numbers_of_results_json(quality, results):
    """The generated prose is computed from the rows: change a row and the text changes with it."""
    changed = json.loads(json.dumps(results))
    dense20 = next(r for r in changed["rows"] if r["name"] == "dense 20")
    dense20["object_recall"] = 0.123456
    assert "finds 0.123 of the captioned objects" in quality.findings(changed)
    assert "0.123" not in quality.findings(results)
    default = next(r for r in changed["rows"] if r["name"] == "high_ratio 0.1, starvation_scale 0.1")
    default["psnr"] = 99.0
    assert "99.0" in quality.project_summary(changed) and "99.0" in quality.markdown(quality.selection_rows(changed))


def test_render_only_rewrites_stale_text(quality, results, tmp_path):
    readme = (DOCS / "README.md").read_text()
    dense20 = next(r for r in results["rows"] if r["name"] == "dense 20")
    stale = readme.replace(f"{dense20['object_recall']:.3f}", "0.001")
    assert stale != readme
    (tmp_path / "README.md").write_text(stale)
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert quality.main(["--render-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == readme
    assert (tmp_path / "table2.md").read_text() == (DOCS / "table2.md").read_text()
    with pytest.raises(ValueError, match="no table3"):
        quality.render_readme(readme.replace("<!-- table3 end -->", ""), results)


def test_partial_runs_keep_the_other_tables_rows(quality, results, tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    rerun = {k: results[k] for k in ("samples", "real_samples", "guidance_scale")}
    rerun |= {"command": "python benchmarks/quality.py --tables 4", "seconds": 5, "machine": "m"}
    rerun["rows"] = [r | {"images_per_s": 1.0} for r in quality.table_rows(results, "4")]
    merged = quality.merged(path, rerun, ("4",))
    assert quality.table_rows(merged, "2") == quality.table_rows(results, "2")
    assert all(r["images_per_s"] == 1.0 for r in quality.table_rows(merged, "4"))
    assert merged["runs"][-1] == {"command": rerun["command"], "seconds": 5, "tables": ["4"]}
    assert all("4" not in run["tables"] for run in merged["runs"][:-1])
    with pytest.raises(SystemExit, match="other --samples"):
        quality.merged(path, rerun | {"samples": 1}, ("4",))
