"""Per-token cross-entropy in chunks, and the weighted reductions of docs/method.md.

The student's log-prob of each teacher token needs logsumexp over the vocabulary. With a
151,936-token vocabulary (Qwen2/2.5/3) the full fp32 [tokens x vocab] logits of 8K tokens
take 4.6 GiB, and autograd keeps several such tensors. ``chunked_token_logprobs`` projects
hidden states to logits a chunk of tokens at a time, keeps only the per-token logsumexp,
and recomputes each chunk's logits in backward: peak extra memory is a few chunks. Asked
for it (``with_entropy``), the same pass also returns each position's predictive entropy
(``raydc.method.entropy``), detached, from the chunk's logits it already holds.

Global normalisers are arguments: a trainer all-reduces the denominators (loss tokens, sum
of weights) and passes them in, so ``self_norm`` holds over the global batch while this
module knows nothing of distribution. Pure torch.
"""

from __future__ import annotations

import torch

from raydc.method.entropy import entropy_of_logprobs
from raydc.method.weights import NORMALIZATIONS

DEFAULT_CHUNK = 1024
# Logits up to this size (fp32 [tokens x vocab]) are kept for the backward, not recomputed:
# 64 MiB is 8,192 tokens at vocab 2,048 but only 110 at vocab 151,936, where the recompute
# (and its memory bound) is what the chunking is for.
DEFAULT_KEEP_BYTES = 64 * 2**20


class _ChunkedTokenLogprob(torch.autograd.Function):
    """log p(target) = h . W[target] (+ bias) - logsumexp(h W^T (+ bias)), chunked; and
    the entropy of softmax(h W^T (+ bias)) when asked (empty otherwise; no gradient)."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, bias_V, targets_N, chunk_size, keep_bytes, with_ent):
        N, V = hidden_NH.shape[0], weight_VH.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=hidden_NH.device)
        lse = torch.empty(N, dtype=torch.float32, device=hidden_NH.device)
        ent = torch.empty(N if with_ent else 0, dtype=torch.float32, device=hidden_NH.device)
        # Small logits (a small vocabulary or few tokens) are kept as probabilities for the
        # backward instead of recomputed: the recompute is one more [N x H x V] matmul.
        keep = any(ctx.needs_input_grad[:3]) and N * V * 4 <= keep_bytes
        probs = torch.empty(N, V, dtype=torch.float32, device=hidden_NH.device) if keep else None
        for i in range(0, N, chunk_size):
            h = hidden_NH[i : i + chunk_size]
            logits = (h @ weight_VH.t()).float()
            if bias_V is not None:
                logits = logits + bias_V.float()
            lse_c = torch.logsumexp(logits, dim=-1)
            tgt = targets_N[i : i + chunk_size]
            out[i : i + chunk_size] = logits.gather(1, tgt[:, None]).squeeze(1) - lse_c
            lse[i : i + chunk_size] = lse_c
            if keep or with_ent:
                logp = logits.sub_(lse_c[:, None])  # in place: the chunk's log-probs
                p = torch.exp(logp, out=probs[i : i + chunk_size]) if keep else None
                if with_ent:
                    ent[i : i + chunk_size] = entropy_of_logprobs(logp, p)
        ctx.save_for_backward(hidden_NH, weight_VH, bias_V, targets_N, lse, probs)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_N, _grad_ent):
        hidden_NH, weight_VH, bias_V, targets_N, lse, probs = ctx.saved_tensors
        cs = ctx.chunk_size
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden_NH) if need_h else None
        grad_w = torch.zeros_like(weight_VH, dtype=torch.float32) if need_w else None
        grad_b = (
            torch.zeros_like(bias_V, dtype=torch.float32)
            if (need_b and bias_V is not None)
            else None
        )
        for i in range(0, hidden_NH.shape[0], cs):
            h = hidden_NH[i : i + cs]
            g = grad_N[i : i + cs].float()
            if probs is not None:
                dlogits = probs[i : i + cs] * (-g[:, None])
            else:
                logits = (h @ weight_VH.t()).float()
                if bias_V is not None:
                    logits = logits + bias_V.float()
                dlogits = torch.exp_(logits.sub_(lse[i : i + cs, None]))
                del logits
                dlogits.mul_(-g[:, None])
            # d log p(y) / d logits = onehot(y) - softmax; scaled by the incoming grad.
            dlogits.scatter_add_(1, targets_N[i : i + cs, None], g[:, None])
            if need_h:
                grad_h[i : i + cs] = (dlogits.to(weight_VH.dtype) @ weight_VH).to(grad_h.dtype)
            if need_w:
                grad_w.add_(dlogits.t() @ h.float())
            if grad_b is not None:
                grad_b.add_(dlogits.sum(dim=0))
            del dlogits
        if grad_w is not None:
            grad_w = grad_w.to(weight_VH.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias_V.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    keep_bytes: int = DEFAULT_KEEP_BYTES,
    with_entropy: bool = False,
):
    """log p(targets) [...] from hidden states [..., H] and the LM head [V, H], in chunks.

    The [tokens x vocab] logits exist one chunk at a time, in forward and in backward
    (recomputed), and are upcast to fp32 per chunk, so bf16 hidden states are fine. When
    all the fp32 probabilities fit in ``keep_bytes`` they are kept from the forward and the
    backward skips the recompute (0 always recomputes). ``with_entropy`` returns
    ``(logp, entropy)``: also each position's predictive entropy [...] in nats, fp32,
    detached, from the same chunks (one more elementwise pass over each chunk's logits).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    lead = hidden.shape[:-1]
    if targets.shape != lead:
        raise ValueError(f"targets has shape {tuple(targets.shape)}; hidden implies {tuple(lead)}")
    if hidden.shape[-1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden size {hidden.shape[-1]} does not match lm_head_weight "
            f"{tuple(lm_head_weight.shape)}"
        )
    h = hidden.reshape(-1, hidden.shape[-1])
    tgt = targets.reshape(-1).to(torch.long)
    out, ent = _ChunkedTokenLogprob.apply(
        h, lm_head_weight, lm_head_bias, tgt, chunk_size, int(keep_bytes), bool(with_entropy)
    )
    if with_entropy:
        return out.reshape(lead), ent.reshape(lead)
    return out.reshape(lead)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference (unchunked) log p(targets) from full logits [..., V]; fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.to(torch.long)[..., None]).squeeze(-1)


