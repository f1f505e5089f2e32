"""The ``rascompile`` command line and a smoke run of ``rascompile bench``."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rascompile.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--smoke", "--repeats", "--json", "--inner-backend", "--ratios", "--model", "--frames"):
        assert option in out


def test_no_subcommand_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code != 0


def test_installed_script_help():
    script = Path(sys.executable).with_name("rascompile")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rascompile.cli.main"]
    result = subprocess.run([*command, "bench", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--smoke" in result.stdout


def test_invalid_schedule_is_reported(capsys):
    assert main(["bench", "--smoke", "--steps", "3", "--no-progress"]) == 2  # reset step 4 >= 3 steps
    assert "error_reset_steps" in capsys.readouterr().err


@pytest.mark.parametrize(("inner", "fused"), [("eager", "auto"), ("aot_eager", "on")])
def test_bench_smoke(inner, fused, tmp_path, capsys):
    path = tmp_path / "bench.json"
    start = time.perf_counter()
    argv = ["bench", "--smoke", "--inner-backend", inner, "--fused-kv-projection", fused, "--no-progress"]
    # The installed command, in a process of its own, as users run it.
    script = Path(sys.executable).with_name("rascompile")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rascompile.cli.main"]
    result = subprocess.run([*command, *argv, "--json", str(path)], capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert elapsed < 90
    # quiet: no profiler start/stop lines from kineto, no transformers warnings about torchvision
    assert "USDT" not in result.stderr and "[transformers]" not in result.stderr, result.stderr[-3000:]
    out = result.stdout
    for row in (
        "--model sd3",
        "model: SD3Transformer2DModel",
        "transformer inputs (one call per step): hidden_states [2, 16, 16, 16], timestep [2]",
        "FLOPs from the analytic SD3 model; measured with FlopCounterMode",
        "machine:",
        "torch 2.",
        "dense compiled",
        "RAS capture step (k=N)",
        "RAS ratio 0.75",
        "RAS ratio 0.5",
        "RAS ratio 0.25",
        "RAS ratio 0.125",
        "dense eager",
        "RAS compiled",
        "decide() per RAS step",
        "RAS caches held by the controller",
        "peak of step allocations",
    ):
        assert row in out, row
    results = json.loads(path.read_text())
    assert results["settings"]["inner_backend"] == inner
    # on the CPU "auto" does not fuse; "on" fuses the K and V writes of both layers
    assert (results["fused_kv_writes"], results["kv_writes"]) == ((4, 4) if fused == "on" else (0, 4)), out
    assert f"{results['fused_kv_writes']} of 4 cache writes" in out
    assert [r["k"] for r in results["per_step"]] == [64, 64, 48, 32, 16, 8]
    assert results["per_step"][0]["ideal_speedup"] == 1.0
    assert results["model"]["name"] == "sd3" and results["ras"] == {"applies": True, "reason": None}
    # the ideal comes from the analytic model; the FlopCounterMode measurement agrees with it
    assert results["flops"]["source"] == "analytic"
    assert results["flops"]["measured_vs_analytic_max_relative_difference"] < 0.01
    loop = results["loop"]
    # 6 steps, start 2, reset step 4: steps 2, 3 and 5 are RAS steps, 0, 1 and 4 fill the caches
    assert (loop["planned_ras_steps"], loop["run_ras_steps"], loop["run_capture_steps"]) == (3, 3, 3)
    assert set(loop["median_s"]) == {"dense eager", "dense compiled", "RAS compiled"}
    assert results["memory"]["ras_caches_bytes"] == results["memory"]["ras_caches_planned_bytes"] > 0


def test_speed_script_runs_bench():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: rascompile bench" in result.stdout


QUIET_PROBE = """
import sys
if sys.argv[1] == "quiet":
    from rascompile.cli.main import quiet_third_party
    quiet_third_party()
from diffusers import StableDiffusion3Pipeline  # imports transformers' image processors
import transformers
transformers.logging.get_logger("transformers.models.clip").warning("about the user's text encoder")
"""


def test_commands_drop_the_torchvision_notices_and_keep_other_transformers_warnings():
    """Every command calls quiet_third_party before importing diffusers' pipelines."""
    pytest.importorskip("transformers")
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("with torchvision installed transformers has no fallback to announce")

    def stderr(mode: str) -> str:
        result = subprocess.run([sys.executable, "-c", QUIET_PROBE, mode], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stderr

    assert "requires torchvision (not installed)" in stderr("plain")  # the notice the filter is for exists
    quiet = stderr("quiet")
    assert "requires torchvision" not in quiet and "about the user's text encoder" in quiet, quiet
