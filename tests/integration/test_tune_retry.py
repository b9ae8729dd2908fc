"""A real 2-trial Ray Tune sweep over the weighting on the tiny example: Tune over Ray Train
(DeepSpeed, 2 CPU workers), Optuna TPE + ASHA, every trial reading the same scored
Parquet. Scoring runs exactly once for the sweep (counted in the pipeline's stage log),
a rerun reuses the finished sweep, and a sweep whose stage never finished is restored
from its Tune experiment instead of starting over.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from raydc.infra.artifacts import HISTORY

pytestmark = pytest.mark.integration


def _history(root: Path) -> list[str]:
    return [json.loads(x)["stage"] for x in (root / HISTORY).read_text().splitlines()]


# Each of these tests runs in a module of its own, so on a fresh Ray cluster: run after the
# two-trial sweep on the same cluster, its trial waited for resources until the timeout
# (2026-12-06; each passes alone; the leftover holder is not found yet).


def test_a_failed_trial_is_retried_from_its_checkpoint(ray_local, tiny_student, tmp_path):
    """tune.max_failures: a trial whose training fails (a worker killed after step 3, with
    Ray Train's own retries off) is retried by Tune, resumes from its step-2 checkpoint
    and completes; the sweep reports it."""
    from raydc.config import from_dict
    from raydc.tune import run_tune
    from tests.train_fixtures import KillOnce, make_scored

    scored = make_scored(tiny_student, None, tmp_path / "scored", n_rows=24)
    cfg = from_dict(
        {
            "train": {
                "student": tiny_student,
                "num_workers": 1,
                "zero_stage": 1,
                "max_steps": 4,
                "micro_batch_tokens": 256,
                "log_every": 1,
                "checkpoint_every": 2,
                "val_share": 0.25,
                "max_failures": 0,  # the worker group is not restarted: the trial fails
            },
            "weights": {"preset": "sft"},
            "tune": {
                "enabled": True,
                "num_samples": 1,
                "max_failures": 1,
                "space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3}},
                # judged on the ~6 held-out prompts' val_nll, one seed (metrics.jsonl in
                # the trial's own folder): what is under test is the retry
                "metric": "val_nll",
                "seeds": 1,
                "min_val_problems": 0,
                "scheduler": "none",
                "search_alg": "random",
            },
        }
    )
    marker = tmp_path / "killed.txt"
    s = run_tune(cfg, scored, tmp_path / "tune", after_step=KillOnce(3, str(marker)))
    assert marker.exists(), "the fault never fired"
    assert s["num_trials"] == 1 and s["num_completed"] == 1
    rows = list(csv.DictReader(open(s["results_csv"])))
    assert rows[0]["status"] == "completed" and int(float(rows[0]["step"])) == 4
    metrics = [
        json.loads(x)
        for x in next((tmp_path / "tune" / "trials").iterdir())
        .joinpath("metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    assert metrics[-1]["step"] == 4 and metrics[-1]["resumed_from_step"] == 2
