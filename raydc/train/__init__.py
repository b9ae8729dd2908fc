"""Weighted distillation on Ray Train + DeepSpeed (see docs/training.md).

``run_train(cfg, scored_dir, out_dir)`` trains from scored Parquet and exports the model;
``build_trainer(...)`` returns the ``TorchTrainer`` (Ray Tune's per-trial driver uses it).
Importing this package starts nothing: Ray and DeepSpeed load when these are called.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

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
    )


__all__ = ["build_trainer", "run_train"]
