"""The quality benchmark's definition (arms, the tune arm's search space, list lengths),
one invocation's ``Plan``, and a run's folder and state (``BenchmarkRun``, written
JSON-safe)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

ARMS = ["sft", "dft", "discord", "das_token", "iw_seq", "tis", "dasd_sft", "tune"]
PRESET_ARMS = ["sft", "dft", "discord", "das_token", "iw_seq", "tis"]
TRACE_SETS = ["clean", "noisy"]  # sampled at params["temperatures"][0] and [1]

# The tune arm's search space, in the library's Tune conventions (dotted config fields),
# around the discord preset: the direction (sign), the temperature and the floor.
TUNE_BASE = "discord"
TUNE_SPACE = {
    "weights.sign": [1, -1],
    "weights.tau": [0.5, 1.0, 2.0, 4.0],
    "weights.floor": [0.0, 0.1, 0.3],
}
TEACHER_LENGTHS = (8, 14)  # the task the teacher knows and the benchmark evaluates
STUDENT_LENGTHS = (3, 10)  # the student's prior: shorter lists, its own style


def write_json_safe(obj):
    """Floats that JSON can hold (NaN -> None)."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: write_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [write_json_safe(v) for v in obj]
    return obj


@dataclass
class Plan:
    """What one invocation runs: the size preset's ``params`` (jobs/benchmark_quality.py's
    FULL or QUICK), the step budgets, arms, trace sets and seeds."""

    params: dict
    budgets: list[int]
    arms: list[str]
    traces: list[str]
    seeds: int  # seeds per arm: 0 .. seeds - 1
    seed: int  # task, teacher and student seed
    student_ref: str


class BenchmarkRun:
    """The run's folder: its log (log.txt, echoed to stdout), the finished stages
    (state.json) and each fine-tuning run's records (records.jsonl, appended as it
    completes), so ``resume`` continues an interrupted run and a report can always be
    written from what finished."""

    def __init__(self, out: str | os.PathLike, resume: bool):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._log = open(self.out / "log.txt", "w")
        self.state_path, self.records_path = self.out / "state.json", self.out / "records.jsonl"
        self.state = (
            json.loads(self.state_path.read_text()) if resume and self.state_path.exists() else {}
        )
        if not resume and self.records_path.exists():
            self.records_path.unlink()
        self.problems_path = self.out / "problems.pt"
        self.teacher_dir = str(self.out / "models" / "teacher")
        self.student_dir = str(self.out / "models" / "student_init")

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def save_state(self, **kv) -> None:
        self.state.update(kv)
        self.state_path.write_text(json.dumps(write_json_safe(self.state), indent=1))
