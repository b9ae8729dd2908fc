"""The training stage on the driver: check the scores, plan the shards, build the trainer.

``build_trainer`` reads nothing of the scored rows but the folder's file list, schema,
manifest (refusing scores made with another student) and the Parquet footers and
``num_tokens`` column (``raydc.train.shard.build_index``: 4 bytes a row); it cuts the rows
into one contiguous range of equal tokens per rank and returns a Ray Train V2 ``TorchTrainer`` running
``raydc.train.loop.train_loop_per_worker``, each worker reading its own pieces. Ray Tune's
per-trial driver passes its ``TuneReportCallback`` as ``extra_callbacks`` and the student's
fingerprint, computed once for the sweep.

``run_train`` fits it and copies the exported model (``save_pretrained`` + tokenizer, in the
final checkpoint) to ``out_dir/model`` with ``export_model``, as a sweep does for each trial
it evaluates and for its best. Re-running with the same ``out_dir`` resumes from the latest
checkpoint under ``out_dir/ray`` (Ray Train restores a run by name and storage path).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raydc.config import RaydcConfig, roles
from raydc.infra import progress
from raydc.train.data import (
    ScoredDataError,
    check_schema,
    check_student,
    open_store,
    read_manifest,
)
from raydc.train.shard import assign_pieces, build_index

RUN_NAME = "train"


def student_path(cfg: RaydcConfig) -> str:
    path = roles(cfg).student
    if not path:
        raise ScoredDataError("train.student (or score.student) must name the student model folder")
    return path


def _scalar_metrics(metrics: dict) -> dict:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _metrics_callback_cls():
    from ray.train.v2.api.callback import UserCallback

    class MetricsLog(UserCallback):
        """On the driver side: rank 0's metrics -> out_dir/metrics.jsonl, TensorBoard
        (scalars, and the weight histogram the workers computed) and the MLflow / W&B run
        of ``track`` (``raydc.infra.tracking``: opened at the first report, given the plots
        and ended at the final one)."""

        def __init__(self, out_dir: str, tensorboard: bool = True, track=None):
            self.out_dir = out_dir
            self._writer = None
            self.tensorboard = tensorboard
            self.track = track  # a tracking.RunSpec, or None
            self._run = None

        def after_report(self, run_context, metrics, checkpoint) -> None:
            m = dict(metrics[0])
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(self.out_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m, default=str) + "\n")
            if self.tensorboard:
                self._tensorboard(m)
            if self.track is not None:
                self._track(m)

        def _track(self, m: dict) -> None:
            from raydc.infra.tracking import write_plots

            if self._run is None:
                self._run = self.track.start()
            step = int(m.get("step", 0))
            scalars = {f"train/{k}": v for k, v in _scalar_metrics(m).items() if k != "step"}
            self._run.log(scalars, step, m.get("weight_histogram"))
            if m.get("final"):
                jsonl = Path(self.out_dir) / "metrics.jsonl"
                plots = write_plots(jsonl, Path(self.out_dir) / "plots")
                self._run.files([*plots, jsonl], "plots")
                self._run.finish()
                self._run = None

        def _tensorboard(self, m: dict) -> None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency; a broken install only loses TB
                return
            if self._writer is None:
                self._writer = SummaryWriter(str(Path(self.out_dir) / "tensorboard"))
            step = int(m.get("step", 0))
            for k, v in _scalar_metrics(m).items():
                if k not in ("step",):
                    self._writer.add_scalar(f"train/{k}", v, step)
            hist = m.get("weight_histogram")
            if hist and sum(hist["counts"]) > 0:
                import numpy as np

                edges, counts = hist["edges"], hist["counts"]
                centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
                num = float(sum(counts))
                total = sum(c * x for c, x in zip(counts, centers))
                total_sq = sum(c * x * x for c, x in zip(counts, centers))
                nz = [i for i, c in enumerate(counts) if c]
                self._writer.add_histogram_raw(
                    "train/weights",
                    min=edges[nz[0]],
                    max=edges[nz[-1] + 1],
                    num=num,
                    sum=total,
                    sum_squares=total_sq,
                    bucket_limits=np.asarray(edges[1:]),
                    bucket_counts=np.asarray(counts),
                    global_step=step,
                )
            self._writer.flush()

    return MetricsLog


def _tracking_spec(cfg: RaydcConfig, out: Path, name: str | None, parent):
    """The run the MetricsLog callback opens (None without MLflow or W&B), named after
    ``out`` below the job's output folder (``train``, ``phases/<phase>/train``)."""
    from raydc.infra.tracking import child_name, job_parent, run_spec

    parent = parent or job_parent()
    return run_spec(cfg, name or child_name(out, parent), "train", parent)


