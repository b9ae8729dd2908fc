"""Ray Tune over the weighting: a sweep of weighted-distillation runs on the same scores.

The Ray Tune V2 pattern: a ``Tuner`` runs a per-trial *driver function*; the driver turns
the trial's sampled values (dotted config fields such as ``weights.tau``, or a
``weights.preset`` choice) into a full config, builds the trial's ``TorchTrainer`` with
``raydc.train.build_trainer`` and a ``TuneReportCallback`` (so every ``ray.train.report``
of the workers reaches Tune, and ASHA can stop a trial early), and fits it. Every trial
reads the same scored Parquet: weights are computed in the loss from the stored log-probs,
so a sweep of N trials scores the data once (the pipeline's score stage).

Metrics (``tune.metric``):
- ``val_nll``: NLL of held-out teacher traces (``train.val_share > 0``), reported while
  training. Cheap, but biased toward plain SFT: SFT minimises exactly this quantity, so a
  weighting that helps free generation can score worse here.
- ``val_accuracy``: after training, the trial generates on ``eval.path`` and grades
  (``raydc.eval``). What you want when the task has answers; costs an eval per trial.
- ``val_reverse_kl``: after training, the student's own samples scored by the teacher
  (``raydc.eval.reverse_kl``, needs ``score.teacher``): how far the student's distribution
  drifts from the teacher's where the student actually goes.

Trials that fail are retried (``tune.max_failures``); a retried trial resumes from its
latest training checkpoint. A stopped sweep resumes: running the stage again restores the
experiment (``Tuner.restore``) and finishes the trials that had not.

On 2 CPUs the per-trial driver asks for ``tune.driver_cpus`` (0.01) and the trainer's
workers for ``train.cpus_per_worker``; the trial must leave a whole CPU for Ray Data's file
listing task (0.49 x 2 workers does). Tune does not see the trainer's own resource request,
so ``max_concurrent_trials`` is derived here from what one trial's worker group needs and
what the cluster has.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from raydc.config import ConfigError, RaydcConfig, from_dict, roles
from raydc.infra.artifacts import fingerprint_paths, write_json
from raydc.infra.models import check_input, check_model
from raydc.infra.stage import Stage, Upstream, model_outputs
from raydc.train import data_stage, training_parts

EXPERIMENT = "sweep"
EVAL_METRICS = {  # tune metric -> keys raydc.eval's summary may hold it under
    "val_accuracy": ("val_accuracy", "accuracy", "pass@1"),
    "val_reverse_kl": ("val_reverse_kl", "reverse_kl"),
}


# ----------------------------------------------------------------------------- config


def trial_config(base: RaydcConfig, sample: dict) -> RaydcConfig:
    """The full config of one trial: ``base`` with the sampled dotted fields applied.

    A sampled ``weights.preset`` replaces the whole weights section with that preset
    first; the other sampled ``weights.*`` fields then apply on top of it.
    """
    tree = base.to_dict()
    overrides = dict(sample)
    name = overrides.pop("weights.preset", None)
    if name is not None:
        tree["weights"] = {"preset": name}
    cfg = from_dict(tree, overrides)
    return dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, enabled=False))


def _spec(raw: Any) -> dict:
    return {"type": "choice", "values": raw} if isinstance(raw, list) else dict(raw)


def check_space(cfg: RaydcConfig) -> None:
    """Fail before any trial starts if a value of the space makes an invalid config; the
    error names ``tune.space.<field>``. Each bound / value is tried alone on the base."""
    if not cfg.tune.space:
        raise ConfigError("tune.space: empty; name at least one field to search")
    for key, raw in cfg.tune.space.items():
        spec = _spec(raw)
        values = spec["values"] if "values" in spec else [spec["low"], spec["high"]]
        for v in values:
            try:
                trial_config(cfg, {key: v})
            except ConfigError as e:
                raise ConfigError(f"tune.space.{key}: value {v!r} is invalid: {e}") from e
    tc = cfg.tune
    if tc.metric == "val_nll" and cfg.train.val_share <= 0:
        raise ConfigError(
            "tune.metric=val_nll needs held-out traces: set train.val_share > 0 (e.g. 0.1)"
        )
    if tc.metric != "val_nll" and not cfg.eval.path:
        raise ConfigError(f"tune.metric={tc.metric}: needs eval.path (held-out prompts)")
    if tc.metric == "val_reverse_kl" and not cfg.score.teacher:
        raise ConfigError("tune.metric=val_reverse_kl: needs score.teacher to score samples")


def param_space(cfg: RaydcConfig) -> dict:
    """``tune.space`` as Ray Tune domains, keyed by the dotted field names."""
    from ray import tune

    out = {}
    for key, raw in cfg.tune.space.items():
        spec = _spec(raw)
        kind = spec["type"]
        if kind == "grid" and cfg.tune.search_alg == "optuna":
            kind = "choice"  # Optuna samples; an exhaustive grid is search_alg=grid
        if cfg.tune.search_alg == "grid":
            kind = "grid"
        if kind == "uniform":
            out[key] = tune.uniform(spec["low"], spec["high"])
        elif kind == "loguniform":
            out[key] = tune.loguniform(spec["low"], spec["high"])
        elif kind == "randint":
            out[key] = tune.randint(int(spec["low"]), int(spec["high"]))
        elif kind == "choice":
            out[key] = tune.choice(list(spec["values"]))
        else:
            out[key] = tune.grid_search(list(spec["values"]))
    return out


def trial_resources(cfg: RaydcConfig) -> dict:
    """What one trial holds while it trains: its driver plus the trainer's workers."""
    tc = cfg.train
    res = {"CPU": cfg.tune.driver_cpus + tc.num_workers * tc.cpus_per_worker}
    if tc.use_gpu:
        res["GPU"] = float(tc.num_workers)
    return res


