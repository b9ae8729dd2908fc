"""The student's predictive entropy per token: exact from logits, or bounded from top-k.

EAFT (arXiv 2601.02151) tells two kinds of low-probability teacher token apart by the
student's entropy ``H_t = -sum_v p(v | x, y_<t) log p(v | x, y_<t)`` at that position: high
entropy, the student "does not know yet" (learn); low entropy, it "confidently believes
something else" (a confident conflict, which SFT turns into forgetting). The weight
family's entropy gates (``raydc.method.weights``) read ``H_t`` in nats.

- Exact, from logits: ``token_entropy`` (reference) and ``chunked_entropy`` (a chunk of
  positions upcast to fp32 at a time). The training forward computes it in the same
  chunked pass as the token log-probs (``raydc.method.loss.chunked_token_logprobs(...,
  with_entropy=True)``), so ``student_ref: current`` gets it for the price of one more
  elementwise pass over each chunk's logits.
- From the top-k log-probs alone (what vLLM returns per prompt position): ``topk_entropy``
  gives the head's exact share, tight lower and upper bounds on the tail's share, and the
  midpoint as the point estimate (derivation in its docstring).

Pure torch; the entropies are detached (they feed weights, never the gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_CHUNK = 1024
# Top-k probabilities may sum a hair above 1 from the engine's own rounding; beyond this
# the input is not the top of one distribution.
TOPK_SUM_TOL = 1e-3
LOGPROB_POSITIVE_TOL = 1e-3


def entropy_of_logprobs(logp: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """-sum(p log p) over the last dimension of normalised log-probs ``logp`` [..., V]
    (``probs`` = exp(logp) when the caller has it already). Zero-probability entries
    (log p = -inf) contribute 0, not NaN."""
    p = torch.exp(logp) if probs is None else probs
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(logp))
    return -plogp.sum(dim=-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Reference (unchunked) entropy [...] in nats of softmax(logits [..., V]); fp32 (fp64
    for fp64 logits)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    with torch.no_grad():
        return entropy_of_logprobs(torch.log_softmax(logits.detach().to(dtype), dim=-1))


def chunked_entropy(logits: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Entropy [...] in nats of softmax(logits [..., V]), ``chunk_size`` positions at a
    time: bf16/fp16 logits are upcast to fp32 one chunk at a time, so no fp32 [T x V]
    copy exists beyond a chunk. Detached."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    lead = logits.shape[:-1]
    flat = logits.detach().reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for i in range(0, flat.shape[0], chunk_size):
            lg = flat[i : i + chunk_size].float()
            logp = lg - torch.logsumexp(lg, dim=-1, keepdim=True)  # a new chunk, not in place
            out[i : i + chunk_size] = entropy_of_logprobs(logp)
    return out.reshape(lead)


@dataclass(frozen=True)
class TopkEntropy:
    """The entropy [...] of distributions known by their top-k log-probs, in nats.

    ``lower <= H <= upper`` for every distribution over ``vocab_size`` tokens with these
    top-k probabilities; ``estimate`` is their midpoint; ``head`` = -sum_{i<=k} p_i log p_i
    (the known part); ``tail_mass`` = 1 - sum_{i<=k} p_i (clamped at 0)."""

    estimate: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    head: torch.Tensor
    tail_mass: torch.Tensor


def topk_entropy(topk_logprobs: torch.Tensor, vocab_size: int) -> TopkEntropy:
    """Entropy bounds and estimate [...] from the k largest log-probs [..., k] (any order)
    of distributions over ``vocab_size`` tokens.

    Let p_1 >= ... >= p_k be the top-k probabilities, H_k = -sum_i p_i log p_i their exact
    share of the entropy, m = 1 - sum_i p_i the tail mass, spread over n = V - k tail tokens
    q_j with sum_j q_j = m and 0 <= q_j <= p_k (none of them is in the top k). The full
    entropy is H = H_k + T with T = -sum_j q_j log q_j, and f(q) = -q log q is concave:

    - upper: by Jensen, T <= n f(m / n) = m log(n / m): the tail spread evenly. It is
      attained (m / n <= p_k for any true top-k), so no better upper bound exists.
    - lower: T is concave on the polytope {0 <= q_j <= p_k, sum q_j = m}, so its minimum
      is at a vertex: a = floor(m / p_k) tokens at the cap p_k, one at the rest
      r = m - a p_k, the others 0. T >= a f(p_k) + f(r), attained, so also tight. Two
      readings of it: it is >= m (-log p_k) (every tail token has -log q_j >= -log p_k),
      and it equals m (-log m) when m <= p_k (the whole tail on one token).

    So H_k + a f(p_k) + f(r) <= H <= H_k + m log((V - k) / m). ``estimate`` is the
    midpoint: knowing only the top k, it is the value whose worst-case error is smallest,
    (upper - lower) / 2. Computed in float64 (m = 1 - sum p_i cancels when the top k hold
    nearly all the mass); m is clamped at 0, entries of -inf are probability 0. Pass
    exactly the top k: an extra entry from outside them (vLLM adds the prompt token when it
    is not among the top k) lowers the cap p_k below the true one and voids the lower bound.
    """
    if topk_logprobs.dim() == 0 or topk_logprobs.shape[-1] == 0:
        raise ValueError("topk_logprobs must be [..., k] with k >= 1")
    k = topk_logprobs.shape[-1]
    if vocab_size < k:
        raise ValueError(f"vocab_size={vocab_size} is smaller than k={k}")
    lp = topk_logprobs.detach().to(torch.float64)
    if torch.isnan(lp).any():
        raise ValueError(f"topk_logprobs is NaN at {_where(torch.isnan(lp))}")
    if (lp > LOGPROB_POSITIVE_TOL).any():
        raise ValueError(
            f"topk_logprobs is positive at {_where(lp > LOGPROB_POSITIVE_TOL)}: "
            "log-probabilities must be <= 0"
        )
    lp = lp.clamp(max=0.0)
    p = torch.exp(lp)
    total = p.sum(dim=-1)
    if (total > 1 + TOPK_SUM_TOL).any():
        at = _where(total > 1 + TOPK_SUM_TOL, lead_only=True)
        raise ValueError(
            f"topk_logprobs' probabilities sum to more than 1 at {at} "
            f"({float(total.max()):.6g}): not the top k of one distribution"
        )
    head = entropy_of_logprobs(lp, p)
    m = (1.0 - total).clamp(min=0.0)
    n = vocab_size - k
    cap = p.min(dim=-1).values  # p_k
    zero = torch.zeros_like(m)
    if n == 0:
        upper_t = lower_t = zero
    else:
        upper_t = torch.where(m > 0, m * (math.log(n) - torch.log(m.clamp(min=1e-300))), zero)
        safe_cap = cap.clamp(min=1e-300)
        a = torch.where(cap > 0, torch.floor(m / safe_cap), zero).clamp(max=n)
        r = (m - a * cap).clamp(min=0.0)
        lower_t = -a * torch.special.xlogy(cap, cap) - torch.special.xlogy(r, r)
        lower_t = torch.minimum(lower_t, upper_t)  # only rounding can cross them
    out = torch.promote_types(topk_logprobs.dtype, torch.float32)
    lower, upper = head + lower_t, head + upper_t
    return TopkEntropy(
        estimate=((lower + upper) / 2).to(out),
        lower=lower.to(out),
        upper=upper.to(out),
        head=head.to(out),
        tail_mass=m.to(out),
    )


def _where(bad: torch.Tensor, lead_only: bool = False) -> str:
    """'position (i, j, ...)' of the first True of ``bad`` (the leading dims for
    ``lead_only``: ``bad`` is already reduced over k)."""
    idx = tuple(bad.nonzero()[0].tolist())
    return f"position {idx if lead_only else idx[:-1]}"
