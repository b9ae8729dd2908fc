"""Experiment tracking on a real training (Ray Train V2 + DeepSpeed, 1 CPU worker, 2 steps):
``run.trackers=[mlflow, wandb]`` logs the job's run and the training's run under it, as
``raydc <stage>`` does (``start_job``, the stage, ``finish_job`` with the run summary), to a
SQLite MLflow store read back through MLflow's client and to W&B offline run files read
back from their records. Every figure is compared with the training's own metrics.jsonl.
(The Tune sweep's runs, one per trial under the sweep's, are checked in test_tune.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydc.config import from_dict
from raydc.infra import tracking
from raydc.infra.artifacts import StageResult
from tests.tracking_fixtures import mlflow_runs, wandb_runs
from tests.train_fixtures import make_scored

pytestmark = pytest.mark.integration


def test_a_training_logs_its_run_under_the_jobs_in_mlflow_and_wandb(
    ray_local, tiny_student, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from raydc.pipeline.summary import summarize_run
    from raydc.train import run_train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # read on the driver, carried to Ray Train
    scored = make_scored(tiny_student, None, tmp_path / "scored", n_rows=24)
    out = tmp_path / "run"
    cfg = from_dict(
        {
            "run": {"output_dir": str(out), "trackers": ["mlflow", "wandb"]},
            "train": {
                "student": tiny_student,
                "num_workers": 1,
                "zero_stage": 1,
                "max_steps": 2,
                "micro_batch_tokens": 256,
                "log_every": 1,
                "checkpoint_every": 2,
                "val_share": 0.25,
                "lr": 1e-3,
            },
            "weights": {"preset": "sft"},
        }
    )
    tracking.start_job(cfg)
    summary = run_train(cfg, scored, out / "train")
    results = {"train": StageResult("train", out / "train", "fp", summary, False)}
    run_summary = summarize_run(results, cfg)
    where = tracking.finish_job("FINISHED", run_summary, results)

    reports = [json.loads(x) for x in Path(summary["metrics_path"]).read_text().splitlines()]
    assert [r["step"] for r in reports] == [1, 2]
    last = reports[-1]
    assert summary["tensorboard_dir"] is None and not (out / "train" / "tensorboard").exists()

    # MLflow, through its client
    uri = f"sqlite:///{out}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in mlflow_runs(uri)}
    assert set(runs) == {"run", "train"}
    job, train = runs["run"], runs["train"]
    assert where["mlflow"]["run_id"] == job.info.run_id
    assert train.data.tags[tracking.MLFLOW_PARENT] == job.info.run_id
    assert job.info.status == train.info.status == "FINISHED"
    for run in (job, train):
        assert run.data.params["train.max_steps"] == "2"
        assert run.data.params["train.lr"] == "0.001"
        assert run.data.params["run.trackers"] == '["mlflow", "wandb"]'
    for key in ("loss", "val_nll", "lr", "tokens_per_s"):
        history = client.get_metric_history(train.info.run_id, f"train/{key}")
        got = sorted((m.step, m.value) for m in history)
        assert got == [(r["step"], r[key]) for r in reports]
    plots = {a.path for a in client.list_artifacts(train.info.run_id, "plots")}
    expected = {"plots/loss.png", "plots/metrics.jsonl"}
    if last.get("weight_histogram"):
        expected.add("plots/weights.png")
    assert plots == expected
    assert job.data.metrics["stages/train/steps"] == 2.0
    assert job.data.metrics["stages/train/metrics/loss"] == last["loss"]
    assert job.data.metrics["summary/train_metrics/loss"] == last["loss"]
    job_files = {a.path for a in client.list_artifacts(job.info.run_id)}
    assert {"config.yaml", "summary.json", "stages"} <= job_files

    # W&B, from the offline run files under <output_dir>/wandb
    wb = {r["name"]: r for r in wandb_runs(out)}
    assert set(wb) == {"run", "train"}
    wjob, wtrain = wb["run"], wb["train"]
    assert wjob["group"] == wtrain["group"] and wtrain["job_type"] == "train"
    assert wjob["exit_code"] == wtrain["exit_code"] == 0
    assert wtrain["config"]["train"]["max_steps"] == 2
    rows = [h for h in wtrain["history"] if "train/loss" in h]
    assert [(h["train/step"], h["train/loss"]) for h in rows] == [
        (r["step"], r["loss"]) for r in reports
    ]
    assert {"plots/loss.png", "plots/metrics.jsonl"} <= wtrain["files"]
    assert wjob["summary"]["stages/train/steps"] == 2
    assert {"config.yaml", "summary.json", "stages/train.json"} <= wjob["files"]