def max_concurrent(cfg: RaydcConfig, cluster: dict) -> int:
    """``tune.max_concurrent_trials``, or how many trials' worker groups the cluster fits
    at once (at least 1). Tune cannot derive this: it only sees the driver's resources."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    need = trial_resources(cfg)
    have = dict(cluster)
    # One whole CPU stays free for Ray Data: the file listing that feeds each trial's
    # workers asks for a full CPU, and a trial waits forever for its data without it.
    have["CPU"] = have.get("CPU", 0.0) - 1.0
    fits = [math.floor(have.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    return max(1, min(fits) if fits else 1)


# ----------------------------------------------------------------------------- the trial


def _eval_metric(summary: dict, metric: str) -> float:
    for where in (summary, summary.get("metrics") or {}):
        for key in EVAL_METRICS[metric]:
            if isinstance(where.get(key), (int, float)):
                return float(where[key])
    raise KeyError(f"raydc.eval's summary has no {metric} (looked for {EVAL_METRICS[metric]})")


def _worst(mode: str) -> float:
    return math.inf if mode == "min" else -math.inf


def run_trial(
    config: dict,
    base: RaydcConfig,
    data_dir: str,
    sweep_dir: str,
    student_fp: str | None = None,
    after_step=None,
    tracking=None,
) -> None:
    """The per-trial driver: sampled values -> config -> TorchTrainer (reporting to Tune)
    -> fit -> optionally eval. Runs in a Tune trial actor with ``tune.driver_cpus``.
    ``tracking``: the sweep's MLflow / W&B run (a ``raydc.infra.tracking.Parent``), under
    which the trial's training logs as a run named by the trial id."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raydc.train import build_trainer
    from raydc.train.trainer import export_model

    mode = base.tune.resolved_mode
    try:
        cfg = trial_config(base, config)
    except ConfigError as e:  # a sampled combination (e.g. w_min > w_max): worst score
        tune.report({base.tune.metric: _worst(mode), "invalid_config": str(e), "final": True})
        return
    trial_id = tune.get_context().get_trial_id()
    trial_dir = Path(sweep_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "overrides.json").write_text(json.dumps(config, indent=2, default=str))
    trainer = build_trainer(
        cfg,
        data_dir,
        trial_dir,
        extra_callbacks=[TuneReportCallback()],
        # Same name and storage on a retry: Ray Train resumes from the latest checkpoint.
        run_config_overrides={"name": "train", "storage_path": str(trial_dir / "ray")},
        student_fingerprint=student_fp,  # checked once for the sweep, not per trial
        after_step=after_step,
        tracking_name=trial_id,
        tracking_parent=tracking,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if cfg.tune.metric in EVAL_METRICS:
        from raydc.eval import run_eval
        from raydc.eval.reverse_kl import reverse_kl

        ckpt = result.checkpoint
        if ckpt is None:
            raise RuntimeError("the trial's training finished without a checkpoint")
        model_dir = export_model(ckpt.path, trial_dir / "model")
        if cfg.tune.metric == "val_reverse_kl":
            summary = reverse_kl(cfg, model_dir, trial_dir / "eval")
        else:
            summary = run_eval(cfg, model_dir, trial_dir / "eval")
        tune.report(
            {
                cfg.tune.metric: _eval_metric(summary, cfg.tune.metric),
                "checkpoint_path": ckpt.path,
                "final": True,
                "model_dir": model_dir,
            }
        )


# ----------------------------------------------------------------------------- the sweep


def _searcher(cfg: RaydcConfig):
    tc = cfg.tune
    if tc.search_alg != "optuna":
        return None  # random / grid: Tune's BasicVariantGenerator
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.run.seed))


