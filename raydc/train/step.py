"""One optimizer step of weighted distillation, on any DeepSpeed engine: no Ray here.

Per optimizer step a rank takes ``grad_accum`` micro-batches, computes their weights
(``micro_batch_weights``: per row, from the stored student log-probs or the live forward,
detached), sums its loss tokens and weights (``raydc.method.loss.loss_denominators``) and
all-reduces them, so the loss is normalised over the *global* batch: every rank and every
micro-batch of the step. The all-reduce is an argument (``AllReduce``), so the same code
runs in a Ray Train worker (torch.distributed) and in one process (the identity).

Gradient scale: DeepSpeed divides each micro-batch loss by ``grad_accum`` and averages
gradients over the ``world`` ranks, so the gradient it steps with is
``1 / (world * grad_accum) * sum grad(local_loss)``. Each micro-batch's local loss is
``sum(w m l) / D_global * world * grad_accum``; the sum of their gradients then equals the
gradient of the global loss ``sum_all(w m l) / D_global``, whatever the number of workers
or accumulation steps (tests/integration/test_train.py checks 1 vs 2 workers).

Entropy gates (``raydc.method.weights.needs_entropy``) read the student's per-token
entropy: with ``student_ref=current`` from the training forward itself (the chunked head
computes it with the log-probs), otherwise from the micro-batch's optional
``student_entropy`` column.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from raydc.method.loss import loss_denominators, weighted_token_loss
from raydc.method.weights import (
    WeightConfig,
    WeightConfigError,
    advantage_sum,
    compute_weights,
    loss_tokens,
    needs_entropy,
    needs_sampling,
)
from raydc.train.batch import MicroBatch

# all_reduce(values, op) -> reduced values, op one of "sum" | "min" | "max"
AllReduce = Callable[[Sequence[float], str], list]


def no_reduce(values: Sequence[float], op: str = "sum") -> list:
    """The all-reduce of a world of one."""
    return [float(v) for v in values]


def micro_batch_weights(
    mb: MicroBatch,
    wc: WeightConfig,
    live_logp: torch.Tensor | None = None,
    uniform: bool = False,
    live_entropy: torch.Tensor | None = None,
    baseline: float | None = None,
) -> torch.Tensor:
    """Detached weights [B, T-1] of ``mb``'s targets, computed per row.

    ``live_logp`` (the training forward's own log-probs) replaces the stored student
    log-probs (``student_ref=current``), and ``live_entropy`` (the same forward's entropy)
    the stored ``student_entropy``; ``uniform`` gives w = 1 (weight warmup). The
    ``advantage`` transform (on-policy distillation) reads both: the stored log-probs are
    then the sampling policy's, and the live ones give its importance ratio; ``baseline``
    is subtracted from its advantage under ``batch_mean`` (the step's, from
    ``micro_batch_advantage``; None: this micro-batch's own mean). Packed rows
    are weighed in their own [R, L-1] view (``RowLayout``), so granularities and
    per-sequence normalisation never see a neighbouring row.
    """
    m = mb.loss_mask
    if uniform:
        return m.to(torch.float32)
    s = live_logp.detach().float() if live_logp is not None else mb.student_logprobs
    h = live_entropy.detach().float() if live_entropy is not None else mb.student_entropy
    if h is None and needs_entropy(wc):
        raise WeightConfigError(
            f"weights.gate={wc.gate!r} needs the student's per-token entropy (student_entropy), "
            f"and rows {mb.row_ids[:3]} have none: train with train.student_ref=current (the "
            "training forward computes it) or from a scored store with a student_entropy column"
        )
    q = mb.student_logprobs if live_logp is not None and needs_sampling(wc) else None
    rows = _row_view(mb)
    w = compute_weights(
        rows(s),
        rows(mb.teacher_logprobs),
        rows(m, fill=False),
        wc,
        sentence_ids=rows(mb.sentence_ids),
        teacher_mask=rows(mb.teacher_mask, fill=True),
        student_entropy=rows(h),
        sampling_logprobs=rows(q),
        baseline=baseline,
    )
    return w if mb.layout is None else mb.layout.from_rows(w, m.shape)


def micro_batch_advantage(mb: MicroBatch, wc: WeightConfig) -> tuple[float, int]:
    """(sum of the advantage u, tokens) over ``mb``'s teacher-known loss tokens, from its
    stored (sampling) log-probs: the ``batch_mean`` baseline's share of this micro-batch."""
    if mb.teacher_logprobs is None:
        raise WeightConfigError(
            f"weights.baseline={wc.baseline!r} needs teacher log-probs, and rows "
            f"{mb.row_ids[:3]} have none"
        )
    rows = _row_view(mb)
    return advantage_sum(
        rows(mb.student_logprobs),
        rows(mb.teacher_logprobs),
        rows(mb.loss_mask, fill=False),
        wc,
        rows(mb.sentence_ids),
        rows(mb.teacher_mask, fill=True),
    )


def _row_view(mb: MicroBatch):
    """A [B, T-1] column -> the view weights are computed in: each packed row its own
    [R, L-1] row (``RowLayout.to_rows``; ``fill`` in the slots of no row), a padded
    micro-batch as it is; None stays None."""
    lay = mb.layout

    def rows(x: torch.Tensor | None, fill=0) -> torch.Tensor | None:
        return x if x is None or lay is None else lay.to_rows(x, fill=fill)

    return rows


@dataclass
class StepStats:
    loss: float  # this rank's share of the global loss (sums to it over ranks)
    tokens: int  # real tokens in this rank's micro-batches
    slots: int  # tensor slots (real + pad)
    loss_tokens: float
    seconds: float
    grad_norm: float
    lr: float
    micro_batches: list[MicroBatch]
    weights: list[torch.Tensor]
    baseline: float | None = None  # the advantage's baseline this step (batch_mean)


class Learner:
    """A DeepSpeed engine (around ``StudentLogprobs``) and the weighted-distillation step."""

    def __init__(self, engine, scheduler, tc, wc: WeightConfig, world: int, all_reduce: AllReduce):
        self.engine, self.scheduler = engine, scheduler
        self.tc, self.wc = tc, wc
        self.world, self.all_reduce = world, all_reduce

    def forward(self, mb: MicroBatch) -> torch.Tensor:
        return self.engine(mb.input_ids, mb.position_ids)

    def forward_live(self, mb: MicroBatch, with_entropy: bool):
        """(logp, entropy or None): the forward whose log-probs weigh ``student_ref=current``
        (the entropy only when asked: it costs one more pass over each logits chunk)."""
        if with_entropy:
            return self.engine(mb.input_ids, mb.position_ids, with_entropy=True)
        return self.forward(mb), None

    def step(self, mbs: list[MicroBatch], uniform: bool = False) -> StepStats:
        """One optimizer step over ``mbs`` (this rank's ``grad_accum`` micro-batches)."""
        t0 = time.perf_counter()
        G = len(mbs)
        live: list[torch.Tensor | None] = [None] * G
        live_h: list[torch.Tensor | None] = [None] * G
        current = self.tc.student_ref == "current" and not uniform
        if current:
            want_h = needs_entropy(self.wc)
            if G == 1:
                # kept with its graph for the backward (the entropy has none)
                live[0], live_h[0] = self.forward_live(mbs[0], want_h)
            else:
                # The denominator needs every micro-batch's weights before the first
                # backward: one extra no-grad forward per micro-batch (same parameters).
                with torch.no_grad():
                    pairs = [self.forward_live(mb, want_h) for mb in mbs]
                live, live_h = [lp for lp, _ in pairs], [h for _, h in pairs]
        # The advantage's baseline is the step's, over every micro-batch and rank; None
        # where no token has a teacher value (every weight is 0 there anyway).
        baseline, ubar = None, None
        if self.wc.baseline == "batch_mean" and not uniform:
            parts = [micro_batch_advantage(mb, self.wc) for mb in mbs]
            u_sum, n = self.all_reduce([sum(p[0] for p in parts), sum(p[1] for p in parts)], "sum")
            baseline = u_sum / n if n > 0 else None
            ubar = 0.0 if baseline is None else baseline
        weights = [
            micro_batch_weights(mb, self.wc, lp, uniform, h, ubar)
            for mb, lp, h in zip(mbs, live, live_h)
        ]
        # The tokens that count: the loss mask less what the mask transform removed.
        masks = [loss_tokens(w, mb.loss_mask, self.wc) for mb, w in zip(mbs, weights)]
        tok, wsum = 0.0, 0.0
        for m, w in zip(masks, weights):
            d = loss_denominators(w, m)
            tok += float(d["tokens"])
            wsum += float(d["weight_sum"])
        g_tok, g_wsum = self.all_reduce([tok, wsum], "sum")
        denom = g_wsum if self.wc.normalization == "self_norm" else g_tok
        scale = self.world * G
        lr = float(self.scheduler.get_last_lr()[0])
        loss_local = 0.0
        for i, (mb, w) in enumerate(zip(mbs, weights)):
            logp = live[i] if (G == 1 and live[i] is not None) else self.forward(mb)
            loss = weighted_token_loss(
                -logp.float(), w, masks[i], self.wc.normalization, denominator=denom
            )
            loss_local += float(loss.detach())
            self.engine.backward(loss * scale)
            self.engine.step()
        gn = self.engine.get_global_grad_norm()
        return StepStats(
            loss=loss_local,
            tokens=sum(mb.tokens for mb in mbs),
            slots=sum(mb.slots for mb in mbs),
            loss_tokens=tok,
            seconds=time.perf_counter() - t0,
            grad_norm=float(gn) if gn is not None else float("nan"),
            lr=lr,
            micro_batches=mbs,
            weights=weights,
            baseline=baseline,
        )

    def logprobs(self, mb: MicroBatch) -> torch.Tensor:
        """No-grad log-probs [B, T-1] in eval mode (validation, re-scoring)."""
        module = self.engine.module
        was = module.training
        module.eval()
        try:
            with torch.no_grad():
                return self.forward(mb).float()
        finally:
            module.train(was)
