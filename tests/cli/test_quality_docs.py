"""docs/quality's tables are rendered from its results.json by benchmarks/quality.py, never pasted."""

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


def test_committed_tables_equal_what_the_harness_renders_from_results_json(quality):
    results = json.loads((DOCS / "results.json").read_text())
    for table in ("2", "3"):
        assert (DOCS / f"table{table}.md").read_text() == quality.markdown(quality.table_rows(results, table))
    readme = (DOCS / "README.md").read_text()
    assert quality.render_readme(readme, results) == readme, (
        "docs/quality/README.md's tables differ from results.json: python benchmarks/quality.py --render-only"
    )


def test_render_only_rewrites_stale_tables(quality, tmp_path):
    results = json.loads((DOCS / "results.json").read_text())
    readme = (DOCS / "README.md").read_text()
    dense20 = next(r for r in results["rows"] if r["name"] == "dense 20")
    stale = readme.replace(f"{dense20['object_recall']:.3f}", "0.001", 1)
    assert stale != readme
    (tmp_path / "README.md").write_text(stale)
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert quality.main(["--render-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "README.md").read_text() == readme
    assert (tmp_path / "table2.md").read_text() == (DOCS / "table2.md").read_text()
    with pytest.raises(ValueError, match="no table 3"):
        quality.render_readme(readme.replace("<!-- table3 end -->", ""), results)
