"""``rascompile bench --context-parallel 2``: two CPU processes under torchrun (gloo), each timing dense and RAS steps
of its rank; rank 0 reports both ranks, whose K/V caches are half a single process's (each rank holds half the
heads) and whose output cache is whole. And the option's checks, which run before any process group exists."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import rascompile.bench.runner as bench
from rascompile.bench.parallel import cache_split
from rascompile.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]

#: The smallest bench: --smoke (1 + 1 Flux blocks, 64 image and 8 text tokens, the eager inner backend, 1 repeat),
#: one RAS ratio, no eager loop. About 20 s for both ranks on 2 cores; the bound leaves room for a loaded machine.
ARGV = ["bench", "--model", "flux", "--smoke", "--ratios", "0.25", "--no-eager-loop", "--no-progress"]
TIMEOUT_S = 150

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _end_session(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the session the launcher leads (``start_new_session``): torchrun and the ranks it
    started, nothing else."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


def _torchrun(argv: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m rascompile ARGV`` (a free port, one
    thread per rank), ended with every process it started if it runs past ``timeout``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "rascompile", *argv]
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV} | {"OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end_session(proc)
        out, err = proc.communicate()
        pytest.fail(f"torchrun ran past {timeout:.0f} s; its ranks were ended. stderr:\n{err[-4000:]}")
    finally:
        if proc.poll() is None:  # an exception while waiting: leave no rank behind
            _end_session(proc)
    return subprocess.CompletedProcess(command, proc.returncode, out, err), time.perf_counter() - start


def _single_process_caches() -> dict:
    """The same bench in this process, without parallelism: its cache bytes and its RAS graph's one cache set."""
    settings = replace(bench.settings_from_args(build_parser().parse_args(ARGV)), progress=False)
    split: dict = {}
    results = bench.run_bench(
        settings, log=lambda _: None, inspect_graph=lambda graph: split.update(cache_split(graph))
    )
    assert results["ras"]["applies"], results["ras"]["reason"]
    return {"held": results["memory"]["ras_caches_bytes"], **split}


def test_two_ranks_report_step_times_and_half_the_kv_caches(tmp_path):
    path = tmp_path / "cp.json"
    result, elapsed = _torchrun([*ARGV, "--context-parallel", "2", "--json", str(path)], TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert out.count("rascompile bench: Region-Adaptive Sampling vs dense --model flux --context-parallel 2") == 1
    assert "Context parallelism: diffusers Ulysses, degree 2" in out
    assert elapsed < TIMEOUT_S

    results = json.loads(path.read_text())
    cp = results["context_parallel"]
    assert (cp["degree"], cp["process_group_backend"], cp["attention_backend"]) == (2, "gloo", "native")
    ranks = cp["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["ras_applies"], r["ras_reason"]
        assert r["ras_step_k"] == 16 and r["ras_step_ratio"] == 0.25  # 64 tokens at ratio 0.25
        for key in ("dense_step_s", "ras_step_s", "capture_step_s", "loop_dense_s_per_step", "loop_ras_s_per_step"):
            assert r[key] > 0, key
        assert r["step_speedup"] == pytest.approx(r["dense_step_s"] / r["ras_step_s"])
        assert r["cache_bytes"] > 0 and r["cache_bytes"] == r["kv_cache_bytes"] + r["output_cache_bytes"]
    # rank 0's table lists both ranks
    table = out[out.index("Context parallelism") : out.index("Per-step time")]
    assert any(line.split()[:1] == ["0"] for line in table.splitlines())
    assert any(line.split()[:1] == ["1"] for line in table.splitlines())

    single = _single_process_caches()
    assert single["held"] == single["kv_cache_bytes_per_set"] + single["output_cache_bytes_per_set"]
    for r in ranks:
        # K/V caches: this rank's half of the heads; the output cache: replicated, as big as one process's
        assert r["kv_cache_bytes"] == pytest.approx(single["kv_cache_bytes_per_set"] / 2)
        assert r["output_cache_bytes"] == single["output_cache_bytes_per_set"]
        assert r["kv_cache_shape"][1] * 2 == results["model"]["heads"]


# ============================================================================================ the option's checks


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_without_torchrun_says_how_to_launch(no_torchrun, capsys):
    err = _fails([*ARGV, "--context-parallel", "2"], capsys)
    assert "--context-parallel 2: the process group is not initialised" in err
    assert "torchrun --nproc-per-node 2" in err


def test_world_size_must_be_the_degree(no_torchrun, monkeypatch, capsys):
    env = {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    err = _fails([*ARGV, "--context-parallel", "2"], capsys)
    assert "--context-parallel 2: torchrun started 3 processes (WORLD_SIZE=3)" in err
    assert "torchrun --nproc-per-node 2" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "sd3", "--context-parallel", "2"], "--model sd3 (SD3Transformer2DModel) has no diffusers"),
        (["--model", "flux", "--heads", "3", "--context-parallel", "2"], "--heads 3 must be a multiple of 2"),
        (["--model", "flux", "--text-tokens", "7", "--context-parallel", "2"], "--text-tokens 7 must be a multiple"),
        (["--model", "wan", "--latent-size", "6", "--frames", "1", "--context-parallel", "2"], "the 9 image tokens"),
    ],
)
def test_settings_the_ranks_cannot_split_are_refused(argv, message, no_torchrun, capsys):
    err = _fails(["bench", "--smoke", "--no-progress", *argv], capsys)
    assert "--context-parallel 2: " in err and message in err


def test_degree_below_two_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main([*ARGV, "--context-parallel", "1"])
    assert exc.value.code == 2
    assert "argument --context-parallel: must be >= 2" in capsys.readouterr().err
