"""The benchmark's fine-tuning loop, through raydc's loss and weights."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from raydc.loss import weighted_token_loss
from raydc.quality.traces import TraceSet, model_token_logprobs
from raydc.weights import WeightConfig, compute_weights, preset, weight_diagnostics


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


def train(
    model,
    ts: TraceSet,
    spec: TrainSpec,
    on_step: Callable[[int, object], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """AdamW on the weighted token loss; constant LR after a linear warmup, so the model
    after k steps of a longer run equals a k-step run (budgets nest). ``on_step(step,
    model)`` is called after each step (the benchmark evaluates there)."""
    cfg = spec.weights or preset("sft")
    g = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)

    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / max(1, spec.warmup_steps))
        if not spec.decay:
            return warm
        frac = min(1.0, s / max(1, spec.steps))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    n = len(ts)
    stats = {"loss": [], "w_mean": [], "ess_fraction": []}
    t0, tokens = time.time(), 0
    for step in range(1, spec.steps + 1):
        model.train()
        idx = torch.randint(0, n, (spec.batch_size,), generator=g)
        L = int(ts.lengths[idx].max())
        ids = ts.ids_BL[idx, :L]
        m = ts.loss_mask[idx, : L - 1]
        logp = model_token_logprobs(model, ids)  # [B, L - 1], carries gradient
        if cfg.transform == "none":
            w = None
        else:
            s_lp = logp.detach() if spec.student_ref == "current" else ts.student_lp[idx, : L - 1]
            w = compute_weights(s_lp, ts.teacher_lp[idx, : L - 1], m, cfg)
        loss = weighted_token_loss(-logp, w, m, cfg.normalization)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        sched.step()
        tokens += int(m.sum())
        if step % 10 == 0 or step == spec.steps:
            stats["loss"].append(float(loss.detach()))
            if w is not None:
                d = weight_diagnostics(w, m, cfg)
                stats["w_mean"].append(d["mean"])
                stats["ess_fraction"].append(d["ess_fraction"])
            if log and step % 100 == 0:
                log(f"  step {step}/{spec.steps} loss {float(loss.detach()):.4f}")
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