def loss_denominators(weights: torch.Tensor | None, loss_mask: torch.Tensor) -> dict:
    """The local sums a trainer all-reduces: loss tokens and sum of weights on them."""
    dtype = torch.float32 if weights is None else torch.promote_types(weights.dtype, torch.float32)
    m = loss_mask.to(dtype)
    w_sum = m.sum() if weights is None else (weights.detach().to(dtype) * m).sum()
    return {"tokens": m.sum(), "weight_sum": w_sum}


def weighted_token_loss(
    per_token_loss: torch.Tensor,
    weights: torch.Tensor | None,
    loss_mask: torch.Tensor,
    normalization: str = "self_norm",
    denominator: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar sum(w m l) / D over the batch.

    D is sum(m) for ``none`` and ``per_sequence`` (whose weights ``compute_weights``
    already rescaled to mean 1 per response) and sum(w m) for ``self_norm``. Pass
    ``denominator`` (the global D, all-reduced over ranks and micro-batches) to make the
    reduction global; by default D is the local batch's. weights=None means w = 1.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: must be one of {NORMALIZATIONS}")
    if per_token_loss.shape != loss_mask.shape:
        raise ValueError(
            f"per_token_loss has shape {tuple(per_token_loss.shape)} but loss_mask has "
            f"{tuple(loss_mask.shape)}"
        )
    if weights is not None and weights.shape != loss_mask.shape:
        raise ValueError(
            f"weights has shape {tuple(weights.shape)} but loss_mask has {tuple(loss_mask.shape)}"
        )
    m = loss_mask.to(per_token_loss.dtype)
    w = m if weights is None else weights.detach().to(per_token_loss.dtype) * m
    # where() and not a product: a masked position may hold inf/NaN loss (padding).
    num = torch.where(loss_mask.bool(), w * per_token_loss, torch.zeros_like(per_token_loss)).sum()
    if denominator is None:
        denominator = w.sum() if normalization == "self_norm" else m.sum()
    denominator = torch.as_tensor(denominator, dtype=num.dtype, device=num.device)
    # An empty batch (or all weights 0) contributes nothing, keeping the graph alive.
    return torch.where(denominator > 0, num / denominator.clamp(min=1e-30), num * 0.0)