def build_trainer(
    cfg: RaydcConfig,
    scored_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    extra_callbacks: list | None = None,
    run_config_overrides: dict | None = None,
    loop_fn=None,
    after_step: Callable | None = None,
    student_fingerprint: str | None = None,
    tracking_name: str | None = None,
    tracking_parent=None,
):
    """A Ray Train V2 ``TorchTrainer`` for weighted distillation from ``scored_dir``.

    ``loop_fn`` replaces ``train_loop_per_worker`` with another function of the same config
    (bench/train.py uses one that times raydc's step beside a plain step in one worker).
    ``after_step`` is called on every worker after each optimizer step with a
    ``raydc.train.loop.StepInfo`` (tests use it to kill a worker). ``student_fingerprint``
    skips re-fingerprinting the student (a sweep checks it once for all trials).
    ``tracking_name`` / ``tracking_parent``: the MLflow / W&B run of this training
    (``run.trackers``; default: named after ``out_dir`` under the job's run of this process,
    ``raydc.infra.tracking.job_parent``; a Tune trial passes its id and the sweep's run).
    """
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    from raydc.train.loop import WORKER_KEY, WorkerConfig, train_loop_per_worker

    tc = cfg.train
    student = student_path(cfg)
    store = open_store(scored_dir)
    # The scores' student: the one training starts from, unless a DASD phase scored its
    # traces under the initial student (train.scored_student)
    check_student(store.manifest, roles(cfg).scored_student, scored_dir, fp=student_fingerprint)
    columns = check_schema(store.files)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    groups = build_index(store.files, store.keep)
    worker = WorkerConfig(
        cfg=cfg,
        student=student,
        columns=columns,
        pieces=assign_pieces(groups, tc.num_workers),
        run_dir=str(out / "ray" / RUN_NAME),
        after_step=after_step,
    )
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = 1
    metrics_log = _metrics_callback_cls()(
        str(out),
        tensorboard="tensorboard" in cfg.run.trackers,
        track=_tracking_spec(cfg, out, tracking_name, tracking_parent),
    )
    run_kwargs: dict[str, Any] = dict(
        name=RUN_NAME,
        storage_path=str(out / "ray"),
        failure_config=FailureConfig(max_failures=tc.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
        callbacks=[metrics_log] + list(extra_callbacks or []),
    )
    run_kwargs.update(run_config_overrides or {})
    return TorchTrainer(
        loop_fn or train_loop_per_worker,
        train_loop_config={WORKER_KEY: worker},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources
        ),
        run_config=RayRunConfig(**run_kwargs),
    )


def export_model(checkpoint, dest: str | os.PathLike) -> str:
    """Copy the exported model of a final checkpoint (``model/``: ``save_pretrained`` +
    tokenizer) to ``dest``, replacing what is there, and a LoRA run's adapter (``adapter/``,
    PEFT's ``save_pretrained``) beside it (``dest``'s sibling ``adapter``). ``checkpoint``: a
    Ray Train ``Checkpoint`` or its path."""
    from ray.train import Checkpoint

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = Checkpoint(checkpoint)
    dest = Path(dest)
    with checkpoint.as_directory() as d:
        src = Path(d) / "model"
        if not src.is_dir():
            raise RuntimeError(f"the final checkpoint {checkpoint.path} holds no exported model")
        pairs = [(src, dest)]
        adapter = dest.parent / "adapter"
        if (Path(d) / "adapter").is_dir():
            pairs.append((Path(d) / "adapter", adapter))
        elif (adapter / "adapter_config.json").exists():  # an earlier LoRA run's: stale
            shutil.rmtree(adapter)
        for a, b in pairs:
            if b.exists():
                shutil.rmtree(b)
            shutil.copytree(a, b)
    return str(dest)


def run_train(
    cfg: RaydcConfig,
    scored_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    after_step: Callable | None = None,
    progress_every_s: float | None = None,
) -> dict:
    """Train from scored Parquet; return a summary (final metrics, checkpoint, model dir).
    ``after_step``: see ``build_trainer``. Meanwhile the console shows the reported steps
    (step / total, loss, tokens/s, ETA): a bar on a terminal, else a line at most every
    ``progress_every_s`` seconds (default ``raydc.infra.progress.PROGRESS_EVERY_S``)."""
    t0 = time.time()
    manifest = read_manifest(scored_dir)
    trainer = build_trainer(cfg, scored_dir, out_dir, after_step=after_step)
    every = progress.PROGRESS_EVERY_S if progress_every_s is None else progress_every_s
    shown = progress.Progress("train", total=cfg.train.max_steps, every_s=every)
    with progress.follow_training(Path(out_dir) / "metrics.jsonl", shown):
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    out = Path(out_dir).resolve()
    ckpt = result.checkpoint
    if ckpt is None:
        raise RuntimeError("training finished without a checkpoint")
    model_dir = export_model(ckpt, out / "model")

    metrics = {
        k: v
        for k, v in (result.metrics or {}).items()
        if k not in ("weight_histogram", "shard_rows_per_rank", "shard_tokens_per_rank")
    }
    raw = result.metrics or {}
    summary = {
        "rows_in": manifest.rows,
        "shards": {
            "rows_per_rank": raw.get("shard_rows_per_rank"),
            "tokens_per_rank": raw.get("shard_tokens_per_rank"),
        },
        "steps": metrics.get("step"),
        "metrics": metrics,
        "checkpoint": ckpt.path,
        "model_dir": model_dir,
        "adapter_dir": str(out / "adapter") if cfg.train.lora.enabled else None,
        "metrics_path": str(out / "metrics.jsonl"),
        "tensorboard_dir": str(out / "tensorboard") if "tensorboard" in cfg.run.trackers else None,
        "seconds": time.time() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
