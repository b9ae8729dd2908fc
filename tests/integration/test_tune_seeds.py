"""A sweep judged on two training seeds (tune.seeds=2): each trial's score is the mean over
the seeds, and the sweep keeps its baseline unless a trial beats it beyond the noise."""

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


def test_a_sweep_on_two_seeds_judges_the_mean_and_keeps_its_baseline(
    ray_local, tiny_student, tmp_path
):
    """tune.seeds=2: every trial trains train.seed and train.seed + 1 (one folder each,
    with its judged.json), its score is the mean of the two val_nll values, and the sweep
    keeps its baseline (SFT) unless a trial beats it by more than baseline_margin standard
    errors (here 100: always kept). best.json reports the seeds, the per-seed values and
    the cost in steps."""
    from raydc.config import from_dict
    from raydc.tune import run_tune
    from tests.train_fixtures import make_scored

    scored = make_scored(tiny_student, None, tmp_path / "scored", n_rows=24)
    cfg = from_dict(
        {
            "train": {
                "student": tiny_student,
                "num_workers": 1,
                "zero_stage": 1,
                "max_steps": 2,
                "micro_batch_tokens": 256,
                "log_every": 1,
                "checkpoint_every": 2,
                "val_share": 0.25,
                "seed": 3,
            },
            "weights": {"preset": "sft"},
            "tune": {
                "enabled": True,
                "num_samples": 2,
                "metric": "val_nll",
                "seeds": 2,
                "min_val_problems": 0,  # a few held-out prompts of 12: no minimum
                "scheduler": "none",
                "search_alg": "random",
                "space": {"weights.preset": ["sft", "discord"]},
                "baseline": {"weights.preset": "sft"},
                "baseline_margin": 100.0,
            },
        }
    )
    s = run_tune(cfg, scored, tmp_path / "tune")
    assert s["num_trials"] == 2 and s["num_completed"] == 2
    assert s["seeds"] == [3, 4] and 0 < s["val_problems"] <= 24
    assert s["best_config"] == {"weights.preset": "sft"}
    assert s["baseline"]["kept"] is True
    assert s["steps_trained"] == 2 * 2 * 2  # trials x seeds x steps
    rows = {r["trial_id"]: r for r in csv.DictReader(open(s["results_csv"]))}
    for d in sorted((tmp_path / "tune" / "trials").iterdir()):
        judged = [json.loads((d / f"seed_{n}" / "judged.json").read_text()) for n in (3, 4)]
        assert [j["seed"] for j in judged] == [3, 4] and all(j["step"] == 2 for j in judged)
        for n in (3, 4):
            reports = (d / f"seed_{n}" / "metrics.jsonl").read_text().splitlines()
            assert json.loads(reports[-1])["val_nll"] == pytest.approx(judged[n - 3]["value"])
        mean = (judged[0]["value"] + judged[1]["value"]) / 2
        assert float(rows[d.name]["val_nll"]) == pytest.approx(mean)
        assert int(float(rows[d.name]["seeds_done"])) == 2
    assert s["best_per_seed"] == pytest.approx(
        [
            json.loads(
                (
                    tmp_path / "tune" / "trials" / s["best_trial"] / f"seed_{n}" / "judged.json"
                ).read_text()
            )["value"]
            for n in (3, 4)
        ]
    )
    assert (Path(s["model_dir"]) / "config.json").is_file()
