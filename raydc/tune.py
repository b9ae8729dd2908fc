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

How a trial is judged: its configuration trains with ``tune.seeds`` training seeds
(``train.seed``, ``train.seed + 1``, ...: the same seeds in every trial), one after another,
and its score is the mean of the metric over them (``judge``; the per-seed values and their
sd are reported beside it). The eval metrics judge on ``tune.val_problems`` problems of
``tune.val_path`` (default: ``eval.path`` and ``eval.num_prompts``), and a sweep judged on
fewer than ``tune.min_val_problems`` validation problems is refused before any trial.

What ASHA (``tune.scheduler``) sees: with one seed, every training report of the trial (each
``train.log_every`` steps and the final one; ``val_nll`` is measured on the held-out prompts
at each), so it stops trials over the learning curve; an eval metric arrives once, after
training, so ASHA stops nothing. With several seeds, one report per finished seed holding the
running mean over the seeds done so far, so ASHA stops a trial whose first seeds already
place it in the worse share; only trials that finished every seed can be chosen. With
``tune.baseline`` (e.g. plain SFT), that point is the first trial, and the sweep keeps it
unless the best trial leads it by more than ``tune.baseline_margin`` standard errors
(``choose``).

Trials that fail are retried (``tune.max_failures``); a retried trial resumes from its
latest training checkpoint (with several seeds, the seeds it finished are not rerun). A
stopped sweep resumes: running the stage again restores the experiment
(``Tuner.restore``) and finishes the trials that had not.

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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from raydc.config import ConfigError, RaydcConfig, from_dict, roles
from raydc.infra.artifacts import fingerprint_paths, write_json
from raydc.infra.models import check_input, check_model
from raydc.infra.runtime import job_placement_groups, release_placement_groups
from raydc.infra.stage import Stage, Upstream, model_outputs
from raydc.method.weights import needs_entropy
from raydc.train import data_stage, training_parts

