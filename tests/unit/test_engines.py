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
