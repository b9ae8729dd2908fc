"""The tune arm's search: Ray Tune over TUNE_SPACE (raydc's TuneConfig and
``raydc.tune.param_space``), each trial trained with ``seeds`` seeds (the same seeds for
every trial, disjoint from the arms') and judged on its mean greedy accuracy on the
validation split (disjoint from the eval problems). TUNE_SFT is the first trial; ``choose``
keeps it unless a trial beats it by more than the noise of the comparison."""

from __future__ import annotations

import math
import time
from pathlib import Path

from bench.quality.run import TUNE_BASE, TUNE_SFT, TUNE_SPACE
from raydc.config import RaydcConfig, TuneConfig
from raydc.infra.runtime import connect_ray
from raydc.method.weights import preset

TRIAL_SEED = 100_000


def _fields(config: dict) -> dict:
    return {k.split(".", 1)[1]: v for k, v in config.items()}


def _sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def choose(rows: list[dict], baseline: dict, n_val: int) -> dict:
    """The chosen trial of ``rows`` (each with the space's fields, ``val_seeds`` (one
    accuracy per trial seed, the same seeds in every trial) and ``val_accuracy`` (their
    mean)): the best mean, unless its lead over the ``baseline`` trial is within the
    standard error of the difference, then the baseline. The standard error is the larger
    of the paired seeds' (sd of the per-seed differences / sqrt(seeds)) and the binomial
    one of two accuracies on ``n_val`` problems a seed."""
    ok = [r for r in rows if r.get("val_seeds")]
    best = max(ok, key=lambda r: r["val_accuracy"])
    base = next((r for r in ok if all(r[k] == v for k, v in baseline.items())), None)
    if base is None or best is base:
        return {**best, "margin": 0.0, "kept_baseline": best is base}
    k = min(len(best["val_seeds"]), len(base["val_seeds"]))
    diffs = [a - b for a, b in zip(best["val_seeds"][:k], base["val_seeds"][:k])]
    p = base["val_accuracy"]
    binomial = math.sqrt(2 * p * (1 - p) / (n_val * k))
    margin = max(_sd(diffs) / math.sqrt(k), binomial)
    lead = best["val_accuracy"] - base["val_accuracy"]
    keep = lead <= margin
    return {**(base if keep else best), "margin": margin, "kept_baseline": keep}


def tune_weights(job: dict, trials: int, seeds: int, n_val: int, out: Path, seed: int = 0) -> dict:
    """Ray Tune (random search after the TUNE_SFT point, one CPU a trial, two at a time) over
    TUNE_SPACE; ``job`` is the arms' base job (``steps.base_job``) with its phases. Returns
    the chosen WeightConfig dict and fields, every trial's fields and validation accuracies,
    the cost (trials x seeds x steps) and the wall time."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raydc.tune import param_space

    cfg = RaydcConfig()
    cfg.tune = TuneConfig(
        enabled=True,
        num_samples=trials,
        metric="val_accuracy",
        search_alg="random",
        scheduler="none",
        space=TUNE_SPACE,
    )
    cfg.tune.validate("tune")
    t0 = time.time()

    def trial(config: dict) -> dict:
        from bench.quality.jobs import run_arm, worker_init

        worker_init(1)
        weights = preset(TUNE_BASE[0], **TUNE_BASE[1], **_fields(config)).to_dict()
        accs = []
        for s in range(seeds):
            recs = run_arm(
                dict(
                    job,
                    weights=weights,
                    seed=TRIAL_SEED + s,
                    eval_set="val",
                    full_eval=False,
                    evals=[job["evals"][-1]],
                )
            )
            accs.append(recs[-1]["greedy"]["accuracy"])
        return {"val_accuracy": sum(accs) / len(accs), "val_seeds": accs}

    connect_ray(None, num_cpus=2, include_dashboard=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(trial, {"cpu": 1}),
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                num_samples=trials,
                metric="val_accuracy",
                mode="max",
                search_alg=BasicVariantGenerator(
                    points_to_evaluate=[dict(TUNE_SFT)], random_state=seed
                ),
            ),
            run_config=tune.RunConfig(storage_path=str(out.resolve()), name="tune", verbose=0),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    rows = []
    for res in grid:
        m = res.metrics or {}
        rows.append(
            {
                **_fields(res.config),
                "val_accuracy": m.get("val_accuracy"),
                "val_seeds": m.get("val_seeds"),
            }
        )
    picked = choose(rows, _fields(TUNE_SFT), n_val)
    fields = {k: picked[k] for k in _fields(TUNE_SFT)}
    return {
        "chosen_fields": fields,
        "chosen": preset(TUNE_BASE[0], **TUNE_BASE[1], **fields).to_dict(),
        "kept_baseline": picked["kept_baseline"],
        "margin": picked["margin"],
        "trials": rows,
        "seeds": seeds,
        "n_val": n_val,
        "cost_steps": len(rows) * seeds * job["evals"][-1],
        "wall_s": time.time() - t0,
    }
