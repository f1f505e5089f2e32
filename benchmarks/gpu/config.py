"""The suite's stages, their time budgets, and the paths and commands it writes into its results."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
DEFAULT_OUT = ROOT / "docs" / "gpu"
COMMAND = "python benchmarks/gpu_suite.py --out docs/gpu"
INSTALL = 'pip install torch==2.13.0 && pip install -e ".[test,tensorrt]"'

STAGES = (
    "env", "kernel_tests", "kernel_speed", "sd3", "flux", "tensorrt", "stacks", "memory", "context_parallel", "report",
)  # fmt: skip
#: Seconds per stage; they sum to 480 s (8 minutes), so that a rerun fits in the device lease too.
BUDGETS = {
    "env": 5, "kernel_tests": 45, "kernel_speed": 50, "sd3": 160, "flux": 40, "tensorrt": 85, "stacks": 20,
    "memory": 40, "context_parallel": 25, "report": 10,
}  # fmt: skip
TOTAL_BUDGET_S = sum(BUDGETS.values())
REPORT_RESERVE_S = 5.0  # kept back from the other stages for writing the report

#: Flux's double- and single-stream blocks timed by default (``--flux-layers``; Flux-dev has 19 and 38): the whole
#: model does not fit the ``flux`` stage's budget.
FLUX_DEFAULT_LAYERS = (2, 4)

#: The kernel test files the ``kernel_tests`` stage runs with their kernel calls on the device.
KERNEL_TEST_FILES = ("test_kernels.py", "test_kernels_quantized.py")


def stage_budgets(total: float, overrides: list[str] | None) -> dict[str, float]:
    scale = float(total) / TOTAL_BUDGET_S
    budgets = {name: seconds * scale for name, seconds in BUDGETS.items()}
    for item in overrides or []:
        name, _, value = item.partition("=")
        if name not in BUDGETS or not value:
            raise ValueError(f"--stage-budget {item!r}: expected NAME=SECONDS with NAME one of {', '.join(STAGES)}")
        budgets[name] = float(value)
    return budgets
