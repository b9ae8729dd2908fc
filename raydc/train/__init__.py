"""Weighted distillation on Ray Train + DeepSpeed (see docs/training.md).

``run_train(cfg, scored_dir, out_dir)`` trains from scored Parquet and exports the model;
``build_trainer(...)`` returns the ``TorchTrainer`` (Ray Tune's per-trial driver uses it).
Importing this package starts nothing: Ray and DeepSpeed load when these are called.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raydc.config import roles
from raydc.infra.artifacts import StageResult, fingerprint_paths
from raydc.infra.models import check_model
from raydc.infra.stage import Stage, Upstream, model_outputs

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

    from raydc.config import RaydcConfig


def run_train(
    cfg: RaydcConfig,
    scored_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    after_step: Any = None,
) -> dict:
    from raydc.train.trainer import run_train as _run

    return _run(cfg, scored_dir, out_dir, after_step=after_step)


def build_trainer(
    cfg: RaydcConfig,
    scored_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    extra_callbacks: list | None = None,
    run_config_overrides: dict[str, Any] | None = None,
    loop_fn: Any = None,
    after_step: Any = None,
    student_fingerprint: str | None = None,
    tracking_name: str | None = None,
    tracking_parent: Any = None,
) -> TorchTrainer:
    from raydc.train.trainer import build_trainer as _build

    return _build(
        cfg,
        scored_dir,
        out_dir,
        extra_callbacks,
        run_config_overrides,
        loop_fn,
        after_step=after_step,
        student_fingerprint=student_fingerprint,
        tracking_name=tracking_name,
        tracking_parent=tracking_parent,
    )


# ----------------------------------------------------------------------------- the stage


def data_stage(cfg: RaydcConfig) -> str:
    """The stage whose rows train (and tune) read: select when it is on, else score."""
    return "select" if cfg.select.enabled else "score"


def training_parts(cfg: RaydcConfig, data: StageResult) -> dict:
    """What train and tune both read: the training config and weights, the data, the
    student they start from and the seed."""
    return {
        "train": dataclasses.asdict(cfg.train),
        "weights": cfg.weights.to_dict(),
        "data": data.fingerprint,
        "student": fingerprint_paths(roles(cfg).student),
        "seed": cfg.run.seed,
    }


def _run(cfg: RaydcConfig, up: Upstream, out: Path) -> dict:
    return run_train(cfg, str(up[data_stage(cfg)].out_dir), out)


TRAIN = Stage(
    "train",
    help="weighted distillation on Ray Train + DeepSpeed",
    needs=lambda cfg: (data_stage(cfg),),
    enabled=lambda cfg: not cfg.tune.enabled,
    check=lambda cfg: check_model("train.student", cfg.train.student),
    reads=lambda cfg, up: training_parts(cfg, up[data_stage(cfg)]),
    run=_run,
    resumes=True,
    vouch=model_outputs,
)

__all__ = ["TRAIN", "build_trainer", "data_stage", "run_train", "training_parts"]
