"""The DeepSpeed config and learning-rate schedule of a training run.

One builder for every machine: ZeRO stage 0-3 with optional optimizer / parameter CPU
offload, bf16 (or fp16) on GPUs and fp32 on CPUs (``precision: auto``), gradient
accumulation and clipping. Micro-batches are token-budgeted (their row count varies), so
``train_micro_batch_size_per_gpu`` is a nominal 1: DeepSpeed uses it only for logging.

The schedule is ours, not DeepSpeed's ``WarmupCosineLR`` (whose warmup has at least two
steps and starts at 0): linear warmup from lr / warmup_steps to lr, then cosine or linear
decay to ``min_lr_ratio * lr`` at ``max_steps``. It goes to DeepSpeed as a torch
``LambdaLR``, which the engine steps at each optimizer step and saves in its checkpoints.
"""

from __future__ import annotations

import math

from raydc.config import TrainConfig


def resolve_precision(cfg: TrainConfig, on_gpu: bool) -> str:
    """``auto`` -> bf16 on a GPU, fp32 on a CPU; explicit values pass through."""
    if cfg.precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return cfg.precision


def build_ds_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed config dict for ``deepspeed.initialize``."""
    precision = resolve_precision(cfg, on_gpu)
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if cfg.offload_optimizer:
        if cfg.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.offload_params:
        if cfg.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage = 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero_stage == 3:
        # Export gathers parameters itself (GatheredParameters), in the training dtype.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": world_size * cfg.grad_accum,
        "gradient_clipping": float(cfg.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # A client torch optimizer is fine under offload on CPU-only machines; on GPUs the
        # trainer passes DeepSpeedCPUAdam, which is what this flag would force.
        "zero_force_ds_cpu_optimizer": False,
    }
    return ds


def lr_lambda(cfg: TrainConfig):
    """step (0-based optimizer steps taken) -> multiplier of cfg.lr."""
    warm, total, floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, total - warm)
        progress = min(1.0, (step - warm) / span)
        if cfg.lr_schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * shape

    return f
