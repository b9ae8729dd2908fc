"""The tune arm's search: a small Ray Tune run over TUNE_SPACE (raydc's TuneConfig and
``raydc.tune.param_space``), each trial one arm's run scored by greedy accuracy on the
validation split (disjoint from the eval problems), trial seeds disjoint from the arms'."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

from bench.quality.run import TUNE_BASE, TUNE_SPACE
from raydc.config import RaydcConfig, TuneConfig
from raydc.infra.runtime import connect_ray
from raydc.method.weights import preset

TRIAL_SEED = 100_000


def tune_weights(job: dict, trials: int, out: Path, seed: int = 0) -> dict:
    """Ray Tune (random search, one CPU a trial, two at a time) over TUNE_SPACE; ``job`` is
    the arms' base job (``stages.base_job``) with its phases. Returns the chosen
    WeightConfig dict, every trial's fields and validation accuracy, and the wall time."""
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
        fields = {k.split(".", 1)[1]: v for k, v in config.items()}
        weights = preset(TUNE_BASE[0], **TUNE_BASE[1], **fields).to_dict()
        sample = sorted(fields.items())
        trial_job = dict(
            job, weights=weights, seed=TRIAL_SEED + zlib.crc32(str(sample).encode()) % 1000
        )
        recs = run_arm(
            {**trial_job, "eval_set": "val", "full_eval": False, "evals": [job["evals"][-1]]}
        )
        return {"val_accuracy": recs[-1]["greedy"]["accuracy"]}

    connect_ray(None, num_cpus=2, include_dashboard=False)
    try:
        tuner = tune.Tuner(
            tune.with_resources(trial, {"cpu": 1}),
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                num_samples=trials,
                metric="val_accuracy",
                mode="max",
                search_alg=BasicVariantGenerator(random_state=seed),
            ),
            run_config=tune.RunConfig(storage_path=str(out.resolve()), name="tune", verbose=0),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    rows = []
    for res in grid:
        fields = {k.split(".", 1)[1]: v for k, v in res.config.items()}
        rows.append({**fields, "val_accuracy": (res.metrics or {}).get("val_accuracy")})
    ok = [r for r in rows if r["val_accuracy"] is not None]
    best = max(ok, key=lambda r: r["val_accuracy"])
    fields = {k: v for k, v in best.items() if k != "val_accuracy"}
    return {
        "chosen_fields": fields,
        "chosen": preset(TUNE_BASE[0], **TUNE_BASE[1], **fields).to_dict(),
        "trials": rows,
        "wall_s": time.time() - t0,
    }
