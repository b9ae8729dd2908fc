"""raydc.train.model and raydc.train.step on the tiny student, no Ray: packed rows are
exactly rows alone (logits, weights, loss, gradients), activation checkpointing changes no
gradient, the chunked head equals full logits."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydc.config import TrainConfig
from raydc.method.loss import loss_denominators, weighted_token_loss
from raydc.method.weights import GRANULARITIES, NORMALIZATIONS, WeightConfig, preset
from raydc.train.batch import RowBlock, collate
from raydc.train.model import StudentLogprobs, load_student, resolve_attn_implementation
from raydc.train.step import micro_batch_weights

LENGTHS = (7, 19, 4, 12, 2)


def _block(seed: int = 0, lengths=LENGTHS) -> RowBlock:
    """Rows of mixed length with a prompt (no loss) then a response, random log-probs and
    several sentences per response."""
    rng = np.random.default_rng(seed)
    cols = {
        k: []
        for k in (
            "row_id",
            "input_ids",
            "loss_mask",
            "sentence_ids",
            "student_logprobs",
            "teacher_logprobs",
        )
    }
    for r, L in enumerate(lengths):
        prompt = max(1, L // 3)
        cols["row_id"].append(f"row{r}")
        cols["input_ids"].append(rng.integers(3, 500, L).tolist())
        cols["loss_mask"].append([False] * prompt + [True] * (L - prompt))
        cols["sentence_ids"].append(np.cumsum(rng.random(L) < 0.3).tolist())
        for k in ("student_logprobs", "teacher_logprobs"):
            lp = (-rng.gamma(1.0, 1.5, L)).astype(np.float32)
            lp[0] = 0.0
            cols[k].append(lp.tolist())
    return RowBlock.from_table(pa.table(cols))


@pytest.fixture(scope="module", params=["sdpa_packed", "sdpa", "eager"])
def lm(request, tiny_student):
    tc = TrainConfig(attn_implementation=request.param)
    torch.manual_seed(0)
    return load_student(tiny_student, tc, on_gpu=False)


def _loss_and_grads(model, mb, wc, normalization_denominator=None, live=False):
    model.zero_grad(set_to_none=True)
    logp = model(mb.input_ids, mb.position_ids)
    w = micro_batch_weights(mb, wc, logp if live else None)
    d = loss_denominators(w, mb.loss_mask)
    denom = d["weight_sum"] if wc.normalization == "self_norm" else d["tokens"]
    loss = weighted_token_loss(-logp, w, mb.loss_mask, wc.normalization, denominator=denom)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, logp.detach(), w


def test_packed_logits_equal_rows_alone_and_rows_do_not_see_each_other(lm):
    model = StudentLogprobs(lm, chunk_size=5)
    block = _block()
    rows = list(range(len(block)))
    packed = collate(block, rows, packed=True)
    padded = collate(block, rows, packed=False)
    with torch.no_grad():
        lp_packed = packed.layout.to_rows(model(packed.input_ids, packed.position_ids))
        lp_padded = model(padded.input_ids, padded.position_ids)
        alone = [model(collate(block, [r], packed=False).input_ids)[0] for r in rows]
    valid = packed.layout.valid
    torch.testing.assert_close(lp_packed[valid], lp_padded[valid], atol=1e-5, rtol=1e-5)
    for r, lp in enumerate(alone):
        torch.testing.assert_close(lp_packed[r, : len(lp)], lp, atol=1e-5, rtol=1e-5)
    # Change every token of row 1: the other rows of the packed sequence do not move.
    ids = packed.input_ids.clone()
    start, stop = int(block.offsets[1]), int(block.offsets[2])
    ids[0, start:stop] = (ids[0, start:stop] + 17) % 500
    with torch.no_grad():
        changed = packed.layout.to_rows(model(ids, packed.position_ids))
    for r in rows:
        same = torch.equal(changed[r][valid[r]], lp_packed[r][valid[r]])
        assert same == (r != 1), r


CASES = list(itertools.product(GRANULARITIES, NORMALIZATIONS))


@pytest.mark.parametrize("granularity,normalization", CASES)
def test_packed_and_unpacked_give_the_same_loss_and_gradients(lm, granularity, normalization):
    wc = WeightConfig(granularity=granularity, normalization=normalization, tau=2.0)
    model = StudentLogprobs(lm, chunk_size=8)
    block = _block(seed=1)
    rows = list(range(len(block)))
    loss_p, g_p, _, w_p = _loss_and_grads(model, collate(block, rows, packed=True), wc)
    loss_u, g_u, _, w_u = _loss_and_grads(model, collate(block, rows, packed=False), wc)
    assert loss_p == pytest.approx(loss_u, abs=1e-5)
    packed = collate(block, rows, packed=True)
    torch.testing.assert_close(packed.layout.to_rows(w_p), w_u, atol=1e-6, rtol=1e-6)
    for name in g_u:
        torch.testing.assert_close(g_p[name], g_u[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["discord", "das_token", "iw_seq", "dft", "tis", "sft"])
def test_presets_packed_equal_unpacked_with_live_student_logprobs(lm, name):
    wc = preset(name)
    model = StudentLogprobs(lm, chunk_size=8)
    block = _block(seed=2)
    rows = list(range(len(block)))
    lp, gp, _, _ = _loss_and_grads(model, collate(block, rows, True), wc, live=True)
    lu, gu, _, _ = _loss_and_grads(model, collate(block, rows, False), wc, live=True)
    assert lp == pytest.approx(lu, abs=1e-5)
    for n in gu:
        torch.testing.assert_close(gp[n], gu[n], atol=1e-5, rtol=1e-4)


def test_a_packed_row_weighs_what_it_weighs_alone():
    block = _block(seed=3)
    wc = WeightConfig(granularity="prefix_ema", normalization="per_sequence", lam=0.7)
    packed = collate(block, list(range(len(block))), packed=True)
    w = packed.layout.to_rows(micro_batch_weights(packed, wc))
    for r in range(len(block)):
        alone = micro_batch_weights(collate(block, [r], packed=False), wc)[0]
        torch.testing.assert_close(w[r, : alone.shape[0]], alone, atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_changes_no_gradient(tiny_student):
    block = _block(seed=4)
    mb = collate(block, list(range(len(block))), packed=True)
    wc = preset("discord")
    out = []
    for on in (False, True):
        torch.manual_seed(0)
        lm = load_student(tiny_student, TrainConfig(gradient_checkpointing=on), on_gpu=False)
        assert lm.is_gradient_checkpointing == on
        out.append(_loss_and_grads(StudentLogprobs(lm, 8), mb, wc))
    assert out[0][0] == pytest.approx(out[1][0], abs=1e-6)
    for name in out[0][1]:
        torch.testing.assert_close(out[0][1][name], out[1][1][name], atol=1e-5, rtol=1e-5)


def test_student_logprobs_head_matches_full_logits(tiny_student):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_student)
    ids = torch.randint(0, 500, (2, 9))
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[:, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    got = StudentLogprobs(lm, chunk_size=4)(ids)
    assert got.shape == (2, 8)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_the_head_returns_the_exact_entropy_with_unchanged_logprobs(lm):
    """with_entropy: the same log-probs, plus each position's entropy, packed rows exactly
    as rows alone (the entropy the gates of student_ref=current read)."""
    from raydc.method.entropy import token_entropy

    model = StudentLogprobs(lm, chunk_size=5)
    block = _block(seed=7)
    rows = list(range(len(block)))
    packed = collate(block, rows, packed=True)
    with torch.no_grad():
        logp, ent = model(packed.input_ids, packed.position_ids, with_entropy=True)
        assert torch.equal(logp, model(packed.input_ids, packed.position_ids))
        for r in rows:
            ids = collate(block, [r], packed=False).input_ids
            hidden = lm.get_decoder()(input_ids=ids).last_hidden_state[0, :-1]
            ref = token_entropy(hidden @ lm.get_output_embeddings().weight.T)  # full logits
            got = packed.layout.to_rows(ent)[r, : ids.shape[1] - 1]  # the row in the pack
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad


def test_attention_implementation_choice():
    assert resolve_attn_implementation("auto", on_gpu=False) == "sdpa_packed"
    assert resolve_attn_implementation("eager", on_gpu=True) == "eager"
