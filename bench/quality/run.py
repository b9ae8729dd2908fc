"""The quality benchmark's definition (arms, the tune search space, the sizes), one
invocation's ``Plan``, and a run's folder (``BenchmarkRun``: log, records, JSON-safe)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench.quality.task import Regime

PRESET_ARMS = [
    "sft",
    "dft",
    "discord",
    "das_token",
    "iw_seq",
    "tis",
    # entropy-aware (issue 30): EAFT's gate, its confident-conflict form, an NLL mix
    "eaft",
    "eaft_conflict",
    "das_token_mix",
]
# Arms run after the presets: they use the best and the riskiest weighted preset, chosen
# from the presets' mean final greedy accuracy (offline_opd: the best, then on-policy).
LATER_ARMS = [
    "stages_best",
    "risky_floor",
    "risky_warmup",
    "offline_opd",
    "offline_opd_low_lr",
    "offline_opd_baseline",
    "offline_opd_baseline_full_lr",
]
# On-policy distillation (issue 32; bench.quality.on_policy): rounds of the student's own
# samples scored by the teacher, from the initial student, or after offline training.
# The _low_lr arms take their on-policy steps at OPD_LR_SCALE x the regime's learning rate.
# Declared on 2026-12-06 before any on-policy arm ran in C or L: in K, opd at the offline
# rate (1e-3) diverged (reverse KL 0.2 -> 2.4, no EOS, accuracy 0), and one K seed at 1e-4
# was seen (0.215 -> 0.09 -> 0.215 over 100 steps); a tenth is the one other rate measured.
OPD_LR_SCALE = 0.1
# The _baseline arms: the _low_lr arms with the ``opd_baseline`` preset (the step's mean
# advantage subtracted; raydc.method.weights). Declared on 2026-12-06 before either ran,
# after a one-round diagnostic showed the advantage's mean is -KL (-1.8 in L, -2.6 in C):
# the rate is the _low_lr arms' so that the baseline is the one difference.
# offline_opd_baseline_full_lr: offline_opd_baseline with its on-policy half at the
# regime's own rate (as offline_opd, which diverged without the baseline); declared at
# 20:36 UTC the same day, after K's first 4 seeds of the two _baseline arms and before any
# C or L seed of them.
OPD_BASELINE_ARMS = ["opd_baseline", "offline_opd_baseline", "offline_opd_baseline_full_lr"]
OPD_ARMS = ["opd", "opd_low_lr", "offline_opd", "offline_opd_low_lr", *OPD_BASELINE_ARMS]
ARMS = [
    *PRESET_ARMS,
    "dasd_sft",
    "stages_sft",
    "opd",
    "opd_low_lr",
    "opd_baseline",
    *LATER_ARMS,
    "tune",
]
# The protections on the riskiest preset: a floor on every weight, uniform weights at first.
PROTECTIONS = {"risky_floor": {"floor": 0.3}, "risky_warmup": {"weight_warmup_steps": 20}}

# The tune arm: the token-level sigmoid family 2 sigmoid(sign * (log p_S - log p_T) / tau),
# self-normalised, with an entropy gate and an NLL mix (nll_mix = 1 is SFT); Ray Tune
# searches these dotted fields on the validation split. TUNE_SFT is evaluated first in every
# search (the baseline point), and a trial replaces it only if it beats it by more than the
# standard error of their difference over the trial seeds (bench.quality.tuning.choose).
TUNE_BASE = ("discord", {})
TUNE_SPACE = {
    "weights.sign": [1, -1],
    "weights.tau": [1.0, 2.0],
    "weights.gate": ["none", "conflict"],
    "weights.nll_mix": [0.0, 0.5, 1.0],
}
TUNE_SFT = {"weights.sign": 1, "weights.tau": 1.0, "weights.gate": "none", "weights.nll_mix": 1.0}


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
    """What one regime's run does (jobs/benchmark_quality.py's FULL or QUICK sizes)."""

    regime: Regime
    sizes: dict
    evals: list[int]  # eval steps; the last is the run's length
    arms: list[str]
    seeds: int  # seeds per core arm: 0 .. seeds - 1
    later_seeds: int  # seeds per arm of LATER_ARMS
    deadline_s: float  # no job starts that would end after this many seconds of the run
    tune_trials: int
    tune_seeds: int = 2  # each tune trial's training seeds (judged on their mean)

    @property
    def steps(self) -> int:
        return self.evals[-1]

    def seeds_of(self, arm: str) -> int:
        return self.later_seeds if arm in LATER_ARMS else self.seeds


class BenchmarkRun:
    """The run's folder: log.txt (echoed to stdout), records.jsonl (each fine-tuning run's
    records as it completes), data.pt and the trace sets under traces/. ``resume``: a
    finished run's folder, its log and records kept and appended to (arms added later)."""

    def __init__(self, out: str | os.PathLike, resume: bool = False):
        self.out = Path(out).resolve()  # absolute: Ray Tune trials run in their own folders
        (self.out / "traces").mkdir(parents=True, exist_ok=True)
        self._log = open(self.out / "log.txt", "a" if resume else "w")
        self.records_path = self.out / "records.jsonl"
        if not resume:
            self.records_path.unlink(missing_ok=True)
        self.data_path = str(self.out / "data.pt")
        self.info: dict = {}

    def trace_path(self, name: str) -> str:
        return str(self.out / "traces" / f"{name}.pt")

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def append(self, records: list[dict]) -> None:
        with open(self.records_path, "a") as fh:
            for r in records:
                fh.write(json.dumps(write_json_safe(r)) + "\n")

    def rewrite_records(self, records: list[dict]) -> None:
        """records.jsonl replaced by ``records`` (written beside it, then moved over it)."""
        tmp = self.records_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(write_json_safe(r)) + "\n" for r in records))
        os.replace(tmp, self.records_path)

    def records(self) -> list[dict]:
        if not self.records_path.exists():
            return []
        return [json.loads(x) for x in self.records_path.read_text().splitlines()]