def _scheduler(cfg: RaydcConfig):
    tc = cfg.tune
    if tc.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # One Tune result per train report: every log_every steps, plus the final one.
    reports = math.ceil(cfg.train.max_steps / cfg.train.log_every) + 1
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(reports, tc.grace_period),
        grace_period=tc.grace_period,
        reduction_factor=tc.reduction_factor,
    )


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) and not (
        isinstance(v, float) and not math.isfinite(v)
    )


def results_table(grid, cfg: RaydcConfig) -> list[dict]:
    """One row per trial: id, status, the sampled values, the metric, steps, throughput."""
    metric = cfg.tune.metric
    rows = []
    for r in grid:
        m = r.metrics or {}
        row = {
            "trial_id": m.get("trial_id") or (r.path and Path(r.path).name),
            "status": "error" if r.error else ("completed" if m.get("final") else "stopped early"),
            **{k: (r.config or {}).get(k) for k in cfg.tune.space},
            metric: m.get(metric),
            "step": m.get("step"),
            "iterations": m.get("training_iteration"),
            "tokens_per_s": m.get("tokens_per_s"),
            "loss": m.get("loss"),
            "checkpoint_path": m.get("checkpoint_path"),
            "path": r.path,
        }
        if m.get("invalid_config"):
            row["status"] = "invalid config"
        rows.append(row)
    rows.sort(
        key=lambda x: (
            x[metric] is None or not _scalar(x[metric]),
            (x[metric] if cfg.tune.resolved_mode == "min" else -x[metric])
            if _scalar(x[metric])
            else 0,
        )
    )
    return rows


def format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cols = [c for c in columns if any(r.get(c) is not None for r in rows)]
    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(cell(r.get(c)).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def run_tune(
    cfg: RaydcConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike, after_step=None
) -> dict:
    """Run (or resume) the sweep over ``cfg.tune.space`` on the scored rows in
    ``data_dir``; write ``results.csv`` and the best trial's model to ``out_dir/model``.
    ``after_step(StepInfo)`` runs in every trial's workers after each step (tests inject
    faults with it)."""
    import ray

    from raydc.train.data import check_student, read_manifest
    from raydc.train.trainer import export_model

    t0 = time.time()
    check_space(cfg)
    tc = cfg.tune
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if tc.metric in EVAL_METRICS:
        # The eval metric arrives once, after training; the training reports lack it.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # The student's identity, once for the sweep: every trial trains the same student.
    scored = roles(cfg).scored_student
    student_fp = check_student(read_manifest(data_dir), scored, data_dir)
    concurrent = max_concurrent(cfg, ray.cluster_resources())
    sweep = _sweep_run(cfg, out)
    try:
        parent = sweep.as_parent() if sweep else None
        tuner = _tuner(cfg, data_dir, out, student_fp, concurrent, after_step, parent)
        grid = tuner.fit()

        rows = results_table(grid, cfg)
        csv_path = out / "results.csv"
        _write_results(rows, cfg, csv_path)
        best = _best_row(rows, grid, cfg, csv_path)
    except BaseException:
        if sweep:
            sweep.finish("FAILED", children="FAILED")
        raise
    model_dir = export_model(best["checkpoint_path"], out / "model")
    best_result = next(r for r in grid if r.path == best["path"])
    metrics = {
        k: v
        for k, v in (best_result.metrics or {}).items()
        if _scalar(v) and k not in ("checkpoint_path", "model_dir")
    }
    summary = {
        "metric": tc.metric,
        "mode": tc.resolved_mode,
        "best_metric": best[tc.metric],
        "best_config": {k: best[k] for k in tc.space},
        "best_trial": best["trial_id"],
        "best_checkpoint": best["checkpoint_path"],
        "checkpoint": best["checkpoint_path"],  # what every model stage hands on (TrainedModel)
        "model_dir": model_dir,
        "results_csv": str(csv_path),
        "num_trials": len(rows),
        "num_completed": sum(r["status"] == "completed" for r in rows),
        "max_concurrent_trials": concurrent,
        "steps": metrics.get("step"),
        "metrics": metrics,
        "experiment_dir": str(out / EXPERIMENT),
        "seconds": time.time() - t0,
    }
    write_json(out / "best.json", summary)
    if sweep:
        sweep.files([csv_path], "")
        sweep.summary("best", summary)
        sweep.finish(children="KILLED")  # trials ASHA stopped never sent a final report
    return summary


def _sweep_run(cfg: RaydcConfig, out: Path):
    """The sweep's MLflow / W&B run (None without those trackers), under the job's run."""
    from raydc.infra.tracking import child_name, job_parent, run_spec

    parent = job_parent()
    spec = run_spec(cfg, child_name(out, parent), "sweep", parent)
    return spec.start() if spec else None


def _tuner(
    cfg: RaydcConfig,
    data_dir,
    out: Path,
    student_fp: str,
    concurrent: int,
    after_step,
    tracking=None,
):
    """The sweep's ``Tuner``: restored from ``out/sweep`` when a stopped sweep left one."""
    from ray import tune

    tc = cfg.tune
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=cfg,
            data_dir=str(Path(data_dir).resolve()),
            sweep_dir=str(out),
            student_fp=student_fp,
            after_step=after_step,
            tracking=tracking,
        ),
        {"cpu": tc.driver_cpus},
    )
    exp_dir = out / EXPERIMENT
    if tune.Tuner.can_restore(str(exp_dir)):
        print(f"[raydc] tune     resuming the sweep in {exp_dir}", flush=True)
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=tc.metric,
            mode=tc.resolved_mode,
            num_samples=tc.num_samples,
            search_alg=_searcher(cfg),
            scheduler=_scheduler(cfg),
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(out),
            failure_config=tune.FailureConfig(max_failures=tc.max_failures),
            verbose=1,
        ),
    )


