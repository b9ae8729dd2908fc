"""The benchmark's fine-tuning loop: the trainer's step, in one process.

Batches are the trainer's ``MicroBatch`` (``raydc.train.batch.collate`` of right-padded
rows), and each optimizer step is ``raydc.train.step.Learner.step``: weights from
``micro_batch_weights``, loss tokens and denominators as the trainer reduces them, and
``raydc.method.loss.weighted_token_loss``. The optimizer and schedule are the trainer's too
(``raydc.train.loop.adamw``, ``raydc.train.ds_config.lr_lambda``). Only the engine
differs: ``LocalEngine`` does in one process what DeepSpeed does for the Learner (loss
scaling over gradient accumulation, backward, gradient clipping, the optimizer and
scheduler step). ``train_steps`` runs given micro-batches, so a test can feed it the ones
a ``raydc train`` worker took and compare (tests/integration/test_finetune.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from bench.quality.task import PAD
from bench.quality.traces import TraceSet, model_token_logprobs
from raydc.config import TrainConfig
from raydc.method.weights import WeightConfig, preset, weight_diagnostics
from raydc.train.batch import MicroBatch, collate
from raydc.train.ds_config import lr_lambda
from raydc.train.loop import adamw
from raydc.train.step import Learner, StepStats, no_reduce


@dataclass
class TrainSpec:
    """One fine-tuning run. ``weights`` None means the ``sft`` preset."""

    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 10
    weights: WeightConfig | None = None
    student_ref: str = "current"  # current | init (ts.student_lp)
    seed: int = 0
    grad_clip: float = 1.0
    decay: bool = False  # cosine decay to 10% after warmup (pre-training; arms keep it off)
    weight_warmup_steps: int = 0  # w = 1 for the first N steps (train.weight_warmup_steps)

    def train_config(self) -> TrainConfig:
        """The ``raydc train`` settings of this run (without ``decay``: a constant LR after
        the warmup)."""
        return TrainConfig(
            lr=self.lr,
            weight_decay=0.0,
            warmup_steps=self.warmup_steps,
            lr_schedule="constant",
            max_steps=self.steps,
            grad_accum=1,
            grad_clip=self.grad_clip,
            student_ref=self.student_ref,
            weight_warmup_steps=self.weight_warmup_steps,
            seed=self.seed,
        )


class LocalEngine:
    """What ``Learner`` needs of a DeepSpeed engine, for one process: forward to token
    log-probs of right-padded rows, a backward of the loss over ``grad_accum`` (DeepSpeed
    scales each micro-batch's loss so), and a step that acts on every ``grad_accum``-th
    call: clip the gradient norm (DeepSpeed's ``gradient_clipping``), step the optimizer
    and the scheduler."""

    def __init__(self, model, optimizer, scheduler, grad_clip: float, grad_accum: int = 1):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip, self.grad_accum = grad_clip, grad_accum
        self.grad_norm: float | None = None
        self.micro_steps = 0
        optimizer.zero_grad(set_to_none=True)

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None, with_entropy=False
    ):
        if position_ids is not None:
            raise ValueError("LocalEngine takes right-padded rows (collate's packed=False)")
        # [B, T - 1] with its graph (and the entropy, detached, for an entropy gate)
        return model_token_logprobs(self.module, input_ids, with_entropy=with_entropy)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum:
            return
        if self.grad_clip:
            params = self.module.parameters()
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self.grad_norm


def local_learner(
    model, tc: TrainConfig, wc: WeightConfig, lr_factor: Callable[[int], float] | None = None
) -> Learner:
    """The ``Learner`` of a one-worker ``raydc train`` in this process: the trainer's AdamW
    on the trainable parameters, its LR schedule (``lr_factor`` replaces it) and
    ``LocalEngine`` in DeepSpeed's place."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor or lr_lambda(tc))
    engine = LocalEngine(model, opt, sched, tc.grad_clip, tc.grad_accum)
    return Learner(engine, sched, tc, wc, world=1, all_reduce=no_reduce)


def train_steps(
    model,
    steps: Iterable[list[MicroBatch]],
    tc: TrainConfig,
    wc: WeightConfig,
    weights_at: Callable[[int], WeightConfig] | None = None,
    lr_scale_at: Callable[[int], float] | None = None,
) -> list[StepStats]:
    """``raydc train``'s optimizer steps on ``model`` in this process: each item of
    ``steps`` is one step's ``tc.grad_accum`` right-padded micro-batches, in the worker's
    order; the first ``tc.weight_warmup_steps`` steps weigh uniformly, as the worker's.
    ``weights_at(k)``: step k's weights where phases weigh differently (an offline phase,
    then on-policy rounds with the ``opd`` preset), one optimizer throughout; else ``wc``.
    ``lr_scale_at(k)``: a factor on step k's learning rate (the trainer's schedule's) where
    phases learn at different rates."""
    factor = None
    if lr_scale_at is not None:
        schedule = lr_lambda(tc)

        def factor(k: int) -> float:
            return schedule(k) * lr_scale_at(k)

    learner = local_learner(model, tc, wc, factor)
    out = []
    for k, mbs in enumerate(steps):
        if weights_at is not None:
            learner.wc = weights_at(k)
        model.train()
        out.append(learner.step(mbs, uniform=k < tc.weight_warmup_steps))
    return out


def _pretraining_lr(spec: TrainSpec) -> Callable[[int], float]:
    """``decay``'s schedule: the linear warmup times a cosine from 1 to 0.1 over the run."""

    def factor(s: int) -> float:
        warm = min(1.0, (s + 1) / max(1, spec.warmup_steps))
        frac = min(1.0, s / max(1, spec.steps))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    return factor


def train(
    model,
    ts: TraceSet,
    spec: TrainSpec,
    on_step: Callable[[int, object], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """AdamW on the weighted token loss; constant LR after a linear warmup, so the model
    after k steps of a longer run equals a k-step run (budgets nest). Each step is one
    micro-batch of ``batch_size`` rows drawn with replacement. ``on_step(step, model)`` is
    called after each step (the benchmark evaluates there)."""
    wc = spec.weights or preset("sft")
    g = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    learner = local_learner(
        model, spec.train_config(), wc, _pretraining_lr(spec) if spec.decay else None
    )
    block = ts.row_block()
    stats = {"loss": [], "w_mean": [], "ess_fraction": []}
    t0, tokens = time.time(), 0
    for step in range(1, spec.steps + 1):
        model.train()
        rows = torch.randint(0, len(ts), (spec.batch_size,), generator=g).tolist()
        mb = collate(block, rows, packed=False, pad_id=PAD)
        st = learner.step([mb], uniform=step <= spec.weight_warmup_steps)
        tokens += mb.loss_tokens
        if step % 10 == 0 or step == spec.steps:
            stats["loss"].append(st.loss)
            if wc.transform != "none":
                d = weight_diagnostics(st.weights[0], mb.loss_mask, wc)
                stats["w_mean"].append(d["mean"])
                stats["ess_fraction"].append(d["ess_fraction"])
            if log and step % 100 == 0:
                log(f"  step {step}/{spec.steps} loss {st.loss:.4f}")
        if on_step is not None:
            on_step(step, model)
    wall = time.time() - t0
    return {
        "steps": spec.steps,
        "wall_s": wall,
        "loss_tokens_per_s": tokens / max(wall, 1e-9),
        "final_loss": stats["loss"][-1] if stats["loss"] else float("nan"),
        "mean_weight": _mean(stats["w_mean"]),
        "mean_ess_fraction": _mean(stats["ess_fraction"]),
    }


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")
