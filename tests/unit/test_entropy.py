"""raydc.method.entropy: the exact entropy (reference, chunked, fused into the chunked
log-prob pass) and the top-k bounds, by hand and on a real model's distributions."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raydc.method.entropy import chunked_entropy, token_entropy, topk_entropy
from raydc.method.loss import chunked_token_logprobs

NEG_INF = float("-inf")


def f(p: float) -> float:
    """-p ln p, 0 at 0."""
    return 0.0 if p == 0 else -p * math.log(p)


def test_token_entropy_hand_computed():
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform over 4: ln 4
            [math.log(0.5), math.log(0.25), math.log(0.25), NEG_INF],  # 1.5 ln 2
            [0.0, NEG_INF, NEG_INF, NEG_INF],  # certain: 0, not NaN
            [7.0, 7.0, 7.0, 7.0],  # shift-invariant
        ]
    )
    got = token_entropy(logits).tolist()
    assert got == pytest.approx([math.log(4), 1.5 * math.log(2), 0.0, math.log(4)], abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_entropy_equals_the_reference(chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 50, generator=g) * 3
    ref = token_entropy(logits.double())
    got = chunked_entropy(logits, chunk_size=chunk)
    assert got.shape == (2, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    # bf16 logits are upcast a chunk at a time: the entropy of the rounded logits
    got16 = chunked_entropy(logits.bfloat16(), chunk_size=chunk)
    torch.testing.assert_close(got16, token_entropy(logits.bfloat16().float()), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_entropy(logits, chunk_size=0)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
@pytest.mark.parametrize("keep_bytes", [0, 2**30], ids=["recompute", "kept"])
def test_the_fused_entropy_changes_nothing_else(chunk, keep_bytes):
    """with_entropy: the same log-probs and gradients, plus the exact entropy, no grad."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 6, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 16, generator=g, dtype=torch.float64) * 0.7
    bias = torch.randn(40, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 40, (3, 6), generator=g)
    grad_out = torch.randn(3, 6, generator=g, dtype=torch.float64)
    runs = []
    for with_entropy in (False, True):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        out = chunked_token_logprobs(
            h, w, targets, b, chunk_size=chunk, keep_bytes=keep_bytes, with_entropy=with_entropy
        )
        logp, ent = out if with_entropy else (out, None)
        (logp.double() * grad_out).sum().backward()
        runs.append((logp.detach(), ent, h.grad, w.grad, b.grad))
    (lp0, _, *g0), (lp1, ent, *g1) = runs
    assert torch.equal(lp0, lp1)
    for a, c in zip(g0, g1):
        assert torch.equal(a, c)
    assert ent.shape == (3, 6) and not ent.requires_grad
    ref = token_entropy(hidden @ weight.t() + bias)
    torch.testing.assert_close(ent.double(), ref.double(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- top-k


def test_topk_bounds_by_hand_the_upper_is_attained():
    # p = (0.4, 0.3, 0.1, 0.1, 0.1), k = 2: the tail (0.1 x 3) is even, so H = upper.
    lp = torch.tensor([math.log(0.3), math.log(0.4)])  # any order
    r = topk_entropy(lp, vocab_size=5)
    head = f(0.4) + f(0.3)
    assert float(r.head) == pytest.approx(head)
    assert float(r.tail_mass) == pytest.approx(0.3)
    assert float(r.upper) == pytest.approx(head + 0.3 * math.log(3 / 0.3))
    # lower: one tail token at the cap 0.3 (floor(0.3 / 0.3) = 1), the rest 0
    assert float(r.lower) == pytest.approx(head + f(0.3))
    exact = head + 3 * f(0.1)
    assert float(r.upper) == pytest.approx(exact)
    assert float(r.estimate) == pytest.approx((float(r.lower) + float(r.upper)) / 2)


def test_topk_bounds_by_hand_the_lower_is_attained():
    # p = (0.5, 0.2 | 0.2, 0.1, 0, 0), k = 2, V = 6: the tail sits on as few tokens as the
    # cap 0.2 allows: a = floor(0.3 / 0.2) = 1 token at 0.2, the rest r = 0.1 on one more.
    r = topk_entropy(torch.tensor([math.log(0.5), math.log(0.2)]), vocab_size=6)
    head = f(0.5) + f(0.2)
    assert float(r.lower) == pytest.approx(head + f(0.2) + f(0.1))
    assert float(r.upper) == pytest.approx(head + 0.3 * math.log(4 / 0.3))
    # a tail smaller than the cap: all of it on one token, m (-ln m)
    r = topk_entropy(torch.tensor([math.log(0.9), math.log(0.06)]), vocab_size=100)
    assert float(r.lower) == pytest.approx(f(0.9) + f(0.06) + f(0.04))
    assert float(r.lower) >= f(0.9) + f(0.06) - 0.04 * math.log(0.06)  # >= m (-ln p_k)


def test_topk_with_the_whole_vocabulary_is_exact():
    p = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    r = topk_entropy(torch.log(p), vocab_size=3)
    exact = [f(0.5) + f(0.3) + f(0.2), 0.0]
    for x in (r.estimate, r.lower, r.upper):
        assert x.tolist() == pytest.approx(exact, abs=1e-6)


def test_topk_input_errors():
    with pytest.raises(ValueError, match="vocab_size=2 is smaller than k=3"):
        topk_entropy(torch.log(torch.tensor([0.5, 0.3, 0.2])), vocab_size=2)
    with pytest.raises(ValueError, match=r"NaN at position \(1,\)"):
        topk_entropy(torch.tensor([[-1.0, -2.0], [float("nan"), -1.0]]), vocab_size=10)
    with pytest.raises(ValueError, match="positive"):
        topk_entropy(torch.tensor([0.5, -2.0]), vocab_size=10)
    with pytest.raises(ValueError, match=r"sum to more than 1 at position \(0,\)"):
        topk_entropy(torch.log(torch.tensor([[0.7, 0.6]])), vocab_size=10)
    with pytest.raises(ValueError, match="k >= 1"):
        topk_entropy(torch.zeros(3, 0), vocab_size=10)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.01, 12.0),
    k=st.integers(1, 30),
    V=st.integers(31, 300),
)
def test_topk_bounds_hold_for_any_distribution(seed, scale, k, V):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, V, generator=g, dtype=torch.float64) * scale
    logp = torch.log_softmax(logits, -1)
    exact = token_entropy(logits).double()
    r = topk_entropy(logp.topk(k, -1).values, vocab_size=V)
    assert (r.lower <= exact + 1e-9).all() and (exact <= r.upper + 1e-9).all()
    assert ((r.estimate - exact).abs() <= (r.upper - r.lower) / 2 + 1e-9).all()


