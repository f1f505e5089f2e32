"""The ``kernel_tests`` stage: ``tests/kernels``' kernel tests (``KERNEL_TEST_FILES``) run by pytest in a
subprocess (``gpu_suite.py --kernel-tests-child``, :func:`kernel_tests_child`) with every kernel call moved to the
device and real Triton there, or Triton's interpreter on the CPU in the dry run; see ``gpu_suite.py``'s docstring."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .config import KERNEL_TEST_FILES, ROOT, SCRIPT, TESTS
from .suite import CutShort, SkipStage, Stage, Suite


def _to_device(value, device: str):
    """``value`` on ``device`` with the same sizes, strides and storage offset (non-contiguous views stay so)."""
    if not isinstance(value, torch.Tensor) or value.device.type == device:
        return value
    base = value if value._base is None else value._base
    moved = base.to(device).as_strided(value.size(), value.stride(), value.storage_offset())
    if moved.stride() != value.stride() or not torch.equal(moved.cpu(), value):
        raise RuntimeError("could not move a strided test input to the device unchanged")
    return moved


class _PytestReport:
    """A pytest plugin that writes the outcome counts to a JSON file after every test (a killed run keeps them)."""

    def __init__(self, path: str, info: dict):
        self.path, self.info = path, info
        self.counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
        self.failures: list[dict] = []
        self.collected = None

    def pytest_collection_finish(self, session) -> None:
        self.collected = len(session.items)
        self._write()

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "setup" and report.skipped:
            key = "skipped"
        elif report.failed:
            key = "failed" if report.when == "call" else "errors"
            self.failures.append({"test": report.nodeid, "when": report.when, "message": str(report.longrepr)[-800:]})
        elif report.when == "call" and report.passed:
            key = "passed"
        else:
            return
        self.counts[key] += 1
        self._write()

    def _write(self) -> None:
        data = {"collected": self.collected, **self.counts, "failures": self.failures[:20], **self.info}
        Path(self.path).write_text(json.dumps(data, indent=2))


def _to_cpu(result):
    return tuple(t.cpu() for t in result) if isinstance(result, tuple) else result.cpu()


def kernel_tests_child(device: str, report_path: str, autotune: bool) -> int:
    """Run the kernel test files (``KERNEL_TEST_FILES``: the float8 epilogue's too) with their kernel calls on
    ``device`` (the subprocess of ``kernel_tests``).

    By default each kernel call runs one of the autotuner's configs, rotating through them, so that every
    config is run against the references and each call compiles once instead of once per config (cold Triton
    compiles would not fit the stage's budget otherwise). ``autotune``: the autotuner's own choice per call
    (then only the configs it picks are compared with the references)."""
    if device == "cuda":
        os.environ.pop("TRITON_INTERPRET", None)  # real Triton: the kernel module reads it when imported
    else:
        os.environ["TRITON_INTERPRET"] = "1"  # the dry run: Triton's interpreter on CPU tensors
    import pytest

    import rascompile.kernels.triton_linear_scatter as kernel_module

    kernel = kernel_module._linear_scatter_kernel
    kernel_fn = getattr(kernel, "fn", kernel)
    sys.path.insert(0, str(ROOT))  # the tests package (tests.support, tests.kernels)
    from tests.kernels import test_kernels, test_kernels_quantized  # set TRITON_INTERPRET=1 at import (CPU suite)

    if device == "cuda":
        os.environ["TRITON_INTERPRET"] = "0"  # ... undone: Triton (>= 3.4) reads it again at each launch
    info = {
        "device": device,
        "kernel_object": type(kernel_fn).__name__,
        "interpreted": bool(kernel_module._interpreting()),
        "kernel_calls_on_device": 0,
    }
    reference_runs = {test_kernels: test_kernels.run_kernel, test_kernels_quantized: test_kernels_quantized.run_kernel}
    configs = list(getattr(kernel, "configs", []))
    rotate = not autotune and len(configs) > 1
    info["autotune"] = "every config of the autotuner per call" if not rotate else "one config per call, rotating"
    info["configs"] = len(configs)
    used: set[int] = set()
    info["configs_unusable"] = []
    unusable = tuple(
        getattr(errors, name)
        for errors in [importlib.import_module("triton.runtime.errors")]
        for name in ("OutOfResources", "PTXASError")
        if hasattr(errors, name)
    )

    def on_device(reference_run):
        def run_kernel_on_device(case):
            call = info["kernel_calls_on_device"]
            info["kernel_calls_on_device"] += 1
            moved = {name: _to_device(value, device) for name, value in case.items()}
            if not rotate:
                return _to_cpu(reference_run(moved))
            kernel.configs = [configs[call % len(configs)]]  # one config: the autotuner runs it without benchmarking
            try:
                result = reference_run(moved)
                used.add(call % len(configs))
                info["configs_exercised"] = len(used)
            except unusable as exc:  # as the autotuner does, skip a config the shape cannot run; autotune this call
                info["configs_unusable"].append(f"config {call % len(configs)}: {type(exc).__name__}")
                kernel.configs = configs
                result = reference_run(moved)
            finally:
                kernel.configs = configs
            return _to_cpu(result)

        return run_kernel_on_device

    for module, reference_run in reference_runs.items():
        module.run_kernel = on_device(reference_run)
    plugin = _PytestReport(report_path, info)
    files = [str(TESTS / "kernels" / name) for name in KERNEL_TEST_FILES]
    args = [*files, "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT)]
    return int(pytest.main(args, plugins=[plugin]))


def stage_kernel_tests(suite: Suite, st: Stage) -> None:
    if importlib.util.find_spec("triton") is None:
        raise SkipStage("triton is not installed (pip install -e '.[test]'); the kernel needs it on CUDA")
    if suite.dry:
        st.skip_part(
            "real Triton on a GPU",
            "dry run, no CUDA: the same harness runs the kernel tests through Triton's interpreter "
            "(TRITON_INTERPRET=1)",
        )
    report = Path(tempfile.mkdtemp(prefix="gpu_suite_kernel_tests_")) / "report.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(SCRIPT), "--kernel-tests-child", suite.device, str(report)]
    cmd += ["--kernel-tests-autotune"] if suite.args.kernel_tests_autotune else []
    tests = " ".join(f"tests/kernels/{name}" for name in KERNEL_TEST_FILES)
    st.data.update({"command": f"pytest {tests} (kernel calls moved to the device)", "mode": None})
    with st.step(f"pytest {tests}, kernel calls on {suite.device}"):
        timeout = max(5.0, st.left())
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            returncode, timed_out = proc.returncode, False
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as exc:
            returncode, timed_out = None, True
            tail = ((exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"))[-3000:]
    counts = json.loads(report.read_text()) if report.is_file() else {}
    shutil.rmtree(report.parent, ignore_errors=True)
    st.data.update(counts)
    st.data["returncode"] = returncode
    st.data["output_tail"] = tail
    st.data["mode"] = "Triton interpreter on CPU (dry run)" if counts.get("interpreted") else "real Triton"
    if timed_out:
        raise CutShort(f"pytest did not finish in the stage's budget ({counts.get('passed', 0)} passed so far)")
    if not counts:
        raise RuntimeError(f"pytest wrote no report (exit status {returncode}): {tail[-500:]}")
    st.check(
        "kernel tests pass",
        returncode == 0 and counts["failed"] == 0 and counts["errors"] == 0,
        f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped of {counts['collected']}; exit status {returncode}",
    )
    st.check(
        "the kernel ran where intended",
        counts["kernel_calls_on_device"] > 0 and counts["interpreted"] == suite.dry,
        f"{counts['kernel_calls_on_device']} kernel calls on {suite.device}, kernel object "
        f"{counts['kernel_object']}, interpreter {'on' if counts['interpreted'] else 'off'}",
    )
