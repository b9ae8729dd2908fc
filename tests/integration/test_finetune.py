"""The benchmark's in-process fine-tuning equals `raydc train` on Ray Train + DeepSpeed.

One `raydc train` run (1 CPU worker, ZeRO stage 0, fp32, right-padded rows as the
benchmark collates them, ``das_token`` with ``student_ref=current``, gradient accumulation,
weight warmup and a cosine schedule with warmup) against ``bench.quality.finetune.
train_steps`` on the same micro-batches: the ones the worker's own planning code gives
(``build_index`` -> ``assign_pieces`` -> ``RankShard`` -> ``plan_epoch`` ->
``WindowReader`` -> ``collate``), epoch after epoch, checked against the rows fingerprint
the worker reports for each step. The per-step learning rates must be equal, the losses
agree to 1e-5 relative, every parameter to 1e-5, and the parameter updates (final minus
initial, all parameters as one vector) to 1e-3 in relative L2 norm; the same steps under
plain SFT weights land ~0.3 away, so a wrong weighting fails that bound by two orders of
magnitude.

Both sides run on one thread, and the worker reports its count (``torch_threads``): the
order of float sums depends on the thread count, and Adam's first steps turn that noise on
near-zero gradients into single elements that differ by ~1e-4 (1 vs 2 threads, measured
here: max element 1.08e-4, relative L2 3e-5; CI once failed with exactly 1.08e-4 before the
worker set its own thread count), while equal thread counts agree to ~1e-7.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from bench.quality.finetune import train_steps
from raydc.config import from_dict
from raydc.train.batch import MicroBatch, collate
from raydc.train.data import check_schema, open_store
from raydc.train.shard import RankShard, WindowReader, assign_pieces, build_index, plan_epoch
from tests.train_fixtures import make_scored

pytestmark = pytest.mark.integration

STEPS = 4
LOSS_RTOL = 1e-5
UPDATE_RTOL = 1e-3
PARAM_ATOL = 1e-5
THREADS = 1  # the worker's cpus_per_worker; the worker sets its torch threads to it


def _cfg(student: str):
    train = dict(
        student=student,
        num_workers=1,
        cpus_per_worker=THREADS,
        zero_stage=0,  # DeepSpeed steps the client AdamW itself: no flat fp32 partition
        precision="fp32",
        max_steps=STEPS,
        lr=3e-3,
        lr_schedule="cosine",
        warmup_steps=1,
        min_lr_ratio=0.1,
        micro_batch_tokens=256,
        packing=False,  # right-padded rows, as the benchmark collates them
        grad_accum=2,
        student_ref="current",
        weight_warmup_steps=1,
        log_every=1,
        checkpoint_every=STEPS,
        val_share=0.0,
        seed=0,
    )
    return from_dict({"train": train, "weights": {"preset": "das_token"}})


def _pad_id(student: str) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    pad = tok.pad_token_id
    return int(pad if pad is not None else (tok.eos_token_id or 0))


def _worker_steps(cfg, scored: str, pad_id: int) -> list[list[MicroBatch]]:
    """Each step's micro-batches of rank 0, planned by the trainer's code: the driver's
    index and pieces, the worker's shard, epoch plans (``steps`` = micro-batches //
    grad_accum, then the next epoch) and collate."""
    tc = cfg.train
    store = open_store(scored)
    pieces = assign_pieces(build_index(store.files, store.keep), tc.num_workers)
    shard = RankShard.open(pieces[0], check_schema(store.files), tc.val_share, tc.seed)
    G, steps, epoch = tc.grad_accum, [], 0
    while len(steps) < tc.max_steps:
        plan = plan_epoch(
            shard,
            epoch,
            0,
            tc.seed,
            tc.micro_batch_tokens,
            tc.shuffle_window_tokens,
            tc.packing,
        )
        reader = WindowReader(shard, plan)
        for s in range(plan.num_micro_batches // G):
            mbs = []
            for k in range(s * G, (s + 1) * G):
                block, local, _ = reader.get(k)
                mbs.append(collate(block, local, tc.packing, pad_id))
            steps.append(mbs)
        epoch += 1
    return steps[: tc.max_steps]


def _rows_fingerprint(mbs: list[MicroBatch]) -> str:
    ids = [r for mb in mbs for r in mb.row_ids]
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def scored(tiny_student, tiny_teacher, tmp_path_factory) -> str:
    return make_scored(tiny_student, tiny_teacher, tmp_path_factory.mktemp("scored"), n_rows=12)


def test_in_process_steps_equal_raydc_train(ray_local, tiny_student, scored, tmp_path):
    from transformers import AutoModelForCausalLM

    from raydc.train import run_train

    cfg = _cfg(tiny_student)
    summary = run_train(cfg, scored, tmp_path / "train")
    by_step = {}
    for line in Path(summary["metrics_path"]).read_text().splitlines():
        m = json.loads(line)
        by_step[m["step"]] = m
    assert sorted(by_step) == list(range(1, STEPS + 1))

    steps = _worker_steps(cfg, scored, _pad_id(tiny_student))
    assert len({mb.row_ids[0] for mbs in steps for mb in mbs}) > 2
    assert by_step[STEPS]["epoch"] >= 1, "the run should cross an epoch boundary"
    for s, mbs in enumerate(steps, 1):
        assert by_step[s]["rows_fingerprint"] == _rows_fingerprint(mbs), f"step {s}: other rows"

    init = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    with _threads(THREADS):
        stats = train_steps(model, steps, cfg.train, cfg.weights)

    loss_diff = max(abs(st.loss - by_step[s]["loss"]) for s, st in enumerate(stats, 1))
    lr_diff = max(abs(st.lr - by_step[s]["lr"]) for s, st in enumerate(stats, 1))
    trained = AutoModelForCausalLM.from_pretrained(summary["model_dir"], dtype=torch.float32)
    theirs_update = _update(trained, init)
    ours_update = _update(model, init)
    update_diff = float((theirs_update - ours_update).norm() / ours_update.norm())
    max_diff = float((theirs_update - ours_update).abs().max())

    # The same steps with another weighting (plain SFT): how far a real difference moves
    # the parameters, so the bound above is shown to be one a wrong weighting breaks.
    sft = from_dict({"train": dataclasses.asdict(cfg.train), "weights": {"preset": "sft"}})
    other = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32)
    with _threads(THREADS):
        train_steps(other, steps, sft.train, sft.weights)
    sft_diff = float((_update(other, init) - ours_update).norm() / ours_update.norm())
    print(
        f"loss max abs diff {loss_diff:.3g}, lr {lr_diff:.3g}; parameter update relative "
        f"L2 diff {update_diff:.3g} (max element {max_diff:.3g}); sft vs das_token {sft_diff:.3g}"
    )
    assert float(ours_update.abs().max()) > 1e-3, "training barely moved the parameters"
    assert {m["torch_threads"] for m in by_step.values()} == {THREADS}
    assert lr_diff < 1e-12
    for s, st in enumerate(stats, 1):
        assert st.loss == pytest.approx(by_step[s]["loss"], rel=LOSS_RTOL, abs=1e-7), s
    assert update_diff < UPDATE_RTOL
    assert max_diff < PARAM_ATOL  # element by element, on equal thread counts
    assert sft_diff > 20 * UPDATE_RTOL, "a different weighting should move the parameters apart"


def _update(model, init) -> torch.Tensor:
    """Every parameter's change from the start, flattened into one vector."""
    start = dict(init.named_parameters())
    return torch.cat([(p - start[n]).detach().flatten() for n, p in model.named_parameters()])


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
