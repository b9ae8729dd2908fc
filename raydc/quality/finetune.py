"""The benchmark's fine-tuning loop: the trainer's step, in one process.

Batches are the trainer's ``MicroBatch`` (``raydc.train.batch.collate`` of right-padded
rows), and each optimizer step is ``raydc.train.step.Learner.step``: weights from
``micro_batch_weights``, loss tokens and denominators as the trainer reduces them, and
``raydc.loss.weighted_token_loss``. Only the engine differs: ``LocalEngine`` does in one
process what DeepSpeed does for the Learner (backward, gradient clipping, the optimizer
and scheduler step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from raydc.quality.task import PAD
from raydc.quality.traces import TraceSet, model_token_logprobs
from raydc.train.batch import collate
from raydc.train.step import Learner, no_reduce
from raydc.weights import WeightConfig, preset, weight_diagnostics


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


class LocalEngine:
    """What ``Learner`` needs of a DeepSpeed engine, for one process: forward to token
    log-probs of right-padded rows, backward, and a step that clips the gradient norm
    (DeepSpeed's ``gradient_clipping``), steps the optimizer and the scheduler."""

    def __init__(self, model, optimizer, scheduler, grad_clip: float):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip = grad_clip
        self.grad_norm: float | None = None
        optimizer.zero_grad(set_to_none=True)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None):
        # Right-padded rows (collate's packed=False): position_ids is None.
        return model_token_logprobs(self.module, input_ids)  # [B, T - 1], with its graph

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip:
            params = self.module.parameters()
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        return self.grad_norm


def _learner(model, spec: TrainSpec, wc: WeightConfig) -> Learner:
    """AdamW, a linear warmup then constant LR (or cosine decay to 10%), and the Learner."""
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)

    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / max(1, spec.warmup_steps))
        if not spec.decay:
            return warm
        frac = min(1.0, s / max(1, spec.steps))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    engine = LocalEngine(model, opt, sched, spec.grad_clip)
    return Learner(engine, sched, spec, wc, world=1, all_reduce=no_reduce)


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
    learner = _learner(model, spec, wc)
    block = ts.row_block()
    stats = {"loss": [], "w_mean": [], "ess_fraction": []}
    t0, tokens = time.time(), 0
    for step in range(1, spec.steps + 1):
        model.train()
        rows = torch.randint(0, len(ts), (spec.batch_size,), generator=g).tolist()
        mb = collate(block, rows, packed=False, pad_id=PAD)
        st = learner.step([mb])
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
