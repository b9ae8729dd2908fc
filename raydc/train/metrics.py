"""What a training worker sums between reports, and the figures it adds from its own step.

The worker (``raydc.train.loop``) all-reduces these sums into the reported metrics; the
weight diagnostics come from this rank's micro-batches of the last step only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raydc.method.weights import WeightConfig, weight_diagnostics
from raydc.train.step import StepStats


@dataclass
class StepWindow:
    """This rank's sums over the optimizer steps since the last report."""

    steps: int = 0
    loss: float = 0.0  # this rank's shares of the global loss, summed over the steps
    tokens: int = 0
    slots: int = 0
    micro_batches: int = 0
    seconds: float = 0.0
    grad_norm: float = math.nan  # of the last step
    lr: float = 0.0  # of the last step
    last: StepStats | None = None
    rows_fingerprint: str = ""  # of the last step's rows

    def add(self, stats: StepStats, rows_fingerprint: str) -> None:
        self.steps += 1
        self.loss += stats.loss
        self.tokens += stats.tokens
        self.slots += stats.slots
        self.micro_batches += len(stats.micro_batches)
        self.seconds += stats.seconds
        self.grad_norm, self.lr = stats.grad_norm, stats.lr
        self.last = stats
        self.rows_fingerprint = rows_fingerprint


def weight_metrics(stats: StepStats, wc: WeightConfig) -> dict:
    """Weight diagnostics of a step's micro-batches (padded together), as flat metrics."""
    T = max(w.shape[1] for w in stats.weights)
    pad = torch.nn.functional.pad
    w_all = torch.cat([pad(w.cpu(), (0, T - w.shape[1])) for w in stats.weights])
    m_all = torch.cat(
        [
            pad(mb.loss_mask.cpu(), (0, T - w.shape[1]))
            for mb, w in zip(stats.micro_batches, stats.weights)
        ]
    )
    diag = weight_diagnostics(w_all, m_all, wc)
    out = {}
    for k in ("ess", "ess_fraction", "mean", "std", "min", "max", "corr_weight_length"):
        if k in diag:
            out[f"weight_{k}"] = diag[k]
    for k, v in (diag.get("clip_shares") or {}).items():
        out[f"weight_clip_{k}"] = v
    for k, v in (diag.get("mean_by_position") or {}).items():
        out[f"weight_pos_{k}"] = v
    if "histogram" in diag:
        out["weight_histogram"] = diag["histogram"]
    return out


def process_io() -> tuple[float, float]:
    """(peak RSS in MiB, bytes read by read calls: /proc/self/io rchar, NaN elsewhere)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        with open("/proc/self/io") as f:
            rchar = float(next(x for x in f if x.startswith("rchar")).split()[1])
    except (OSError, StopIteration):
        rchar = float("nan")
    return rss, rchar
