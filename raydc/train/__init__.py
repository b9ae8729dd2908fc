"""Weighted distillation on Ray Train + DeepSpeed (see docs/training.md).

``run_train(cfg, scored_dir, out_dir)`` trains from scored Parquet and exports the model;
``build_trainer(...)`` returns the ``TorchTrainer`` (Ray Tune's per-trial driver uses it).
Importing this package starts nothing: Ray and DeepSpeed load when these are called.
"""

from __future__ import annotations


def run_train(cfg, scored_dir, out_dir) -> dict:
    from raydc.train.trainer import run_train as _run

    return _run(cfg, scored_dir, out_dir)


def build_trainer(cfg, scored_dir, out_dir, extra_callbacks=None, run_config_overrides=None):
    from raydc.train.trainer import build_trainer as _build

    return _build(cfg, scored_dir, out_dir, extra_callbacks, run_config_overrides)


__all__ = ["build_trainer", "run_train"]