EXPERIMENT = "sweep"
JUDGED = "judged.json"  # a finished seed's run of a trial: its metric and checkpoint
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
    error names ``tune.space.<field>``. Each bound / value is tried alone on the base, and
    ``tune.baseline`` as a whole. With ``tune.min_val_problems``, an eval metric's
    problems are counted too (val_nll's, once the rows are scored: ``run_tune``)."""
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
    if tc.baseline:
        try:
            trial_config(cfg, tc.baseline)
        except ConfigError as e:
            raise ConfigError(f"tune.baseline: {tc.baseline} is an invalid config: {e}") from e
    if tc.metric == "val_nll" and cfg.train.val_share <= 0:
        raise ConfigError(
            "tune.metric=val_nll needs held-out traces: set train.val_share > 0 (e.g. 0.1)"
        )
    if tc.metric != "val_nll" and not cfg.eval.path:
        raise ConfigError(f"tune.metric={tc.metric}: needs eval.path (held-out prompts)")
    if tc.metric == "val_reverse_kl" and not cfg.score.teacher:
        raise ConfigError("tune.metric=val_reverse_kl: needs score.teacher to score samples")
    if tc.metric in EVAL_METRICS and tc.min_val_problems:
        check_val_size(cfg, eval_problems(cfg))


# ----------------------------------------------------------------------------- judging


def trial_seeds(cfg: RaydcConfig) -> list[int]:
    """The training seeds each trial runs (``tune.seeds`` of them from ``train.seed``): the
    same in every trial, so trials are compared on the same seeds."""
    return [cfg.train.seed + i for i in range(cfg.tune.seeds)]


def judge(values: Sequence[float], metric: str, mode: str) -> dict:
    """A trial's score from its per-seed values of ``metric``, in seed order: the mean (what
    the searcher, ASHA and the results table see), the sample sd over the seeds (None for
    one seed) and the values. A seed without a finite value (a diverged run) makes the
    score the worst for ``mode``, so the searcher learns to avoid the configuration."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError(f"judge: no per-seed value of {metric}")
    n = len(vals)
    finite = all(math.isfinite(v) for v in vals)
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if finite and n > 1 else None
    return {
        metric: mean if finite else _worst(mode),
        f"{metric}_sd": sd,
        f"{metric}_per_seed": vals,
        "seeds_done": n,
    }


def judged_eval(cfg: RaydcConfig) -> RaydcConfig:
    """``cfg`` with the eval section the eval metrics judge a trial by: the first
    ``tune.val_problems`` problems of ``tune.val_path``; without a val_path, of
    ``eval.path``, and without val_problems, all of val_path or ``eval.num_prompts`` of
    eval.path. The eval's other settings (grader, sampling, engine) are the eval stage's."""
    tc = cfg.tune
    if tc.val_problems is not None:
        count = tc.val_problems
    else:
        count = None if tc.val_path else cfg.eval.num_prompts
    ecfg = dataclasses.replace(cfg.eval, path=tc.val_path or cfg.eval.path, num_prompts=count)
    return dataclasses.replace(cfg, eval=ecfg)


def eval_problems(cfg: RaydcConfig) -> int:
    """How many problems an eval metric judges each trial on (``judged_eval``): rows of the
    file, before the eval drops any (no answer, a prompt too long for the engine)."""
    from raydc.engines.sampler import read_records

    ecfg = judged_eval(cfg).eval
    field = "tune.val_path" if cfg.tune.val_path else "eval.path"
    try:
        return len(read_records(ecfg.path)[: ecfg.num_prompts])
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{field}={ecfg.path!r}: cannot count its problems ({e})") from e


def held_out_prompts(keys: Iterable[str], share: float, seeds: Sequence[int]) -> int:
    """The fewest prompts ``val_nll`` is measured on over ``seeds``: the distinct prompt
    keys that ``train.val_share`` holds out under each training seed (the trainer's own
    split, ``raydc.train.data.is_val_key``)."""
    from raydc.train.data import is_val_key

    distinct = set(map(str, keys))
    return min(sum(is_val_key(k, share, seed) for k in distinct) for seed in seeds)


def scored_prompt_keys(data_dir: str | os.PathLike) -> list[str]:
    """The key each training row of ``data_dir`` is held out by: its ``prompt_id`` (a
    prompt's candidates stay together), else its ``row_id``, as the trainer reads them."""
    import pyarrow.parquet as pq

    from raydc.train.data import open_store

    store = open_store(data_dir)
    keys: list[str] = []
    for f in store.files:
        names = pq.read_schema(f).names
        key = "prompt_id" if "prompt_id" in names else "row_id"
        table = pq.read_table(f, columns=list(dict.fromkeys(["row_id", key])))
        rows = table.column("row_id").to_pylist()
        vals = table.column(key).to_pylist()
        keys += [str(k) for r, k in zip(rows, vals) if store.keep is None or r in store.keep]
    return keys


def check_val_size(cfg: RaydcConfig, problems: int) -> None:
    """Refuse a sweep whose trials would be judged on fewer than ``tune.min_val_problems``
    validation problems; the error says which fields set the count."""
    need = cfg.tune.min_val_problems
    if problems >= need:
        return
    if cfg.tune.metric == "val_nll":
        how = (
            f"val_nll's held-out prompts (train.val_share={cfg.train.val_share} of the "
            f"training prompts, the fewest over the trial seeds {trial_seeds(cfg)}); raise "
            "train.val_share or train on more prompts"
        )
    else:
        tc = cfg.tune
        path = "tune.val_path" if tc.val_path else "eval.path"
        if tc.val_problems is not None:
            where = f"{path}, at most tune.val_problems"
        else:
            where = "all of tune.val_path" if tc.val_path else "eval.path, at most eval.num_prompts"
        how = f"{tc.metric}'s problems ({where}); give more problems"
    raise ConfigError(
        f"tune.min_val_problems={need}: each trial would be judged on {problems} "
        f"validation problems, {how}, or lower tune.min_val_problems"
    )


def _values(raw: Any) -> list:
    spec = _spec(raw)
    return list(spec["values"]) if "values" in spec else []


def gating_fields(cfg: RaydcConfig) -> list[str]:
    """Where a trial's entropy gate that reads the *stored* student entropy comes from
    (``train.student_ref=init``; ``current`` computes it in the forward pass): the space
    keys ``weights.preset`` / ``weights.gate`` that can give one, or ``weights`` when the
    base weighting's own gate survives the space. Empty: no trial reads a stored entropy."""
    tc = cfg.tune
    refs = _values(tc.space["train.student_ref"]) if "train.student_ref" in tc.space else []
    if "init" not in (refs or [cfg.train.student_ref]):
        return []
    # Whether a trial is gated follows from its preset and its gate alone.
    presets = _values(tc.space["weights.preset"]) if "weights.preset" in tc.space else [None]
    gates = _values(tc.space["weights.gate"]) if "weights.gate" in tc.space else [None]
    keys: list[str] = []
    for name in presets:
        for gate in gates:
            sample = {"weights.preset": name, "weights.gate": gate}
            try:
                trial = trial_config(cfg, {k: v for k, v in sample.items() if v is not None})
            except ConfigError:
                continue  # check_space names it
            if not needs_entropy(trial.weights):
                continue
            key = (
                "weights.gate"
                if gate is not None
                else "weights.preset"
                if name is not None
                else "weights"
            )
            if key not in keys:
                keys.append(key)
    return keys


def check_entropy(cfg: RaydcConfig, data_dir: str | os.PathLike) -> None:
    """Before any trial: a space that can gate on the stored student entropy needs scores
    that hold it (``student_entropy``), or every such trial would fail at its first step."""
    import pyarrow.parquet as pq

    from raydc.train.data import open_store

    keys = gating_fields(cfg)
    if not keys:
        return
    if "student_entropy" in pq.read_schema(open_store(data_dir).files[0]).names:
        return
    where = "weights.gate" if keys[0] == "weights" else f"tune.space.{keys[0]}"
    raise ConfigError(
        f"{where}: gives trials an entropy gate, which under train.student_ref=init reads the "
        f"student entropy stored with the scores, and the scores in {str(data_dir)!r} have "
        "none: score again with score.entropy=on (auto stores it when the job's weighting "
        "or tune space can gate), or train the gated trials with train.student_ref=current"
    )


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
    """The per-trial driver: sampled values -> config -> TorchTrainer -> fit -> optionally
    eval, once per training seed (``tune.seeds``). Runs in a Tune trial actor with
    ``tune.driver_cpus``. ``tracking``: the sweep's MLflow / W&B run (a
    ``raydc.infra.tracking.Parent``), under which each training logs as a run named by the
    trial id (and the seed, with several)."""
    from ray import tune

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
    fit = dict(data_dir=data_dir, student_fp=student_fp, after_step=after_step, tracking=tracking)
    if cfg.tune.seeds == 1:
        _one_seed(cfg, trial_dir, trial_id, fit)
    else:
        _several_seeds(cfg, trial_dir, trial_id, fit)


def _one_seed(cfg: RaydcConfig, trial_dir: Path, trial_id: str, fit: dict) -> None:
    """One training seed: the trainer's reports reach Tune as they come (ASHA over the
    learning curve), then an eval metric's one report."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    result = _fit(cfg, trial_dir, trial_id, [TuneReportCallback()], **fit)
    if cfg.tune.metric in EVAL_METRICS:
        run = _judge_run(cfg, result, trial_dir)
        tune.report(
            {
                cfg.tune.metric: run["value"],
                "checkpoint_path": run["checkpoint_path"],
                "step": run["step"],
                "final": True,
                "model_dir": run["model_dir"],
                "val_problems": run["val_problems"],
            }
        )


def _several_seeds(cfg: RaydcConfig, trial_dir: Path, trial_id: str, fit: dict) -> None:
    """``tune.seeds`` trainings one after another, each under ``seed_<n>/``; after each, one
    Tune report with the running ``judge`` of the seeds done (ASHA over seeds). A retried
    trial reuses the seeds it finished (their ``judged.json``). The trial's model is its
    first seed's: what one run of the chosen configuration with ``train.seed`` trains."""
    from ray import tune

    tc = cfg.tune
    seeds = trial_seeds(cfg)
    runs: list[dict] = []
    for seed in seeds:
        run_dir = trial_dir / f"seed_{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        done = run_dir / JUDGED
        if done.is_file():
            run = json.loads(done.read_text())
        else:
            scfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
            result = _fit(scfg, run_dir, f"{trial_id}-seed{seed}", [], **fit)
            run = _judge_run(scfg, result, run_dir)
            write_json(done, run)
        runs.append(run)
        tune.report(
            {
                **judge([r["value"] for r in runs], tc.metric, tc.resolved_mode),
                "final": len(runs) == len(seeds),
                "checkpoint_path": runs[0]["checkpoint_path"],
                "model_dir": runs[0]["model_dir"],
                "step": run["step"],
                "steps_trained": sum(r["step"] or 0 for r in runs),
                "val_problems": min(
                    (r["val_problems"] for r in runs if r["val_problems"] is not None),
                    default=None,
                ),
            }
        )


def _fit(
    cfg: RaydcConfig,
    run_dir: Path,
    name: str,
    callbacks: list,
    data_dir: str,
    student_fp: str | None,
    after_step,
    tracking,
):
    """One training of a trial in ``run_dir``; its Ray Train result (raises its error)."""
    from raydc.train import build_trainer

    trainer = build_trainer(
        cfg,
        data_dir,
        run_dir,
        extra_callbacks=callbacks,
        # Same name and storage on a retry: Ray Train resumes from the latest checkpoint.
        run_config_overrides={"name": "train", "storage_path": str(run_dir / "ray")},
        student_fingerprint=student_fp,  # checked once for the sweep, not per trial
        after_step=after_step,
        tracking_name=name,
        tracking_parent=tracking,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def _judge_run(cfg: RaydcConfig, result, run_dir: Path) -> dict:
    """One training's value of ``tune.metric``: ``val_nll`` from its last report, an eval
    metric from the exported model on the judged problems (``judged_eval``)."""
    from raydc.train.trainer import export_model

    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("the trial's training finished without a checkpoint")
    metric = cfg.tune.metric
    m = result.metrics or {}
    run = {
        "seed": cfg.train.seed,
        "checkpoint_path": ckpt.path,
        "model_dir": None,
        "step": m.get("step"),
        "val_problems": None,
    }
    if metric not in EVAL_METRICS:
        value = m.get(metric)
        return {**run, "value": float(value) if isinstance(value, (int, float)) else math.nan}
    from raydc.eval import run_eval
    from raydc.eval.reverse_kl import reverse_kl

    model_dir = export_model(ckpt.path, run_dir / "model")
    judged = judged_eval(cfg)
    if metric == "val_reverse_kl":
        summary = reverse_kl(judged, model_dir, run_dir / "eval")
        problems = summary.get("samples")
    else:
        summary = run_eval(judged, model_dir, run_dir / "eval")
        problems = summary.get("prompts")
    return {
        **run,
        "model_dir": model_dir,
        "value": _eval_metric(summary, metric),
        "val_problems": problems,
    }


def paired_stderr(a: Sequence[float] | None, b: Sequence[float] | None) -> float | None:
    """The standard error of the mean per-seed difference ``a - b`` (two trials' values on
    the same seeds, in seed order); None below two seeds, where they say nothing of the
    noise."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def accuracy_stderr(p: float, problems: int, seeds: int) -> float:
    """The binomial standard error of the difference of two accuracies near ``p``, each the
    mean over ``seeds`` seeds of ``problems`` problems: sqrt(2 p (1 - p) / (problems seeds))."""
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(2.0 * p * (1.0 - p) / (problems * seeds))


def choose(
    finished: list[dict],
    metric: str,
    mode: str,
    baseline: dict,
    margin: float,
    problems: int | None = None,
) -> dict:
    """The chosen row of ``finished`` (completed trials, best first, each with its sampled
    values, ``metric`` and ``<metric>_per_seed``): the best, unless ``baseline`` (a value
    for each space key) is among them and the best leads it by no more than ``margin``
    standard errors of their difference; then the baseline. The standard error is the
    paired one over the seeds (``paired_stderr``), and for ``val_accuracy`` on ``problems``
    problems at least the binomial one (``accuracy_stderr``); with one seed and another
    metric there is none, and any lead counts. The row returned has ``baseline`` added:
    the baseline trial's id and metric, the best's lead, the standard errors and whether
    the baseline was kept (None without a baseline in ``finished``)."""
    best = finished[0]
    base = next(
        (r for r in finished if baseline and all(r.get(k) == v for k, v in baseline.items())),
        None,
    )
    if base is None:
        return {**best, "baseline": None}
    sign = 1.0 if mode == "max" else -1.0
    lead = sign * (best[metric] - base[metric])
    per_seed = base.get(f"{metric}_per_seed")
    paired = paired_stderr(best.get(f"{metric}_per_seed"), per_seed)
    binomial = None
    if metric == "val_accuracy" and problems:
        binomial = accuracy_stderr(base[metric], problems, len(per_seed or [0]))
    stderr = max((e for e in (paired, binomial) if e is not None), default=0.0)
    keep = best is base or lead <= margin * stderr
    info = {
        "trial_id": base["trial_id"],
        metric: base[metric],
        "lead_of_best": lead,
        "stderr": stderr,
        "paired_stderr": paired,
        "binomial_stderr": binomial,
        "kept": keep,
    }
    return {**(base if keep else best), "baseline": info}


# ----------------------------------------------------------------------------- the sweep


def _searcher(cfg: RaydcConfig):
    tc = cfg.tune
    # tune.baseline runs first, as one of the num_samples trials (a grid holds it already:
    # its values are values of the grid)
    points = [dict(tc.baseline)] if tc.baseline and tc.search_alg != "grid" else None
    if tc.search_alg == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(
            sampler=optuna.samplers.TPESampler(seed=cfg.run.seed), points_to_evaluate=points
        )
    if points:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(points_to_evaluate=points)
    return None  # random / grid: Tune's BasicVariantGenerator


def reports_per_trial(cfg: RaydcConfig) -> int:
    """The Tune results of a trial that runs to the end: ASHA's time axis
    (``training_iteration``). One seed: one per training report (each ``train.log_every``
    and ``train.checkpoint_every`` step before the last, and the final one), plus an eval
    metric's report after training. Several seeds: one per seed."""
    tc, train = cfg.tune, cfg.train
    if tc.seeds > 1:
        return tc.seeds
    every = (train.log_every, train.checkpoint_every)
    reports = sum(any(s % k == 0 for k in every) for s in range(1, train.max_steps)) + 1
    return reports + (tc.metric in EVAL_METRICS)


def _scheduler(cfg: RaydcConfig):
    tc = cfg.tune
    if tc.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t one past a whole trial's reports: a trial that reaches its last report is let
    # finish by itself (ASHA stops a trial at max_t, and a stopped trial's actor is killed
    # with its Train controller, whose worker group's placement group then outlives it)
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(reports_per_trial(cfg), tc.grace_period) + 1,
        grace_period=tc.grace_period,
        reduction_factor=tc.reduction_factor,
    )


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) and not (
        isinstance(v, float) and not math.isfinite(v)
    )


def results_table(grid, cfg: RaydcConfig) -> list[dict]:
    """One row per trial: id, status, the sampled values, the metric (with several seeds
    its mean, sd and per-seed values), the steps it trained, throughput."""
    metric = cfg.tune.metric
    rows = []
    for r in grid:
        m = r.metrics or {}
        row = {
            "trial_id": m.get("trial_id") or (r.path and Path(r.path).name),
            "status": "error" if r.error else ("completed" if m.get("final") else "stopped early"),
            **{k: (r.config or {}).get(k) for k in cfg.tune.space},
            metric: m.get(metric),
            f"{metric}_sd": m.get(f"{metric}_sd"),
            f"{metric}_per_seed": m.get(f"{metric}_per_seed"),
            "seeds_done": m.get("seeds_done"),
            "val_problems": m.get("val_problems"),
            "step": m.get("step"),
            "steps_trained": m.get("steps_trained", m.get("step")),
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
    check_entropy(cfg, data_dir)
    tc = cfg.tune
    if tc.metric in EVAL_METRICS:
        val_problems = eval_problems(cfg)
    else:  # val_nll: the held-out prompts of the scored rows, known once they are scored
        val_problems = held_out_prompts(
            scored_prompt_keys(data_dir), cfg.train.val_share, trial_seeds(cfg)
        )
    check_val_size(cfg, val_problems)
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
    groups_before = job_placement_groups()
    try:
        parent = sweep.as_parent() if sweep else None
        tuner = _tuner(cfg, data_dir, out, student_fp, concurrent, after_step, parent)
        try:
            grid = tuner.fit()
        finally:
            # The worker groups of trials that Tune stopped mid-fit (ASHA): see
            # release_placement_groups.
            left = release_placement_groups(groups_before)
            if left:
                print(
                    f"[raydc] tune     released {len(left)} placement group(s) left by "
                    "stopped trials",
                    flush=True,
                )

        rows = results_table(grid, cfg)
        csv_path = out / "results.csv"
        _write_results(rows, cfg, csv_path)
        best = _best_row(rows, grid, cfg, csv_path, val_problems)
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
        "baseline": best["baseline"],  # tune.baseline's trial, and whether it was kept
        "best_sd": best[f"{tc.metric}_sd"],
        "best_per_seed": best[f"{tc.metric}_per_seed"],
        "seeds": trial_seeds(cfg),
        "val_problems": val_problems,
        "best_checkpoint": best["checkpoint_path"],
        "checkpoint": best["checkpoint_path"],  # what every model stage hands on (TrainedModel)
        "model_dir": model_dir,
        "results_csv": str(csv_path),
        "num_trials": len(rows),
        "num_completed": sum(r["status"] == "completed" for r in rows),
        "max_concurrent_trials": concurrent,
        "steps": metrics.get("step"),
        # The sweep's cost: every training step of every trial and seed (ASHA's stops
        # included), beside its wall time
        "steps_trained": sum(r["steps_trained"] or 0 for r in rows),
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
    spread = [f"{tc.metric}_sd", "seeds_done"] if tc.seeds > 1 else []
    shown = ["trial_id", "status", *tc.space, tc.metric, *spread, "steps_trained", "tokens_per_s"]
    print(
        f"\n[raydc] tune results ({tc.metric}, {tc.resolved_mode}; {csv_path}):\n"
        + format_table(rows, shown),
        flush=True,
    )


def _best_row(rows: list[dict], grid, cfg: RaydcConfig, csv_path: Path, val_problems: int) -> dict:
    """The chosen completed trial (``choose``; ``rows`` come best first); fails when none
    finished."""
    tc = cfg.tune
    metric = tc.metric
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
    return choose(finished, metric, tc.resolved_mode, tc.baseline, tc.baseline_margin, val_problems)


# ----------------------------------------------------------------------------- the stage


def _check(cfg: RaydcConfig) -> None:
    check_model("train.student", cfg.train.student)
    if cfg.tune.metric != "val_nll":  # the trials run eval
        check_input("eval.path", cfg.eval.path)
        check_input("tune.val_path", cfg.tune.val_path)
    check_space(cfg)  # with tune.min_val_problems, counts the eval metrics' problems


def _reads(cfg: RaydcConfig, up: Upstream) -> dict:
    check_space(cfg)  # before the trials: a bad space never costs a sweep
    parts = {"tune": dataclasses.asdict(cfg.tune), **training_parts(cfg, up[data_stage(cfg)])}
    if cfg.tune.metric != "val_nll":  # the trials run eval
        parts["eval"] = dataclasses.asdict(cfg.eval)
        parts["eval_data"] = fingerprint_paths(cfg.eval.path)
        if cfg.tune.val_path:
            parts["val_data"] = fingerprint_paths(cfg.tune.val_path)
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
