"""Running the stages: a :class:`Suite` runs each stage's body within its budget and records it in ``results.json``
(rewritten after every sub-step, the README after every stage, so a run cut short or killed keeps what finished); a
:class:`Stage` is one stage's record, clock, sub-steps, checks and skipped parts."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .config import REPORT_RESERVE_S, STAGES, stage_budgets
from .readme import render_readme


class CutShort(Exception):
    """A stage ran past its budget; the sub-steps not yet begun are not run."""


class SkipStage(Exception):
    """The whole stage cannot run here (the message says why)."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Suite:
    def __init__(self, args: argparse.Namespace, out: Path):
        self.t0 = time.perf_counter()
        self.dry = bool(args.dry_run)
        self.cuda = torch.cuda.is_available() and not self.dry
        self.device = "cuda" if self.cuda else "cpu"
        self.out = out
        self.args = args
        self.total_budget = float(args.budget_s)
        self.budgets = stage_budgets(args.budget_s, args.stage_budget)
        self.selected = set(args.stage) if args.stage else set(STAGES)
        self.selected |= {"env", "report"}
        self.results = self._initial_results()

    def _initial_results(self) -> dict:
        run = {
            "started": _now(),
            "argv": sys.argv[1:],
            "dry_run": self.dry,
            "device": self.device,
            "budget_s": self.total_budget,
            "stages": [s for s in STAGES if s in self.selected],
        }
        previous = self.out / "results.json"
        earlier = json.loads(previous.read_text()) if self.args.stage and previous.is_file() else None
        if earlier and not self.dry and earlier.get("dry_run") is False:
            results = earlier  # a rerun of some stages on a GPU: keep the others
            results.setdefault("runs", []).append(run)
        else:
            results = {"suite": "benchmarks/gpu_suite.py", "runs": [run], "stages": {}}
        results["dry_run"] = self.dry
        for name in STAGES:
            if name not in self.selected and name not in results["stages"]:
                results["stages"][name] = _stage_record("skipped", "not selected (--stage)", self.budgets[name])
        return results

    @property
    def run_index(self) -> int:
        return len(self.results["runs"]) - 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, stage: str, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {stage:<12} {message}", flush=True)

    def save(self) -> None:
        self.results["runs"][-1]["elapsed_s"] = round(self.elapsed(), 2)
        write_atomically(self.out / "results.json", json.dumps(self.results, indent=2, default=_json_default) + "\n")

    def save_readme(self) -> None:
        write_atomically(self.out / "README.md", render_readme(self.results))

    def run_stage(self, name: str, body: Callable[[Suite, Stage], None]) -> None:
        if name not in self.selected:
            return
        left = self.total_budget - self.elapsed() - (0 if name == "report" else REPORT_RESERVE_S)
        budget = max(0.0, min(self.budgets[name], left))
        stage = Stage(self, name, budget)
        self.results["stages"][name] = stage.record
        stage.record["run"] = self.run_index
        self.log(name, f"begins (budget {budget:.0f} s)")
        try:
            if budget <= 0:
                raise CutShort(f"no time left of the --budget-s {self.total_budget:g} s total")
            with torch.no_grad():
                body(self, stage)
        except CutShort as exc:
            stage.finish("cut short", str(exc))
        except SkipStage as exc:
            stage.finish("skipped", str(exc))
        except Exception as exc:  # noqa: BLE001 - record it, keep going with the next stage
            stage.record["error"] = traceback.format_exc()[-4000:]
            stage.finish("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        else:
            failed = [c["name"] for c in stage.record["checks"] if not c["passed"]]
            if failed:
                stage.finish("failed", "check(s) failed: " + "; ".join(failed))
            else:
                stage.finish("ok", None)
        finally:
            torch._dynamo.reset()
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.save()
        self.save_readme()


def _stage_record(status: str, reason: str | None, budget: float) -> dict:
    return {
        "status": status,
        "reason": reason,
        "budget_s": round(budget, 1),
        "elapsed_s": 0.0,
        "steps": [],
        "skipped": [],
        "checks": [],
        "data": {},
    }


class Stage:
    def __init__(self, suite: Suite, name: str, budget: float):
        self.suite, self.name, self.budget = suite, name, budget
        self.t0 = time.perf_counter()
        self.record = _stage_record("running", None, budget)

    @property
    def data(self) -> dict:
        return self.record["data"]

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        """One sub-step: refused (CutShort) when the stage's budget is spent; its time is recorded."""
        if self.elapsed() > self.budget:
            raise CutShort(f"budget of {self.budget:.3g} s spent after {self.elapsed():.3g} s, before '{label}'")
        self.suite.log(self.name, f"{label} (stage {self.elapsed():.1f}/{self.budget:.0f} s)")
        start = time.perf_counter()
        entry = {"name": label, "elapsed_s": None}
        self.record["steps"].append(entry)
        try:
            yield
        finally:
            entry["elapsed_s"] = round(time.perf_counter() - start, 3)
            self.record["elapsed_s"] = round(self.elapsed(), 2)
            self.suite.save()

    def skip_part(self, what: str, reason: str) -> None:
        self.record["skipped"].append({"what": what, "reason": reason})
        self.suite.log(self.name, f"skipped: {what}: {reason}")

    def check(self, name: str, passed: bool, detail: str) -> bool:
        self.record["checks"].append({"name": name, "passed": bool(passed), "detail": detail})
        self.suite.log(self.name, f"check {'passed' if passed else 'FAILED'}: {name}: {detail}")
        return bool(passed)

    def finish(self, status: str, reason: str | None) -> None:
        self.record["status"], self.record["reason"] = status, reason
        self.record["elapsed_s"] = round(self.elapsed(), 2)
        self.suite.log(self.name, f"{status}{': ' + reason if reason else ''} ({self.elapsed():.1f} s)")


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return repr(value)
