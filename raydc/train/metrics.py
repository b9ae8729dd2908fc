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
    if stats.baseline is not None:
        out["advantage_baseline"] = stats.baseline  # the last step's (weights.baseline)
    return out


def optimizer_state_bytes(optimizer, model: torch.nn.Module) -> int:
    """Bytes the optimizer holds beyond the model's own weights, on this rank: Adam's
    moments (and step counters) and the fp32 master copies ZeRO keeps of its partition
    (the inner torch optimizer's parameters when they are not the model's), each storage
    once. ``optimizer``: a DeepSpeed engine's (a ZeRO wrapper around the torch optimizer)
    or a torch optimizer."""
    inner = optimizer
    while getattr(inner, "optimizer", None) is not None and inner.optimizer is not inner:
        inner = inner.optimizer
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {
        p.ds_tensor.untyped_storage().data_ptr()
        for p in model.parameters()
        if getattr(p, "ds_tensor", None) is not None
    }
    tensors = [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t)]
    tensors += [p for g in inner.param_groups for p in g["params"]]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or key in own or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


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
