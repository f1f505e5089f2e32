"""The ``env`` stage: versions, the device and its driver, the source commit, whether inductor's cache was warm, and
the device's datasheet peaks (:func:`device_peaks`) that the kernel speeds are set against."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .config import ROOT
from .suite import Stage, Suite

#: Datasheet peaks without sparsity (approximate): dense bf16/fp16 tensor-core TFLOP/s, memory GB/s. Matched
#: against ``torch.cuda.get_device_name()`` in this order (first substring that matches).
DEVICE_PEAKS = (
    ("H200 NVL", "H200 NVL", 835.0, 4800.0),
    ("H200", "H200 SXM", 989.0, 4800.0),
    ("H100 NVL", "H100 NVL", 835.0, 3900.0),
    ("H100 PCIE", "H100 PCIe", 756.0, 2000.0),
    ("H100", "H100 SXM", 989.0, 3350.0),
    ("A100-SXM4-40GB", "A100 SXM 40GB", 312.0, 1555.0),
    ("A100-PCIE-40GB", "A100 PCIe 40GB", 312.0, 1555.0),
    ("A100 80GB PCIE", "A100 PCIe 80GB", 312.0, 1935.0),
    ("A100", "A100 SXM 80GB", 312.0, 2039.0),
    ("L40S", "L40S", 362.0, 864.0),
    ("L4", "L4", 121.0, 300.0),
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def nvidia_smi() -> dict | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    fields = "name,driver_version,memory.total,clocks.max.sm,power.limit,pci.bus_id"
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[-300:]}
    gpus = [dict(zip(fields.split(","), (v.strip() for v in line.split(",")))) for line in out.stdout.splitlines()]
    return {"gpus": gpus}


def device_peaks(name: str | None) -> dict:
    upper = (name or "").upper()
    for key, label, tflops, gbps in DEVICE_PEAKS:
        if key in upper:
            return {"device": label, "tflops_bf16_fp16": tflops, "gbps": gbps, "source": "datasheet, dense"}
    return {"device": "unknown", "tflops_bf16_fp16": None, "gbps": None, "source": "unknown device"}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (working tree modified)" if dirty.stdout.strip() else "")


def stage_env(suite: Suite, st: Stage) -> None:
    with st.step("versions, device, driver"):
        from rascompile.bench.workload import machine_info  # imports Triton: not before main settles its variable

        info = machine_info()
        info["versions"] = {
            dist: _version(dist)
            for dist in (
                "torch", "triton", "tensorrt", "torch_tensorrt", "diffusers", "onnx", "onnxruntime",
                "onnxruntime-gpu", "rascompile", "numpy", "pytest",
            )
        }  # fmt: skip
        info["cuda_available"] = torch.cuda.is_available()
        info["torch_cuda"] = torch.version.cuda
        info["triton_interpret_at_start"] = suite.results["runs"][-1].get("triton_interpret_at_start")
        cache = Path(tempfile.gettempdir()) / f"torchinductor_{os.environ.get('USER', '') or os.getuid()}"
        info["inductor_cache_existed"] = cache.is_dir()
        info["git_commit"] = _git_commit()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = {
                "name": torch.cuda.get_device_name(0),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
                "count": torch.cuda.device_count(),
                "cudnn": torch.backends.cudnn.version(),
            }
        info["nvidia_smi"] = nvidia_smi()
        info["peaks"] = device_peaks(info.get("gpu", {}).get("name"))
        st.data.update(info)
    gpu = st.data.get("gpu", {}).get("name", "none")
    smi = st.data["nvidia_smi"]
    driver = smi["gpus"][0].get("driver_version") if smi and smi.get("gpus") else None
    versions = st.data["versions"]
    suite.log(
        "env",
        f"torch {torch.__version__}, triton {versions['triton']}, tensorrt {versions['tensorrt']}, GPU {gpu}, "
        f"driver {driver or 'n/a (no nvidia-smi)'}",
    )
    if suite.dry:
        st.skip_part("GPU properties and driver", "dry run: no CUDA device is used (nvidia-smi read if present)")
