"""Scored results are checked against what was sent, and the transformers scorer (the
reference the vLLM engines are compared with) equals a plain unchunked log-softmax."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raydc.engines.base import ScoreMismatchError, check_result
from raydc.engines.vllm import to_logprobs


def _entries(ids, lps):
    """prompt_logprobs the way vLLM returns them: None, then {token id: Logprob}."""
    return [None] + [{t: SimpleNamespace(logprob=v)} for t, v in zip(ids[1:], lps[1:])]


def test_to_logprobs_reads_the_sent_tokens_entry():
    ids, lps = [5, 7, 9], [0.0, -1.5, -0.25]
    got = to_logprobs(0, ids, ids, _entries(ids, lps))
    assert got.dtype == np.float32 and got.tolist() == lps


@pytest.mark.parametrize(
    "got_ids, entries, match",
    [
        ([5, 7, 8], None, "other token ids than sent .first difference at position 2"),
        ([5, 7], None, "other token ids"),
        (None, "short", "2 prompt log-prob entries for 3 tokens"),
        (None, "wrong_key", "position 2 has no log-prob for the sent token 9"),
        (None, "nan", "non-finite log-prob"),
    ],
)
def test_to_logprobs_refuses_what_does_not_belong(got_ids, entries, match):
    ids = [5, 7, 9]
    ent = _entries(ids, [0.0, -1.0, -2.0])
    if entries == "short":
        ent = ent[:2]
    elif entries == "wrong_key":
        ent[2] = {8: SimpleNamespace(logprob=-2.0)}
    elif entries == "nan":
        ent[1] = {7: SimpleNamespace(logprob=float("nan"))}
    with pytest.raises(ScoreMismatchError, match=match):
        to_logprobs(3, ids, got_ids if got_ids is not None else ids, ent)


def test_check_result_length():
    with pytest.raises(ScoreMismatchError, match="row 1: 2 log-probs for 3 tokens"):
        check_result(1, [1, 2, 3], None, np.zeros(2, np.float32))


def test_transformers_scorer_equals_plain_log_softmax(tiny_student):
    from transformers import AutoModelForCausalLM

    from raydc.engines import score_rows

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 2000, n).tolist() for n in (3, 40, 17, 64, 1)]
    # A small token budget forces several batches and chunked logits.
    got = score_rows(
        tiny_student, rows, "transformers", max_num_batched_tokens=48, max_model_len=64
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32).eval()
    for row, lp in zip(rows, got):
        assert len(lp) == len(row) and lp[0] == 0.0
        if len(row) < 2:
            continue
        ids = torch.tensor([row])
        with torch.no_grad():
            ref = torch.log_softmax(model(ids).logits[0].double(), -1)
        ref = ref[:-1].gather(-1, ids[0, 1:, None])[:, 0].numpy()
        assert np.abs(lp[1:] - ref).max() < 1e-5


def test_score_rows_rejects_unknown_settings(tiny_student):
    from raydc.engines import score_rows

    with pytest.raises(TypeError, match="unknown scorer settings"):
        score_rows(tiny_student, [[1, 2]], "transformers", max_len=3)


def test_transformers_scorer_at_a_temperature_is_log_softmax_of_scaled_logits(tiny_student):
    from transformers import AutoModelForCausalLM

    from raydc.engines import score_rows

    rows = [[5, 17, 300, 42, 9, 1200, 77]]
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32).eval()
    ids = torch.tensor(rows)
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    for T in (0.6, 1.0, 1.5):
        (got,) = score_rows(tiny_student, rows, "transformers", temperature=T)
        ref = torch.log_softmax(logits / T, -1)[:-1].gather(-1, ids[0, 1:, None])[:, 0].numpy()
        assert np.abs(got[1:] - ref).max() < 1e-5, T
    with pytest.raises(ValueError, match="temperature"):
        score_rows(tiny_student, rows, "transformers", temperature=0.0)


def test_the_transformers_scorer_gives_the_exact_entropy_beside_unchanged_logprobs(tmp_path):
    """score_with_entropy: H = -sum_v p_v log p_v of each position's full distribution,
    computed here from the plain logits; the log-probs equal score()'s bit for bit."""
    from transformers import AutoModelForCausalLM

    from raydc.config import ScoreConfig
    from raydc.engines import make_scorer
    from raydc.infra.models import build_tiny_model

    model = build_tiny_model(tmp_path / "s", "student", seed=0)
    cfg = ScoreConfig(backend="transformers")
    cfg.engine.max_num_batched_tokens = 16  # several logits chunks per row
    rows = [[1, 5, 9, 13, 200, 7, 3], [4, 8, 15, 16, 23]]
    scorer = make_scorer(cfg, model, entropy=True)
    plain = scorer.score(rows)
    both = scorer.score_with_entropy(rows)
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    for r, lp, (lp2, h) in zip(rows, plain, both):
        assert np.array_equal(lp, lp2)
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([r])).logits[0, :-1].double(), -1)
        want = -(logp.exp() * logp).sum(-1).numpy()
        assert h[0] == 0.0 and h.shape == (len(r),)
        np.testing.assert_allclose(h[1:], want, rtol=1e-4, atol=1e-4)


def test_vllm_top_k_entropies_count_only_the_top_k_entries():
    """vLLM returns the top-k prompt log-probs and, when it is not among them, the sent
    token's (rank > k): that one must not enter the estimate. By hand, k = 2, V = 4: the
    top two p = (0.5, 0.25) give head 0.5 ln 2 + 0.25 ln 4 = ln 2 and tail m = 0.25 on
    n = 2 tokens each <= 0.25: lower -0.25 ln 0.25 (one token), upper 0.25 ln(2 / 0.25);
    the estimate is their midpoint."""
    import math

    from raydc.engines.vllm import topk_entropies

    def lp(v, rank):
        return SimpleNamespace(logprob=math.log(v), rank=rank)

    entries = [None, {3: lp(0.5, 1), 1: lp(0.25, 2), 2: lp(0.125, 3)}]
    got = topk_entropies(entries, 2, 4)
    head = math.log(2)
    lower, upper = head + 0.25 * math.log(4), head + 0.25 * math.log(2 / 0.25)
    assert got[0] == 0.0
    assert got[1] == pytest.approx((lower + upper) / 2, rel=1e-6)
