"""A real 2-trial Ray Tune sweep over the weighting on the tiny example: Tune over Ray Train
(DeepSpeed, 2 CPU workers), Optuna TPE + ASHA, every trial reading the same scored
Parquet. Scoring runs exactly once for the sweep (counted in the pipeline's stage log),
a rerun reuses the finished sweep, and a sweep whose stage never finished is restored
from its Tune experiment instead of starting over.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from raydc.config import load_config
from raydc.infra.artifacts import HISTORY, MARKER
from raydc.infra.tracking import MLFLOW_PARENT
from raydc.pipeline import CONFIG_DIR, Pipeline
from tests.tracking_fixtures import mlflow_runs

pytestmark = pytest.mark.integration


def _history(root: Path) -> list[str]:
    return [json.loads(x)["stage"] for x in (root / HISTORY).read_text().splitlines()]


def _free_cpus(ray, wait_s: float = 20.0) -> float:
    """The cluster's free CPUs once they stop rising (the raylet reports a release late)."""
    deadline = time.monotonic() + wait_s
    free = ray.available_resources().get("CPU", 0.0)
    while time.monotonic() < deadline and free < ray.cluster_resources()["CPU"] - 1e-6:
        time.sleep(0.5)
        free = ray.available_resources().get("CPU", 0.0)
    return free


def test_two_trial_sweep_scores_once_and_resumes(ray_local, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        CONFIG_DIR / "tune.yaml",
        [
            f"run.output_dir={out}",
            "data.limit=80",
            # The transformers scorer (tested against vLLM by the scoring tests) keeps
            # this test clear of two vLLM engine starts; what is under test is the sweep.
            "score.backend=transformers",
            "select.enabled=false",
            "eval.enabled=false",
            "train.max_steps=4",
            "train.log_every=2",
            "train.checkpoint_every=4",
            "train.val_share=0.2",
            "tune.num_samples=2",
            "tune.grace_period=2",
            "run.trackers=[tensorboard, mlflow]",
        ],
    )
    logs: list[str] = []
    pipe = Pipeline(cfg, log=logs.append)
    res = pipe.run_until("tune")
    s = res.summary
    # The sweep leaves the cluster as it found it: no trial's worker group keeps its CPUs
    # (a trial ASHA stops is killed with its Train controller; run_tune releases the
    # placement group the controller reserved).
    assert _free_cpus(ray_local) == pytest.approx(ray_local.cluster_resources()["CPU"])

    # Scoring ran once, before the sweep; the trials never re-scored.
    assert _history(out) == ["prepare", "score", "tune"]
    scored = pipe.results["score"].out_dir
    assert s["num_trials"] == 2 and s["num_completed"] >= 1
    assert s["metric"] == "val_nll" and s["mode"] == "min"

    rows = list(csv.DictReader(open(s["results_csv"])))
    assert len(rows) == 2
    assert {r["status"] for r in rows} <= {"completed", "stopped early"}
    for r in rows:
        assert r["weights.preset"] in ("discord", "das_token")
        assert 0.25 <= float(r["weights.tau"]) <= 4.0
        assert 0.0 <= float(r["weights.floor"]) <= 0.5
    completed = [r for r in rows if r["status"] == "completed"]
    best = min(completed, key=lambda r: float(r["val_nll"]))
    assert float(s["best_metric"]) == pytest.approx(float(best["val_nll"]))
    assert s["best_config"]["weights.preset"] == best["weights.preset"]

    # The best trial's exported model, and each trial's own folder with its overrides.
    assert (Path(s["model_dir"]) / "config.json").is_file()
    trial_dirs = sorted((out / "tune" / "trials").iterdir())
    assert len(trial_dirs) == 2
    for d in trial_dirs:
        overrides = json.loads((d / "overrides.json").read_text())
        assert set(overrides) == set(cfg.tune.space)
        assert (d / "metrics.jsonl").is_file()
    # Every trial trained on the one scored folder: its manifest was read, not rewritten.
    assert (scored / "manifest.json").is_file()

    # MLflow (run.trackers): one run for the sweep, each trial's training a run under it
    # with the trial's sampled values among its parameters and its losses by step.
    runs = mlflow_runs(f"sqlite:///{out}/mlruns/mlflow.db")
    (sweep,) = [r for r in runs if r.data.tags["raydc.kind"] == "sweep"]
    trials = {r.info.run_name: r for r in runs if r is not sweep}
    assert sweep.info.run_name == "tune" and sweep.info.status == "FINISHED"
    assert sweep.data.metrics["best/best_metric"] == pytest.approx(float(s["best_metric"]))
    assert set(trials) == {d.name for d in trial_dirs}
    for d in trial_dirs:
        run = trials[d.name]
        assert run.data.tags[MLFLOW_PARENT] == sweep.info.run_id
        assert run.info.status in ("FINISHED", "KILLED")  # KILLED: stopped early by ASHA
        for k, v in json.loads((d / "overrides.json").read_text()).items():
            if k != "weights.preset":  # a preset is expanded into the weights fields
                assert run.data.params[k] == json.dumps(v)
        reports = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert run.data.metrics["train/loss"] == reports[-1]["loss"]

    # A rerun reuses everything.
    again = Pipeline(cfg, log=logs.append)
    assert again.run("tune").skipped
    assert _history(out) == ["prepare", "score", "tune"]

    # A sweep whose stage never finished (its marker gone, as after a crash of the driver
    # once the trials were done) is restored from the Tune experiment: no trial reruns.
    (out / "tune" / MARKER).unlink()
    (out / ".tune.pending.json").write_text(json.dumps({"fingerprint": res.fingerprint}))
    restored = Pipeline(cfg, log=logs.append).run("tune")
    assert not restored.skipped
    assert restored.summary["best_trial"] == s["best_trial"]
    assert restored.summary["num_trials"] == 2
    assert sorted((out / "tune" / "trials").iterdir()) == trial_dirs
    assert _history(out) == ["prepare", "score", "tune", "tune"]
    assert any("running (resuming)" in line for line in logs)
