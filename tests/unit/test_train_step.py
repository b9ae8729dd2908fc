"""raydc.train.step.Learner: the step's gradient is that of the global loss, however the
batch is split over ranks and accumulation steps (exact, on CPU, no DeepSpeed).

A stand-in engine does what DeepSpeed does to gradients: each micro-batch loss is divided
by grad_accum before its backward, and the data-parallel gradient is the mean over ranks.
The ranks run one after the other on one model, so their gradients add up; dividing by the
world size then gives DeepSpeed's average.
"""

from __future__ import annotations

import pytest
import torch

from raydc.config import TrainConfig
from raydc.method.loss import loss_denominators, weighted_token_loss
from raydc.method.weights import WeightConfigError, preset
from raydc.train.batch import collate
from raydc.train.model import StudentLogprobs, load_student
from raydc.train.step import Learner, micro_batch_weights, no_reduce
from tests.unit.test_train_model import _block


class _Engine:
    def __init__(self, model, grad_accum: int):
        self.module, self.G = model, grad_accum

    def __call__(self, input_ids, position_ids, **kwargs):
        return self.module(input_ids, position_ids, **kwargs)

    def backward(self, loss):
        (loss / self.G).backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return None


class _Sched:
    def get_last_lr(self):
        return [1e-3]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["discord", "sft", "iw_seq", "dft"])
@pytest.mark.parametrize("normalization", ["self_norm", "none", "per_sequence"])
def test_two_ranks_two_accumulation_steps_equal_one_full_batch(tiny_student, name, normalization):
    wc = preset(name).replace(normalization=normalization)
    block = _block(seed=5, lengths=(9, 5, 14, 3, 11, 6, 8, 12))
    torch.manual_seed(0)
    model = StudentLogprobs(load_student(tiny_student, TrainConfig(), on_gpu=False), 4)
    # Reference: one rank, every row in one micro-batch, the plain global loss.
    full = collate(block, list(range(len(block))), packed=True)
    model.zero_grad(set_to_none=True)
    logp = model(full.input_ids, full.position_ids)
    w = micro_batch_weights(full, wc)
    d = loss_denominators(w, full.loss_mask)
    denom = d["weight_sum"] if normalization == "self_norm" else d["tokens"]
    ref_loss = weighted_token_loss(-logp, w, full.loss_mask, normalization, denominator=denom)
    ref_loss.backward()
    ref = _grads(model)
    # Two ranks x two micro-batches each (packed on rank 0, right-padded on rank 1).
    ranks = [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    mbs = [[collate(block, rows, packed=(r == 0)) for rows in mb] for r, mb in enumerate(ranks)]
    sums = [0.0, 0.0]
    for rank_mbs in mbs:
        for mb in rank_mbs:
            dd = loss_denominators(micro_batch_weights(mb, wc), mb.loss_mask)
            sums[0] += float(dd["tokens"])
            sums[1] += float(dd["weight_sum"])

    def all_reduce(values, op="sum"):
        assert op == "sum"
        return list(sums)

    model.zero_grad(set_to_none=True)
    total = 0.0
    for rank_mbs in mbs:
        learner = Learner(_Engine(model, 2), _Sched(), TrainConfig(), wc, 2, all_reduce)
        total += learner.step(rank_mbs).loss
    got = {n: g / 2 for n, g in _grads(model).items()}  # DeepSpeed's mean over 2 ranks
    assert total == pytest.approx(float(ref_loss.detach()), rel=1e-6)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5)


def test_weight_warmup_gives_uniform_weights_and_no_reduce_is_identity():
    block = _block(seed=6)
    mb = collate(block, list(range(len(block))), packed=True)
    w = micro_batch_weights(mb, preset("discord"), uniform=True)
    assert torch.equal(w, mb.loss_mask.float())
    assert no_reduce([1.0, 2.5], "max") == [1.0, 2.5]


@pytest.mark.parametrize("G", [1, 2])
def test_student_ref_current_gates_with_the_forwards_own_entropy(tiny_student, G):
    """An entropy gate under student_ref=current reads the live forward's entropy (no
    stored column needed): the step's weights are compute_weights of the live log-probs
    and the exact entropy of the full logits."""
    from raydc.method.entropy import token_entropy
    from raydc.method.weights import compute_weights

    # the random tiny student's entropy is near ln V: a scale of 50 nats keeps w = H / 50 < 1
    wc = preset("eaft", gate_h=50.0)
    block = _block(seed=8, lengths=(9, 5, 14, 3))
    torch.manual_seed(0)
    lm = load_student(tiny_student, TrainConfig(), on_gpu=False)
    model = StudentLogprobs(lm, 4)
    mbs = [collate(block, rows, packed=False) for rows in ([[0, 1, 2, 3]], [[0, 1], [2, 3]])[G - 1]]
    expect = []
    with torch.no_grad():
        for mb in mbs:
            hidden = lm.get_decoder()(input_ids=mb.input_ids).last_hidden_state[:, :-1]
            logits = hidden @ lm.get_output_embeddings().weight.T
            s = torch.log_softmax(logits, -1).gather(-1, mb.input_ids[:, 1:, None])[..., 0]
            expect.append(
                compute_weights(s, None, mb.loss_mask, wc, student_entropy=token_entropy(logits))
            )
    tc = TrainConfig(student_ref="current")
    learner = Learner(_Engine(model, G), _Sched(), tc, wc, 1, no_reduce)
    stats = learner.step(mbs)
    for got, exp, mb in zip(stats.weights, expect, mbs):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-5)
        assert (got[mb.loss_mask] < 0.5).all()  # every token was gated
    # student_ref=init with no stored entropy: the error names the field and the fix
    with pytest.raises(WeightConfigError, match="student_entropy.*student_ref=current"):
        Learner(_Engine(model, G), _Sched(), TrainConfig(), wc, 1, no_reduce).step(mbs)
