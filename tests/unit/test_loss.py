"""raydc.method.loss: chunked CE against plain CE, the reductions, global denominators."""

import pytest
import torch
import torch.nn.functional as F

from raydc.method.loss import (
    chunked_token_logprobs,
    loss_denominators,
    token_logprobs,
    weighted_token_loss,
)
from raydc.method.weights import compute_weights, preset

torch.manual_seed(0)
B, T, H, V = 3, 7, 16, 50


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[:, 0] = False
    teacher = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    return hidden, weight, targets, mask, teacher


@pytest.mark.parametrize("chunk", [1, 4, 5, 1024])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("keep_bytes", [0, 2**30], ids=["recompute", "kept"])
def test_chunked_equals_plain_values_and_grads(chunk, bias, keep_bytes):
    hidden, weight, targets, mask, _ = batch()
    b = torch.randn(V, dtype=torch.float64) if bias else None
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b1 = b.clone().requires_grad_() if bias else None
    logits = h1 @ w1.t() + (b1 if bias else 0)
    ref = token_logprobs(logits, targets).double()
    # token_logprobs upcasts to fp32; compare against an fp64 reference too
    ref64 = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    g = torch.randn(B, T, dtype=torch.float64)
    (ref64 * g).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b2 = b.clone().requires_grad_() if bias else None
    got = chunked_token_logprobs(
        h2, w2, targets, lm_head_bias=b2, chunk_size=chunk, keep_bytes=keep_bytes
    )
    assert got.shape == (B, T)
    assert torch.allclose(got.double(), ref64, atol=1e-5)
    assert torch.allclose(ref, ref64, atol=1e-5)
    (got.double() * g).sum().backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)
    assert torch.allclose(w1.grad, w2.grad, atol=1e-5)
    if bias:
        assert torch.allclose(b1.grad, b2.grad, atol=1e-5)


def test_chunked_bf16_hidden_is_close():
    hidden, weight, targets, _, _ = batch()
    ref = token_logprobs(hidden @ weight.t(), targets)
    got = chunked_token_logprobs(hidden.bfloat16(), weight.bfloat16(), targets, chunk_size=3)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref.float(), atol=0.1)


def test_sft_equals_plain_mean_cross_entropy():
    hidden, weight, targets, mask, teacher = batch()
    logits = hidden @ weight.t()
    lp = token_logprobs(logits, targets).double()
    w = compute_weights(lp, teacher, mask, preset("sft"))
    loss = weighted_token_loss(-lp, w, mask, "none")
    ref = F.cross_entropy(logits[mask], targets[mask])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    # and with weights=None
    assert weighted_token_loss(-lp, None, mask, "none").item() == pytest.approx(
        ref.item(), abs=1e-6
    )


def test_dft_equals_trl_formula():
    hidden, weight, targets, mask, teacher = batch()
    h = hidden.clone().requires_grad_()
    lp = token_logprobs(h @ weight.t(), targets).double()
    w = compute_weights(lp, teacher, mask, preset("dft"))
    ours = weighted_token_loss(-lp, w, mask, "none")
    # TRL's loss_type="dft": -(log p * p.detach()) summed over loss tokens / num loss tokens
    trl = -(lp * lp.detach().exp())[mask].sum() / mask.sum()
    assert ours.item() == pytest.approx(trl.item(), abs=1e-9)
    g1 = torch.autograd.grad(ours, h, retain_graph=True)[0]
    g2 = torch.autograd.grad(trl, h)[0]
    assert torch.allclose(g1, g2, atol=1e-9)


@pytest.mark.parametrize("name", ["discord", "das_token"])
def test_self_norm_invariant_to_scale_c(name):
    hidden, weight, targets, mask, teacher = batch()
    lp = token_logprobs(hidden @ weight.t(), targets).double()
    losses = []
    for c in (0.5, 2.0, 7.0):
        w = compute_weights(lp, teacher, mask, preset(name, c=c))
        losses.append(weighted_token_loss(-lp, w, mask, "self_norm").item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-9)
    assert losses[1] == pytest.approx(losses[2], rel=1e-9)