def _write_results(rows: list[dict], cfg: RaydcConfig, csv_path: Path) -> None:
    """The results table to ``csv_path`` and, in short, to the console."""
    tc = cfg.tune
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    shown = ["trial_id", "status", *tc.space, tc.metric, "step", "tokens_per_s"]
    print(
        f"\n[raydc] tune results ({tc.metric}, {tc.resolved_mode}; {csv_path}):\n"
        + format_table(rows, shown),
        flush=True,
    )


def _best_row(rows: list[dict], grid, cfg: RaydcConfig, csv_path: Path) -> dict:
    """The best completed trial's row (``rows`` come best first); fails when none finished."""
    metric = cfg.tune.metric
    finished = [
        r
        for r in rows
        if r["status"] == "completed" and _scalar(r[metric]) and r.get("checkpoint_path")
    ]
    if not finished:
        errors = [str(r.error) for r in grid if r.error]
        raise RuntimeError(
            f"no trial of the sweep finished with a {metric}; errors: {errors[:3]}; see {csv_path}"
        )
    return finished[0]


# ----------------------------------------------------------------------------- the stage


def _check(cfg: RaydcConfig) -> None:
    check_model("train.student", cfg.train.student)
    check_space(cfg)
    if cfg.tune.metric != "val_nll":  # the trials run eval
        check_input("eval.path", cfg.eval.path)


def _reads(cfg: RaydcConfig, up: Upstream) -> dict:
    check_space(cfg)  # before the trials: a bad space never costs a sweep
    parts = {"tune": dataclasses.asdict(cfg.tune), **training_parts(cfg, up[data_stage(cfg)])}
    if cfg.tune.metric != "val_nll":  # the trials run eval
        parts["eval"] = dataclasses.asdict(cfg.eval)
        parts["eval_data"] = fingerprint_paths(cfg.eval.path)
        parts["teacher"] = fingerprint_paths(cfg.score.teacher)
    return parts


TUNE = Stage(
    "tune",
    help="Ray Tune search over the weighting (trials reuse the scores)",
    needs=lambda cfg: (data_stage(cfg),),
    enabled=lambda cfg: cfg.tune.enabled,
    check=_check,
    reads=_reads,
    run=lambda cfg, up, out: run_tune(cfg, str(up[data_stage(cfg)].out_dir), out),
    resumes=True,
    vouch=model_outputs,
)