def _sumtask_positions():
    """Log-probs [N, V] of the shipped sumtask student at every position of real text: its
    chat-format training traces (in distribution) and a paragraph of English prose (far
    outside it: the student has only seen the task), fp64."""
    from transformers import AutoModelForCausalLM

    from raydc.infra.models import ASSETS, load_tokenizer

    path = ASSETS / "sumtask" / "models" / "student"
    tok = load_tokenizer(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with open(ASSETS / "sumtask" / "train.jsonl") as fh:
        rows = [json.loads(line) for line in fh][:64]
    texts = [
        tok.apply_chat_template(
            [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["response"]},
            ],
            tokenize=False,
        )
        for r in rows
    ]
    texts.append(
        "A teacher wrote reasoning traces; a smaller student is fine-tuned on them. Plain "
        "SFT maximises the student's likelihood of every teacher token given the teacher's "
        "prefix. At inference the student continues its own prefixes, which drift away from "
        "anything the teacher wrote, and one early slip can derail a long trace."
    )
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out.append(torch.log_softmax(lm(ids).logits[0].double(), -1))
    return torch.cat(out), lm.config.vocab_size


def test_top20_bounds_hold_on_a_real_models_distributions():
    """k = 20 on the sumtask student (V = 2,048) over real text: the exact entropy lies
    within the bounds at every position; the estimate's error is reported (docs/method.md
    quotes these figures)."""
    logp, V = _sumtask_positions()
    exact = token_entropy(logp).double()
    r = topk_entropy(logp.topk(20, -1).values.float(), vocab_size=V)  # float32, as engines give
    lower, upper, est = r.lower.double(), r.upper.double(), r.estimate.double()
    tol = 1e-5  # float32 top-k log-probs
    assert (lower <= exact + tol).all(), float((lower - exact).max())
    assert (exact <= upper + tol).all(), float((exact - upper).max())
    err = (est - exact).abs()
    assert (err <= (upper - lower) / 2 + tol).all()
    head_err = (exact - r.head.double()).abs()
    # EAFT's proxy for comparison: the entropy of the renormalised top-20 distribution
    renorm = token_entropy(logp.topk(20, -1).values)
    renorm_err = (renorm - exact).abs()

    def corr(x):
        return float(torch.corrcoef(torch.stack([x.double(), exact]))[0, 1])

    print(
        f"\nsumtask student, k=20, {len(exact)} positions: entropy mean "
        f"{exact.mean():.4f} max {exact.max():.4f} nats; tail mass mean "
        f"{r.tail_mass.double().mean():.4f} max {r.tail_mass.max():.4f}; estimate |error| mean "
        f"{err.mean():.4f} max {err.max():.4f} (r = {corr(est):.4f}); head only |error| mean "
        f"{head_err.mean():.4f} max {head_err.max():.4f}; renormalised top-k |error| mean "
        f"{renorm_err.mean():.4f} max {renorm_err.max():.4f} (r = {corr(renorm):.4f}); bound "
        f"width mean {(upper - lower).mean():.4f} max {(upper - lower).max():.4f}"
    )
    # The top 20 of 2,048 hold nearly all the mass here: the midpoint is close on average.
    assert len(exact) > 1000 and float(err.mean()) < 0.1