def test_weights_carry_no_gradient():
    hidden, weight, targets, mask, teacher = batch()
    h = hidden.clone().requires_grad_()
    lp = token_logprobs(h @ weight.t(), targets).double()
    w = compute_weights(lp, teacher, mask, preset("discord"))
    loss = weighted_token_loss(-lp, w, mask, "self_norm")
    g = torch.autograd.grad(loss, h)[0]
    # the same gradient with the weights as constants
    lp2 = token_logprobs(h @ weight.t(), targets).double()
    wc = w.clone()
    ref = (wc * -lp2)[mask].sum() / wc[mask].sum()
    assert torch.allclose(g, torch.autograd.grad(ref, h)[0], atol=1e-12)


@pytest.mark.parametrize("norm", ["none", "self_norm", "per_sequence"])
def test_masked_tokens_change_nothing(norm):
    hidden, weight, targets, mask, teacher = batch()
    lp = token_logprobs(hidden @ weight.t(), targets).double()
    cfg = preset("discord", normalization=norm)
    w = compute_weights(lp, teacher, mask, cfg)
    base = weighted_token_loss(-lp, w, mask, norm)
    # change everything off the mask, including to inf/NaN
    lp2, t2 = lp.clone(), teacher.clone()
    lp2[~mask] = float("nan")
    t2[~mask] = -5.0
    per_tok = -lp2
    per_tok[~mask] = float("inf")
    w2 = compute_weights(lp2, t2, mask, cfg)
    got = weighted_token_loss(per_tok, w2, mask, norm)
    assert got.item() == pytest.approx(base.item(), rel=1e-12)


@pytest.mark.parametrize("name", ["sft", "discord", "iw_seq", "dft", "tis"])
def test_two_ranks_with_global_denominator_equal_global_loss(name):
    hidden, weight, targets, mask, teacher = batch(seed=3)
    h = hidden.clone().requires_grad_()
    lp = token_logprobs(h @ weight.t(), targets).double()
    cfg = preset(name)
    w = compute_weights(lp, teacher, mask, cfg)
    full = weighted_token_loss(-lp, w, mask, cfg.normalization)
    g_full = torch.autograd.grad(full, h, retain_graph=True)[0]

    # two "ranks": rows [0] and [1, 2]; all-reduce the denominators by hand
    parts = [slice(0, 1), slice(1, 3)]
    dens = [loss_denominators(w[p], mask[p]) for p in parts]
    key = "weight_sum" if cfg.normalization == "self_norm" else "tokens"
    global_den = sum(d[key] for d in dens)
    local = [
        weighted_token_loss(-lp[p], w[p], mask[p], cfg.normalization, denominator=global_den)
        for p in parts
    ]
    assert (local[0] + local[1]).item() == pytest.approx(full.item(), rel=1e-12)
    g_split = torch.autograd.grad(local[0] + local[1], h)[0]
    assert torch.allclose(g_split, g_full, atol=1e-12)
    # without the global denominator, the mean of local losses is *not* the global loss
    if cfg.normalization != "none" or name == "sft":
        naive = (
            sum(weighted_token_loss(-lp[p], w[p], mask[p], cfg.normalization) for p in parts) / 2
        )
        assert naive.item() != pytest.approx(full.item(), rel=1e-6)


def test_empty_batch_gives_zero_with_graph():
    x = torch.randn(2, 3, requires_grad=True)
    m = torch.zeros(2, 3, dtype=torch.bool)
    loss = weighted_token_loss(x, None, m, "self_norm")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))


def test_bad_arguments():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="normalization"):
        weighted_token_loss(x, None, m, "mean")
    with pytest.raises(ValueError, match="shape"):
        weighted_token_loss(x, torch.ones(2, 2), m, "none")
    with pytest.raises(ValueError, match="targets has shape"):
        chunked_token_logprobs(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="hidden size"):
        chunked_token_logprobs(torch.zeros(2, 3, 4), torch.zeros(5, 3), torch.zeros(2, 3))
