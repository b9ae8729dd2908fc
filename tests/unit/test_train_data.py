"""Pure parts of the training stage: micro-batch planning, row checks, DeepSpeed config,
learning-rate schedule, held-out split, the student fingerprint check."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raydc.config import ConfigError, TrainConfig, from_dict
from raydc.train.data import (
    ScoredDataError,
    check_student,
    collate,
    is_val_key,
    owner_rank,
    plan_micro_batches,
    rows_from_table,
    scored_files,
)
from raydc.train.ds_config import build_ds_config, lr_lambda, resolve_precision


def test_plan_covers_every_row_once_within_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=500).tolist()
    plan = plan_micro_batches(lengths, 1024, np.random.default_rng(1), buffer_rows=128)
    flat = sorted(i for b in plan for i in b)
    assert flat == list(range(500))
    for b in plan:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or longest * len(b) <= 1024

    # Bucketing keeps padding small compared with batching rows in arrival order.
    def pad_share(p):
        slots = sum(max(lengths[i] for i in b) * len(b) for b in p)
        return 1 - sum(lengths) / slots

    naive, cur = [], []
    for i in range(500):
        if cur and max(lengths[j] for j in cur + [i]) * (len(cur) + 1) > 1024:
            naive.append(cur)
            cur = []
        cur.append(i)
    naive.append(cur)
    assert pad_share(plan) < 0.1 < pad_share(naive)


def test_plan_is_deterministic_and_long_rows_go_alone():
    lengths = [10, 3000, 20, 30]
    a = plan_micro_batches(lengths, 100, np.random.default_rng(5))
    b = plan_micro_batches(lengths, 100, np.random.default_rng(5))
    assert a == b
    assert [1] in a
    assert plan_micro_batches(lengths, 100, None) == [[0, 2, 3], [1]]


def _table(**over):
    cols = {
        "row_id": ["a", "b"],
        "input_ids": [[1, 2, 3], [4, 5]],
        "loss_mask": [[False, True, True], [False, True]],
        "student_logprobs": [[0.0, -1.0, -2.0], [0.0, -0.5]],
        "teacher_logprobs": [[0.0, -1.5, -2.5], [0.0, -0.1]],
    }
    cols.update(over)
    return pa.table(cols)


def test_rows_from_table_and_collate():
    rows = rows_from_table(_table())
    assert [r.row_id for r in rows] == ["a", "b"]
    mb = collate(rows, pad_id=7)
    assert mb["input_ids"].tolist() == [[1, 2, 3], [4, 5, 7]]
    assert mb["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert mb["loss_mask"].tolist() == [[False, True, True], [False, True, False]]
    assert mb["teacher_logprobs"][1].tolist() == pytest.approx([0.0, -0.1, 0.0])
    assert (mb["tokens"], mb["slots"]) == (5, 6)


def test_bad_rows_name_row_and_field():
    with pytest.raises(ScoredDataError, match=r"row 'b'.*student_logprobs has 3 values"):
        rows_from_table(_table(student_logprobs=[[0.0, -1.0, -2.0], [0.0, -0.5, -1.0]]))
    with pytest.raises(ScoredDataError, match=r"row 'a'.*loss_mask is True at position 0"):
        rows_from_table(_table(loss_mask=[[True, True, True], [False, True]]))
    with pytest.raises(ScoredDataError, match=r"row 'b'.*student_logprobs is null"):
        rows_from_table(_table(student_logprobs=[[0.0, -1.0, -2.0], None]))
    rows = rows_from_table(_table(teacher_logprobs=[[0.0, -1.5, -2.5], None]))
    with pytest.raises(ScoredDataError, match=r"row 'b'.*teacher_logprobs is null"):
        collate(rows)


def test_scored_files_skip_rejects(tmp_path):
    for name in ("part-1.parquet", "part-0.parquet", "rejects.parquet"):
        (tmp_path / name).write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in scored_files(tmp_path)] == [
        "part-0.parquet",
        "part-1.parquet",
    ]
    with pytest.raises(ScoredDataError, match="not a folder"):
        scored_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoredDataError, match="no scored"):
        scored_files(tmp_path / "empty")


def test_other_students_scores_are_refused(tmp_path):
    from raydc.models import fingerprint

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "config.json").write_text(json.dumps({"x": 1}))
    (b / "config.json").write_text(json.dumps({"x": 2}))
    manifest = {"student": {"path": str(a), "fingerprint": fingerprint(a)}}
    assert check_student(manifest, str(a)) == fingerprint(a)
    with pytest.raises(ScoredDataError, match="made with student .* re-score"):
        check_student(manifest, str(b))


def test_ds_config_stages_and_precision():
    cfg = TrainConfig(
        zero_stage=3, offload_params=True, offload_optimizer=True, grad_accum=4, grad_clip=0.5
    )
    ds = build_ds_config(cfg, world_size=2, on_gpu=True)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    cpu = build_ds_config(TrainConfig(zero_stage=1), world_size=2, on_gpu=False)
    assert not cpu["bf16"]["enabled"] and "offload_optimizer" not in cpu["zero_optimization"]
    assert resolve_precision(TrainConfig(precision="fp16"), on_gpu=False) == "fp16"
    with pytest.raises(ValueError, match="offload_params"):
        build_ds_config(TrainConfig(zero_stage=2, offload_params=True), 1, False)


def test_train_config_checks_name_the_field():
    with pytest.raises(ConfigError, match="train.offload_params"):
        from_dict({"train": {"offload_params": True, "zero_stage": 2}})
    with pytest.raises(ConfigError, match="train.rescore_every"):
        from_dict({"train": {"rescore_every": 5, "student_ref": "current"}})
    with pytest.raises(ConfigError, match="train.val_share"):
        from_dict({"train": {"val_share": 1.5}})
    with pytest.raises(ConfigError, match="train.precision"):
        from_dict({"train": {"precision": "fp8"}})


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(warmup_steps=4, max_steps=14, lr_schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    lin = lr_lambda(TrainConfig(warmup_steps=0, max_steps=10, lr_schedule="linear"))
    assert lin(5) == pytest.approx(0.5)
    assert lr_lambda(TrainConfig(lr_schedule="constant"))(50) == 1.0


def test_val_split_is_deterministic_and_near_the_share():
    keys = [f"p{i}" for i in range(4000)]
    picked = [is_val_key(k, 0.1, 0) for k in keys]
    assert picked == [is_val_key(k, 0.1, 0) for k in keys]
    assert 0.08 < sum(picked) / len(keys) < 0.12
    assert not any(is_val_key(k, 0.0, 0) for k in keys)


def test_student_logprobs_head_matches_full_logits(tiny_student):
    from transformers import AutoModelForCausalLM

    from raydc.train.model import StudentLogprobs

    lm = AutoModelForCausalLM.from_pretrained(tiny_student)
    ids = torch.randint(0, 500, (2, 9))
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[:, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    got = StudentLogprobs(lm, chunk_size=4)(ids, torch.ones_like(ids))
    assert got.shape == (2, 8)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_build_trainer_refuses_another_students_scores(tiny_student, tiny_teacher, tmp_path):
    from raydc.train import build_trainer
    from tests.train_fixtures import make_scored

    scored = make_scored(tiny_student, None, tmp_path / "scored", n_rows=4, n_files=1)
    cfg = from_dict({"train": {"student": tiny_teacher}})
    with pytest.raises(ScoredDataError, match=r"made with student .*fingerprint"):
        build_trainer(cfg, scored, tmp_path / "out")
    rows = rows_from_table(pq.read_table(scored_files(scored)))
    assert len(rows) == 4 and all(r.teacher_logprobs is None for r in rows)


def test_owner_rank_is_deterministic_and_balanced():
    ids = [f"row{i}" for i in range(3000)]
    ranks = [owner_rank(r, 3) for r in ids]
    assert ranks == [owner_rank(r, 3) for r in ids]
    counts = [ranks.count(k) for k in range(3)]
    assert min(counts) > 900 and set(ranks) == {0, 1, 2}
    assert {owner_rank(r, 1) for r in ids} == {0}
