"""Ray Tune's retry of a failed trial (tune.max_failures): the trial resumes from its
latest training checkpoint and the sweep completes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from raydc.infra.artifacts import HISTORY

pytestmark = pytest.mark.integration


def _history(root: Path) -> list[str]:
    return [json.loads(x)["stage"] for x in (root / HISTORY).read_text().splitlines()]


# Run after the ASHA sweep of test_tune.py on the session's cluster, this test's trial once
# waited for CPUs until its timeout: the sweep's stopped trials had left their Train worker
# groups' placement groups reserved (released now by run_tune; test_tune checks it).


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
