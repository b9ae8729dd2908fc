"""raydc.train.batch: scored rows (checks naming row and field), packing and bucketing,
typed micro-batches."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydc.train.batch import RowBlock, bucket_rows, collate, pack_rows
from raydc.train.data import ScoredDataError


def scored_table(**over):
    cols = {
        "row_id": ["a", "b", "c"],
        "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
        "loss_mask": [[False, True, True], [False, True], [False, False, True, True]],
        "sentence_ids": [[0, 0, 1], [0, 0], [0, 0, 0, 1]],
        "student_logprobs": [[0.0, -1.0, -2.0], [0.0, -0.5], [0.0, -0.1, -0.2, -0.3]],
        "teacher_logprobs": [[0.0, -1.5, -2.5], [0.0, -0.1], [0.0, -0.3, -0.2, -0.1]],
    }
    cols.update(over)
    return pa.table(cols)


def test_pack_rows_fills_bins_and_covers_every_row_once():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.5, 1.0, size=2000).astype(int), 100, 8000)
    budget = 8192
    bins = pack_rows(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert len(b) == 1 or lengths[b].sum() <= budget
    fill = lengths.sum() / (len(bins) * budget)
    assert fill > 0.97, fill  # first-fit decreasing leaves little room empty
    # Bucketing the same rows needs more micro-batches: rows x longest must fit the budget,
    # so a bucket of rows of one length stops short of it.
    buckets = bucket_rows(lengths, budget)
    assert len(buckets) > 1.1 * len(bins)


def test_pack_and_bucket_are_deterministic_and_long_rows_go_alone():
    lengths = np.array([10, 3000, 20, 30, 95])
    assert pack_rows(lengths, 100) == pack_rows(lengths, 100)
    assert [1] in pack_rows(lengths, 100)
    assert pack_rows(lengths, 100) == [[1], [4], [3, 2, 0]]
    assert bucket_rows(lengths, 100) == [[0, 2, 3], [4], [1]]


def test_row_block_checks_name_the_row_and_field():
    with pytest.raises(ScoredDataError, match=r"row 'b'.*student_logprobs has 3 values"):
        RowBlock.from_table(
            scored_table(student_logprobs=[[0.0, -1.0, -2.0], [0.0, -0.5, -1.0], [0.0] * 4])
        )
    with pytest.raises(ScoredDataError, match=r"row 'a'.*loss_mask is True at position 0"):
        RowBlock.from_table(
            scored_table(loss_mask=[[True, True, True], [False, True], [False, False, True, True]])
        )
    with pytest.raises(ScoredDataError, match=r"row 'b'.*student_logprobs is null"):
        RowBlock.from_table(scored_table(student_logprobs=[[0.0, -1.0, -2.0], None, [0.0] * 4]))
    with pytest.raises(ScoredDataError, match=r"row 'c'.*not finite"):
        RowBlock.from_table(
            scored_table(
                student_logprobs=[[0.0, -1.0, -2.0], [0.0, -0.5], [0.0, -0.1, float("nan"), 0]]
            )
        )
    with pytest.raises(ScoredDataError, match=r"row 'b'.*input_ids has 1 tokens"):
        RowBlock.from_table(
            scored_table(
                input_ids=[[1, 2, 3], [4], [6, 7, 8, 9]],
                loss_mask=[[False] * 3, [False], [False] * 4],
                student_logprobs=[[0.0] * 3, [0.0], [0.0] * 4],
                sentence_ids=[[0] * 3, [0], [0] * 4],
                teacher_logprobs=[[0.0] * 3, [0.0], [0.0] * 4],
            )
        )
    block = RowBlock.from_table(scored_table(teacher_logprobs=[[0.0, -1.5, -2.5], None, [0.0] * 4]))
    with pytest.raises(ScoredDataError, match=r"row 'b'.*teacher_logprobs is null while"):
        collate(block, [0, 1], packed=True)
    assert collate(block, [0, 2], packed=True).teacher_logprobs is not None


def test_row_block_reads_sliced_tables_and_takes_rows():
    table = scored_table()
    block = RowBlock.from_table(table.slice(1, 2))
    assert block.row_ids == ["b", "c"]
    assert block.input_ids.tolist() == [4, 5, 6, 7, 8, 9]
    assert block.offsets.tolist() == [0, 2, 6]
    taken = RowBlock.from_table(table).take([2, 0])
    assert taken.row_ids == ["c", "a"] and taken.input_ids.tolist() == [6, 7, 8, 9, 1, 2, 3]
    both = RowBlock.concat([block, taken])
    assert both.row_ids == ["b", "c", "c", "a"] and both.offsets[-1] == 13


def test_padded_micro_batch_is_shifted_once():
    mb = collate(RowBlock.from_table(scored_table()), [0, 1], packed=False, pad_id=7)
    assert mb.input_ids.tolist() == [[1, 2, 3], [4, 5, 7]]
    assert mb.position_ids is None and mb.layout is None
    # Per-target tensors are [B, T-1]: position j describes input_ids[:, j + 1].
    assert mb.loss_mask.tolist() == [[True, True], [True, False]]
    assert mb.student_logprobs.tolist() == [[-1.0, -2.0], [-0.5, 0.0]]
    assert mb.teacher_logprobs[1].tolist() == pytest.approx([-0.1, 0.0])
    assert mb.sentence_ids.tolist() == [[0, 1], [0, 0]]
    assert (mb.tokens, mb.slots, mb.loss_tokens) == (5, 6, 3)


def test_packed_micro_batch_restarts_positions_and_views_rows():
    block = RowBlock.from_table(scored_table())
    mb = collate(block, [0, 1, 2], packed=True)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # The target after each row's last token is the next row's first: never a loss token.
    assert mb.loss_mask.tolist() == [[True, True, False, True, False, False, True, True]]
    assert (mb.tokens, mb.slots) == (9, 9)
    padded = collate(block, [0, 1, 2], packed=False)
    # Viewed per row, a packed micro-batch is the right-padded one.
    lay = mb.layout
    assert torch.equal(lay.to_rows(mb.student_logprobs), padded.student_logprobs)
    assert torch.equal(lay.to_rows(mb.teacher_logprobs), padded.teacher_logprobs)
    assert torch.equal(lay.to_rows(mb.loss_mask, fill=False), padded.loss_mask)
    assert torch.equal(lay.to_rows(mb.sentence_ids), padded.sentence_ids)
    back = lay.from_rows(padded.student_logprobs, mb.student_logprobs.shape)
    assert torch.equal(back * mb.loss_mask, mb.student_logprobs * mb.loss_mask)
    # Re-scored log-probs replace the stored ones for the rows named.
    new = {1: np.array([0.0, -9.0], np.float32)}
    assert (
        collate(block, [0, 1, 2], packed=True, student_logprobs=new).student_logprobs[0, 3] == -9.0
    )


def test_the_teacher_mask_travels_into_micro_batches_and_neutralises_weights():
    from raydc.method.weights import preset
    from raydc.train.step import micro_batch_weights

    known = [[True, True, False], [True, True], [True, True, True, True]]
    block = RowBlock.from_table(scored_table(teacher_mask=known))
    for packed in (True, False):
        mb = collate(block, [0, 1, 2], packed=packed)
        w = micro_batch_weights(mb, preset("discord"))
        rows = mb.layout.to_rows(w) if packed else w
        assert rows[0, 1] == 1.0  # token 2 of row a: the teacher said nothing
        assert rows[0, 0] != 1.0 and rows[2, 2] != 1.0
    assert RowBlock.from_table(scored_table()).teacher_mask is None


ENTROPY = [[0.0, 2.0, 0.3], [0.0, 1.0], [0.0, 0.5, 4.0, 0.2]]


def test_the_student_entropy_column_travels_into_micro_batches():
    block = RowBlock.from_table(scored_table(student_entropy=ENTROPY))
    assert block.student_entropy.tolist() == pytest.approx([x for r in ENTROPY for x in r])
    assert RowBlock.from_table(scored_table()).student_entropy is None
    padded = collate(block, [0, 1, 2], packed=False)
    expect = torch.tensor([[2.0, 0.3, 0.0], [1.0, 0.0, 0.0], [0.5, 4.0, 0.2]])
    assert torch.equal(padded.student_entropy, expect)
    packed = collate(block, [0, 1, 2], packed=True)
    assert torch.equal(packed.layout.to_rows(packed.student_entropy), padded.student_entropy)
    assert collate(RowBlock.from_table(scored_table()), [0], packed=True).student_entropy is None
    taken = block.take([2, 0])
    assert taken.student_entropy.tolist() == pytest.approx([0.0, 0.5, 4.0, 0.2, 0.0, 2.0, 0.3])
    both = RowBlock.concat([block, taken])
    assert len(both.student_entropy) == both.offsets[-1] == 16
    assert padded.to("cpu").student_entropy is not None


def test_student_entropy_checks_name_the_row_and_field():
    no_ent = RowBlock.from_table(scored_table().slice(0, 1))
    with_ent = RowBlock.from_table(scored_table(student_entropy=ENTROPY))
    with pytest.raises(ScoredDataError, match=r"row 'a'.*student_entropy is missing"):
        RowBlock.concat([with_ent, no_ent])
    with pytest.raises(ScoredDataError, match=r"row 'b'.*field student_entropy is null"):
        RowBlock.from_table(scored_table(student_entropy=[ENTROPY[0], None, ENTROPY[2]]))
    bad = [[0.0, 2.0, 0.3], [0.0, -1.0], [0.0, 0.5, 4.0, 0.2]]
    with pytest.raises(ScoredDataError, match=r"row 'b'.*student_entropy is not a finite"):
        RowBlock.from_table(scored_table(student_entropy=bad))
    # off the loss tokens (row c's position 1) nothing is checked
    off = [[0.0, 2.0, 0.3], [0.0, 1.0], [0.0, float("nan"), 4.0, 0.2]]
    RowBlock.from_table(scored_table(student_entropy=off))
    with pytest.raises(ScoredDataError, match=r"row 'c'.*student_entropy has 3 values"):
        RowBlock.from_table(scored_table(student_entropy=[*ENTROPY[:2], [0.0, 1.0, 1.0]]))


def test_a_stored_entropy_feeds_the_entropy_gates():
    from raydc.method.weights import WeightConfigError, preset
    from raydc.train.step import micro_batch_weights

    block = RowBlock.from_table(scored_table(student_entropy=ENTROPY))
    for packed in (True, False):
        mb = collate(block, [0, 1, 2], packed=packed)
        w = micro_batch_weights(mb, preset("eaft"))
        rows = mb.layout.to_rows(w) if packed else w
        # eaft: w = min(1, H / 3) on loss tokens (row a: both; b: one; c: the last two)
        assert rows[0, :2].tolist() == pytest.approx([2.0 / 3, 0.1])
        assert rows[1, 0].item() == pytest.approx(1.0 / 3)
        assert rows[2].tolist() == pytest.approx([0.0, 1.0, 0.2 / 3])
    mb = collate(RowBlock.from_table(scored_table()), [0, 1], packed=False)
    with pytest.raises(WeightConfigError, match=r"gate='entropy_power'.*student_ref=current"):
        micro_batch_weights(mb, preset("eaft"))
    # a live entropy (student_ref=current) replaces the stored one
    live = torch.full(mb.loss_mask.shape, 1.5)
    w = micro_batch_weights(mb, preset("eaft"), live_entropy=live)
    assert w[mb.loss_mask].tolist() == pytest.approx([0.5] * 3)
