"""DASD divergence-aware selection (arXiv 2601.09088, "Distribution-Aligned Sequence
Distillation").

Split each response into sentences; per sentence, delta = mean(teacher log-prob) -
mean(student log-prob) over its loss tokens (the log of the geometric-mean probability
ratio). A response scores the share of its sentences with delta > threshold: responses
rich in sentences the teacher finds far likelier than the student does teach the most.
With several candidate responses per prompt, keep the top-k by score. Pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from raydc.method.spans import sentence_spans, token_sentence_ids  # noqa: F401  (re-exported)
from raydc.method.weights import check_logprobs


def sentence_deltas(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    sentence_ids: torch.Tensor,
    loss_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta [B, S], present [B, S] bool): per-sentence mean(t) - mean(s) on loss tokens.

    ``present`` marks sentences with at least one loss token; S = max sentence id + 1.
    """
    m = loss_mask.bool()
    check_logprobs(student_logprobs, m, "student_logprobs")
    check_logprobs(teacher_logprobs, m, "teacher_logprobs")
    if sentence_ids.shape != m.shape:
        raise ValueError(
            f"sentence_ids has shape {tuple(sentence_ids.shape)} but loss_mask has {tuple(m.shape)}"
        )
    B = m.shape[0]
    sid = torch.where(m, sentence_ids.long(), torch.zeros_like(sentence_ids, dtype=torch.long))
    if (sid < 0).any():
        raise ValueError("sentence_ids must be >= 0 on loss tokens")
    S = int(sid.max().item()) + 1 if sid.numel() else 1
    diff = (teacher_logprobs.double() - student_logprobs.double()) * m
    sums = torch.zeros(B, S, dtype=torch.float64).scatter_add_(1, sid, diff)
    counts = torch.zeros(B, S, dtype=torch.float64).scatter_add_(1, sid, m.double())
    present = counts > 0
    return sums / counts.clamp(min=1), present


def divergence_scores(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    sentence_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    threshold: float = 0.0,
) -> torch.Tensor:
    """Score [B]: share of each response's sentences with delta > threshold (0 if none)."""
    delta, present = sentence_deltas(student_logprobs, teacher_logprobs, sentence_ids, loss_mask)
    hits = ((delta > threshold) & present).sum(dim=1).double()
    n = present.sum(dim=1).double()
    return torch.where(n > 0, hits / n.clamp(min=1), torch.zeros_like(n))


def select_top_k(prompt_ids: Sequence, scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k best-scoring responses of each prompt, in input order.

    Ties keep the earlier response. Prompts with fewer than k candidates keep them all.
    """
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(prompt_ids) != len(scores):
        raise ValueError(f"{len(prompt_ids)} prompt ids but {len(scores)} scores")
    groups: dict = {}
    for i, p in enumerate(prompt_ids):
        groups.setdefault(p, []).append(i)
    keep = []
    for idx in groups.values():
        ranked = sorted(idx, key=lambda i: (-float(scores[i]), i))
        keep.extend(ranked[:k])
    return sorted(keep)
