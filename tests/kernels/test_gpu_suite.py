"""``benchmarks/gpu_suite.py``: its dry run on the CPU, its budget and failure handling, and its README renderer.

The dry run runs every stage's code at tiny sizes (kernel tests through Triton's interpreter, the SD3 and Flux
step variants with aot_eager, the ONNX export and an OnnxRunner generation) and skips what needs CUDA or
TensorRT, saying so. What it measures on a GPU is not checked here: no GPU was available.
"""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
DOCS = ROOT / "docs" / "gpu"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run into a temporary directory: (exit status, results, README text, output, seconds)."""
    out = tmp_path_factory.mktemp("gpu_dry")
    docs_before = {p.name: p.read_bytes() for p in DOCS.iterdir()} if DOCS.is_dir() else {}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=480,  # the dry run takes about 2 minutes on 2 idle cores; CI runs other tests beside it
        cwd=ROOT,
    )
    seconds = time.perf_counter() - start
    docs_after = {p.name: p.read_bytes() for p in DOCS.iterdir()} if DOCS.is_dir() else {}
    assert docs_after == docs_before, "the dry run wrote into docs/gpu"
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else None
    readme = (out / "README.md").read_text() if (out / "README.md").is_file() else None
    return proc.returncode, results, readme, proc.stdout + proc.stderr, seconds


def test_dry_run_exits_0_and_every_stage_is_ok_or_skipped_for_cuda(dry_run, suite):
    code, results, _, output, seconds = dry_run
    assert code == 0, output[-4000:]
    assert results is not None and results["dry_run"] is True
    assert list(results["stages"]) == list(suite.STAGES)
    for name, stage in results["stages"].items():
        assert stage["status"] in ("ok", "skipped"), (name, stage["status"], stage["reason"], stage.get("error"))
        if stage["status"] == "skipped":
            assert any(w in stage["reason"].lower() for w in ("cuda", "tensorrt")), (name, stage["reason"])
        for part in stage["skipped"]:
            assert any(w in part["reason"].lower() for w in ("cuda", "tensorrt")), (name, part)
        assert stage["steps"], f"{name} recorded no sub-steps"
    print(f"dry run: {seconds:.1f} s")


def test_dry_run_checks_pass(dry_run):
    _, results, _, output, _ = dry_run
    checks = {c["name"]: c for s in results["stages"].values() for c in s["checks"]}
    for name in (
        "kernel tests pass",
        "the kernel ran where intended",
        "fused cache equals the unfused ops' cache",
        "RAS step at k=N equals dense (fused)",
        "fused RAS step equals unfused (ratio 0.25)",
        "the loop ran the planned RAS steps",
        "onnxruntime: decisions identical to PyTorch",
        "onnxruntime: image within tolerance of PyTorch",
        "enable_model_cpu_offload: RAS kept",
        "enable_sequential_cpu_offload: dense, said",
        "enable_group_offload (block level): dense, said",
        "peft LoRA, set_adapters after compiling: RAS kept",
    ):
        assert name in checks, f"check {name!r} did not run: {sorted(checks)}"
    failed = {name: c["detail"] for name, c in checks.items() if not c["passed"]}
    assert not failed, failed


def test_dry_run_stage_data(dry_run):
    _, results, _, _, _ = dry_run
    stages = results["stages"]
    tests = stages["kernel_tests"]["data"]
    assert tests["passed"] > 0 and tests["failed"] == tests["errors"] == 0
    assert tests["interpreted"] is True and tests["kernel_calls_on_device"] > 0
    rows = stages["kernel_speed"]["data"]["rows"]
    models, dtypes = ("sd3-medium", "sd3.5-medium", "flux-dev"), ("bfloat16", "float16")
    expected = {(m, r, d) for m in models for r in (0.5, 0.25) for d in dtypes}
    assert {(r["model"], r["ratio"], r["dtype"]) for r in rows} == expected
    sd3 = stages["sd3"]["data"]
    variants = {r["variant"] for r in sd3["per_step"]}
    assert {"dense", "RAS ratio 0.25, fused", "RAS ratio 0.5, fused", "RAS ratio 0.5, unfused"} <= variants
    assert sd3["loop"]["steps"] == 28 and sd3["loop"]["run_ras_steps"] == sd3["loop"]["planned_ras_steps"] == 22
    assert sd3["fused_on"]["fused_kv_writes"] == sd3["fused_on"]["kv_writes"] > 0
    assert sd3["fused_off"]["fused_kv_writes"] == 0
    flux = stages["flux"]["data"]
    assert flux["ras_applies"] or flux["fallback_reason"], "Flux: neither RAS nor a reason for dense"
    assert any(r["variant"] == "dense" for r in flux["per_step"])
    gens = stages["tensorrt"]["data"]["generations"]
    assert gens["onnxruntime"]["kinds_equal"] and gens["onnxruntime"]["within_tolerance"]


def test_readme_is_rendered_from_results(dry_run, suite):
    _, results, readme, _, _ = dry_run
    assert readme == suite.render_readme(results)
    assert "DRY RUN" in readme
    for heading in ("## Stages", "## Checks", "## 1. Kernel correctness", "## 2. Kernel speed", "## 3. Full-size",
                    "### 28-step loop", "## 3b. Flux", "## 4. TensorRT", "## Skipped parts"):  # fmt: skip
        assert heading in readme, heading
    assert "| stage | status | run | seconds / budget | reason |" in readme
    assert "| sd3 | ok |" in readme
    assert "| onnxruntime | fp32 | yes | 5 of 5 |" in readme


def test_docs_gpu_is_the_renderer_output(suite):
    """docs/gpu/README.md is what render_readme makes of docs/gpu/results.json (the stub while there is none)."""
    results_path = DOCS / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    assert (DOCS / "README.md").read_text() == suite.render_readme(results)
    if results is None:
        assert "No run has happened yet" in (DOCS / "README.md").read_text()


def _args(suite, tmp_path, *extra):
    return suite.parse_args(["--dry-run", "--out", str(tmp_path), *extra])


def test_a_raising_stage_is_recorded_as_failed_and_fails_the_run(suite, tmp_path, monkeypatch):
    def broken(_suite, st):
        with st.step("a step that works"):
            st.data["kept"] = True
        raise ValueError("boom")

    for name in suite.STAGES:
        monkeypatch.setitem(suite.BODIES, name, lambda _suite, st: None)
    monkeypatch.setitem(suite.BODIES, "sd3", broken)
    assert suite.main(["--dry-run", "--out", str(tmp_path)]) == 1
    results = json.loads((tmp_path / "results.json").read_text())
    sd3 = results["stages"]["sd3"]
    assert sd3["status"] == "failed" and sd3["reason"] == "ValueError: boom"
    assert sd3["data"]["kept"] is True and "Traceback" in sd3["error"]
    assert results["stages"]["tensorrt"]["status"] == "ok", "a failed stage must not stop the next ones"
    assert "| sd3 | failed |" in (tmp_path / "README.md").read_text()


def test_a_failed_check_fails_the_stage(suite, tmp_path):
    s = suite.Suite(_args(suite, tmp_path), tmp_path)
    s.run_stage("flux", lambda _suite, st: st.check("something", False, "it differs"))
    assert s.results["stages"]["flux"]["status"] == "failed"
    assert "something" in s.results["stages"]["flux"]["reason"]


def test_a_stage_past_its_budget_is_cut_short_and_keeps_what_finished(suite, tmp_path):
    s = suite.Suite(_args(suite, tmp_path, "--stage-budget", "sd3=0.05"), tmp_path)

    def slow(_suite, st):
        with st.step("first"):
            time.sleep(0.1)
            st.data["first"] = 1
        with st.step("second"):
            st.data["second"] = 2

    s.run_stage("sd3", slow)
    record = s.results["stages"]["sd3"]
    assert record["status"] == "cut short" and "before 'second'" in record["reason"]
    assert record["data"] == {"first": 1}
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["stages"]["sd3"]["status"] == "cut short"


def test_budgets(suite):
    assert sum(suite.BUDGETS.values()) <= 480
    assert suite.stage_budgets(240, None)["sd3"] == suite.BUDGETS["sd3"] / 2
    assert suite.stage_budgets(480, ["sd3=300"])["sd3"] == 300
    with pytest.raises(ValueError, match="NAME=SECONDS"):
        suite.stage_budgets(480, ["nope=3"])


def test_refusals(suite, tmp_path, capsys):
    assert suite.main(["--dry-run", "--out", str(DOCS)]) == 2
    assert "never writes docs/gpu" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert suite.main(["--out", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "results.json").exists()


def test_device_peaks(suite):
    assert suite.device_peaks("NVIDIA H200")["tflops_bf16_fp16"] == 989.0
    assert suite.device_peaks("NVIDIA H100 80GB HBM3")["gbps"] == 3350.0
    assert suite.device_peaks("NVIDIA L40S")["device"] == "L40S"
    assert suite.device_peaks("NVIDIA L4")["device"] == "L4"
    assert suite.device_peaks("NVIDIA A100-SXM4-40GB")["gbps"] == 1555.0
    assert suite.device_peaks("NVIDIA GeForce RTX 4090")["device"] == "unknown"
    assert suite.device_peaks(None)["tflops_bf16_fp16"] is None


def test_a_rerun_of_some_stages_keeps_the_others(suite, tmp_path):
    """``--stage`` into a directory holding a GPU run's results replaces only the stages it runs."""
    earlier = {
        "suite": "benchmarks/gpu_suite.py",
        "dry_run": False,
        "runs": [{"started": "earlier", "argv": [], "stages": list(suite.STAGES)}],
        "stages": {name: {**suite._stage_record("ok", None, 1.0), "run": 0} for name in suite.STAGES},
    }
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    s = suite.Suite(suite.parse_args(["--out", str(tmp_path), "--stage", "sd3"]), tmp_path)
    assert len(s.results["runs"]) == 2 and s.results["stages"]["flux"]["run"] == 0
    s.run_stage("sd3", lambda _suite, st: st.data.update(new=True))
    assert s.results["stages"]["sd3"]["run"] == 1 and s.results["stages"]["sd3"]["data"] == {"new": True}
    assert s.results["stages"]["tensorrt"]["run"] == 0
    dry = suite.Suite(_args(suite, tmp_path, "--stage", "sd3"), tmp_path)  # a dry run never merges into it
    assert len(dry.results["runs"]) == 1 and dry.results["stages"]["flux"]["status"] == "skipped"
