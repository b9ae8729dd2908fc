"""raydc.infra.tracking: the config as parameters, summaries as numbers, plots, and runs
written to a real MLflow store (SQLite, read back with MLflow's client) and to W&B offline
run files (read back from their records), nested job -> stage -> children."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from types import SimpleNamespace

import pytest

from raydc.config import ConfigError, from_dict
from raydc.infra import tracking
from tests.tracking_fixtures import mlflow_runs, wandb_runs


def test_flatten_and_params_spell_the_config_as_dotted_text():
    tree = {
        "a": {"b": 1, "c": [1, 2], "d": {"e": None}},
        "phases": [{"name": "p", "train": {"lr": 0.5}}],
        "empty": {},
        "s": "x",
    }
    assert tracking.flatten(tree) == {
        "a.b": 1,
        "a.c": [1, 2],
        "a.d.e": None,
        "phases.0.name": "p",
        "phases.0.train.lr": 0.5,
        "empty": {},
        "s": "x",
    }
    assert tracking.params(tree) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "a.d.e": "null",
        "phases.0.name": "p",
        "phases.0.train.lr": "0.5",
        "empty": "{}",
        "s": "x",
    }
    long = tracking.params({"k": "y" * 7000})["k"]
    assert long == "y" * 6000


def test_scalars_keep_the_finite_numbers_of_a_summary():
    summary = {
        "rows": 3,
        "ok": True,
        "nan": float("nan"),
        "path": "/x",
        "list": [1, 2],
        "engines": {"student": {"tokens_per_s": 1.5, "name": "s"}},
    }
    assert tracking.scalars(summary) == {"rows": 3.0, "engines/student/tokens_per_s": 1.5}


def test_metric_keys_are_made_acceptable_to_mlflow():
    assert tracking.metric_key("train/weight_clip_<0.5>") == "train/weight_clip__0.5_"
    assert tracking.metric_key("a b:c-d.e") == "a b:c-d.e"
    assert len(tracking.metric_key("k" * 300)) == 250


def test_the_mlflow_store_is_the_field_then_the_env_then_a_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = from_dict({"run": {"output_dir": str(tmp_path / "out")}})
    assert tracking.mlflow_uri(cfg) == f"sqlite:///{tmp_path}/out/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking.mlflow_uri(cfg) == "http://tracking:5000"
    cfg = from_dict({"run": {"output_dir": "x", "mlflow_tracking_uri": "sqlite:////d/m.db"}})
    assert tracking.mlflow_uri(cfg) == "sqlite:////d/m.db"
    assert tracking.artifact_root("sqlite:////d/m.db") == "file:///d/artifacts"
    assert tracking.artifact_root("http://tracking:5000") is None


@pytest.mark.parametrize(
    "trackers, message",
    [
        (["neptune"], "run.trackers[0]='neptune': must be one of"),
        (["mlflow", "mlflow"], "names a tracker twice"),
        ("mlflow", "run.trackers='mlflow': must be a list"),
    ],
)
def test_bad_trackers_fail_naming_the_field(trackers, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_dict({"run": {"trackers": trackers}})


def test_a_missing_package_fails_naming_run_trackers(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"run.trackers=\['mlflow', 'wandb'\]: wandb is not"):
        tracking.check_trackers(["mlflow", "wandb"])
    tracking.check_trackers(["tensorboard", "mlflow"])  # installed: no error


def test_no_run_without_mlflow_or_wandb():
    assert tracking.run_spec(from_dict({}), "train", "train") is None
    assert tracking.start_job(from_dict({"run": {"trackers": []}})) is None
    assert tracking.job_parent() is None
    assert tracking.finish_job("FINISHED", {"rows": 1}) == {}


def _png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_of_a_metrics_file(tmp_path):
    hist = {"edges": [0.0, 0.5, 1.0, 1.5], "counts": [1, 4, 2]}
    rows = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5, "val_nll": 1.8, "weight_histogram": hist},
        {"step": 2, "loss": 1.4, "val_nll": 1.7, "weight_histogram": hist},  # re-run step
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plots = tracking.write_plots(tmp_path / "metrics.jsonl", tmp_path / "plots")
    assert [p.name for p in plots] == ["loss.png", "weights.png"]
    assert all(_png(p) for p in plots)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    plots = tracking.write_plots(tmp_path / "metrics.jsonl", tmp_path / "plots2")
    assert [p.name for p in plots] == ["loss.png"] and _png(plots[0])


def test_job_stage_and_child_runs_in_mlflow_and_wandb(tmp_path, monkeypatch):
    """The job's run holds the config, the stage summaries and the run summary; a stage's
    run nests under it (MLflow's parent tag, W&B's group) with its metrics by step, a
    histogram and a plot; a child left running when the job ends is marked killed."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "job"
    cfg = from_dict(
        {"run": {"output_dir": str(out), "trackers": ["mlflow", "wandb"]}, "train": {"lr": 0.5}}
    )
    tracking.start_job(cfg)
    parent = tracking.job_parent()
    assert parent.root == str(out)
    name = tracking.child_name(out / "phases" / "p1" / "train", parent)
    assert name == "phases/p1/train"
    child = tracking.run_spec(cfg, name, "train", parent).start()
    hist = {"edges": [0.0, 1.0, 2.0], "counts": [3, 1]}
    child.log({"train/loss": 2.0, "train/lr": 0.1}, 1, hist)
    child.log({"train/loss": 1.0, "train/lr": 0.05}, 2)
    (tmp_path / "p.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    child.files([tmp_path / "p.png"], "plots")
    child.finish()
    # A training that never sent its final report (MLflow only: a W&B run lives and ends
    # with its process)
    mlflow_only = dataclasses.replace(parent.tracking, trackers=("mlflow",))
    tracking.RunSpec(mlflow_only, "train", "train", {}, parent).start()
    results = {"score": SimpleNamespace(summary={"rows_out": 7, "path": "/x"})}
    where = tracking.finish_job("FINISHED", {"rows": 4, "eval": {"accuracy": 0.5}}, results)
    assert tracking.job_parent() is None

    # MLflow, through its client
    uri = f"sqlite:///{out}/mlruns/mlflow.db"
    assert where["mlflow"]["uri"] == uri
    client = MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in mlflow_runs(uri)}
    assert set(runs) == {"job", "phases/p1/train", "train"}
    job, trained = runs["job"], runs["phases/p1/train"]
    assert job.info.run_id == where["mlflow"]["run_id"]
    assert job.data.params["train.lr"] == "0.5"
    assert job.data.params["run.trackers"] == '["mlflow", "wandb"]'
    assert job.data.metrics["summary/rows"] == 4.0
    assert job.data.metrics["summary/eval/accuracy"] == 0.5
    assert job.data.metrics["stages/score/rows_out"] == 7.0
    arts = {a.path for a in client.list_artifacts(job.info.run_id)}
    assert {"config.yaml", "summary.json", "stages"} <= arts
    assert [a.path for a in client.list_artifacts(job.info.run_id, "stages")] == [
        "stages/score.json"
    ]
    assert trained.data.tags[tracking.MLFLOW_PARENT] == job.info.run_id
    assert trained.data.params["train.lr"] == "0.5"
    history = client.get_metric_history(trained.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    assert [a.path for a in client.list_artifacts(trained.info.run_id, "plots")] == ["plots/p.png"]
    assert job.info.status == trained.info.status == "FINISHED"
    assert runs["train"].info.status == "KILLED"

    # W&B, from the offline run files
    wb = {r["name"]: r for r in wandb_runs(out)}
    assert set(wb) == {"job", "phases/p1/train"}
    assert wb["job"]["group"] == wb["phases/p1/train"]["group"] and wb["job"]["group"]
    assert wb["job"]["config"]["train"]["lr"] == 0.5
    assert wb["job"]["summary"]["summary/rows"] == 4
    assert {"config.yaml", "summary.json", "stages/score.json"} <= wb["job"]["files"]
    assert wb["job"]["exit_code"] == 0
    rows = [h for h in wb["phases/p1/train"]["history"] if "train/loss" in h]
    assert [(h["train/step"], h["train/loss"]) for h in rows] == [(1, 2.0), (2, 1.0)]
    assert rows[0]["train/weights/values"] == [3, 1]
    assert rows[0]["train/weights/bins"] == [0.0, 1.0, 2.0]
    assert "plots/p.png" in wb["phases/p1/train"]["files"]
    assert where["wandb"]["run_id"] == wb["job"]["id"]


def test_the_command_line_logs_the_job_and_its_status(tmp_path, monkeypatch, capsys):
    """``raydc <stage>`` opens the job's run before the stages and ends it with the stage
    summaries and the run summary (FINISHED), or FAILED when a stage fails. The stages are
    stubbed: what runs them is tested elsewhere; this is the command's wiring."""
    from raydc.cli import main
    from raydc.infra.artifacts import StageError, StageResult
    from raydc.pipeline import Pipeline

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    prepared = {"rows_in": 5, "rows_out": 4, "rows_rejected": 1, "seconds": 2.0}

    def prepare(self, name):
        self.results[name] = StageResult(name, self.root / name, "fp", prepared, False)
        return self.results[name]

    def fail(self, name):
        raise StageError(f"stage {name!r} failed")

    args = [f"run.output_dir={out}", "run.trackers=[mlflow]", "score.student=", "score.teacher="]
    monkeypatch.setattr(Pipeline, "run_until", prepare)
    assert main(["prepare", *args]) == 0
    assert "mlflow: uri sqlite:///" in capsys.readouterr().out
    monkeypatch.setattr(Pipeline, "run_until", fail)
    assert main(["prepare", *args, "train.lr=0.25"]) == 1

    done, failed = mlflow_runs(f"sqlite:///{out}/mlruns/mlflow.db")
    assert done.info.run_name == failed.info.run_name == "run"
    assert (done.info.status, failed.info.status) == ("FINISHED", "FAILED")
    assert done.data.params["run.output_dir"] == str(out)
    assert failed.data.params["train.lr"] == "0.25"
    assert done.data.metrics["stages/prepare/rows_out"] == 4.0
    assert done.data.metrics["summary/rows/rows_rejected"] == 1.0  # the run summary's rows
    assert "summary/rows/rows_out" not in failed.data.metrics
