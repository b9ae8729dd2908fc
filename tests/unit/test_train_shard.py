"""raydc.train.shard: pieces, their assignment to ranks by tokens, a rank's shard read window
by window, and the epoch plan a restart re-makes exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.train.data import ScoredDataError
from raydc.train.shard import RankShard, WindowReader, assign_pieces, build_index, plan_epoch

COLUMNS = ["row_id", "input_ids", "loss_mask", "student_logprobs", "prompt_id"]


def _write_store(folder, n_rows=600, n_files=3, row_group_size=50, seed=0) -> list[str]:
    """Scored-schema Parquet with long-tailed row lengths (lognormal, 4-400 tokens)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.5, 1.0, size=n_rows).astype(int), 4, 400)
    files = []
    per = n_rows // n_files
    for f in range(n_files):
        rows = range(f * per, (f + 1) * per)
        t = pa.table(
            {
                "row_id": [f"r{i}" for i in rows],
                "prompt_id": [f"p{i // 2}" for i in rows],
                "input_ids": [list(range(lengths[i])) for i in rows],
                "loss_mask": [[False] + [True] * (lengths[i] - 1) for i in rows],
                "student_logprobs": [[0.0] + [-1.0] * (lengths[i] - 1) for i in rows],
                "num_tokens": pa.array([int(lengths[i]) for i in rows], pa.int32()),
            }
        )
        path = str(folder / f"part-{f}.parquet")
        pq.write_table(t, path, row_group_size=row_group_size)
        files.append(path)
    return files


def _rows_of(shard: RankShard) -> list[str]:
    return shard.read_pieces(list(range(len(shard.pieces)))).row_ids


def test_pieces_are_disjoint_complete_and_balanced_by_tokens(tmp_path):
    files = _write_store(tmp_path)
    total = sum(pq.read_table(f, columns=["num_tokens"]).column(0).to_numpy().sum() for f in files)
    for world in (1, 2, 3, 4):
        ranks = assign_pieces(build_index(files), world)
        assert ranks == assign_pieces(build_index(files), world)  # deterministic
        shards = [RankShard.open(p, COLUMNS) for p in ranks]
        ids = [_rows_of(s) for s in shards]
        flat = [r for x in ids for r in x]
        assert sorted(flat) == sorted(f"r{i}" for i in range(600))  # all rows, once each
        tokens = [int(s.lengths.sum()) for s in shards]
        assert sum(tokens) == total
        # Balanced by tokens, not rows: each end of a range within one row (<= 400 tokens).
        assert max(tokens) - min(tokens) <= 2 * 400, (world, tokens)


def test_each_rank_reads_about_its_share_of_the_bytes(tmp_path):
    # Row groups of 10 rows: 30 a rank; a range may cut the group at each of its ends.
    files = _write_store(tmp_path, n_rows=1200, row_group_size=10)
    store = sum(g.bytes for g in build_index(files))
    world = 4
    for pieces in assign_pieces(build_index(files), world):
        shard = RankShard.open(pieces, COLUMNS)
        plan = plan_epoch(shard, 0, 0, 0, 512, 2_000, packing=True)
        reader = WindowReader(shard, plan)
        for k in range(plan.num_micro_batches):
            reader.get(k)
        # One epoch plus the index pass: about a quarter of the store, never all of it.
        assert shard.bytes_read <= 1.2 * store / world, (shard.bytes_read, store)


def test_one_coarse_row_group_is_cut_between_ranks(tmp_path):
    files = _write_store(tmp_path, n_rows=300, n_files=1, row_group_size=300)
    (a,), (b,) = assign_pieces(build_index(files), 2)
    assert (a.row_group, b.row_group) == (0, 0) and (a.start, a.stop, b.stop) == (0, b.start, 300)
    assert abs(a.tokens - b.tokens) <= 400  # within one row's length
    ids = [_rows_of(RankShard.open([p], COLUMNS)) for p in (a, b)]
    assert not set(ids[0]) & set(ids[1]) and len(ids[0]) + len(ids[1]) == 300


def test_epoch_plan_covers_train_rows_once_and_is_remade_exactly(tmp_path):
    files = _write_store(tmp_path)
    (pieces,) = assign_pieces(build_index(files), 1)
    shard = RankShard.open(pieces, COLUMNS, val_share=0.2, seed=3)
    assert 0.1 < shard.is_val.mean() < 0.3
    plan = plan_epoch(
        shard, epoch=2, rank=0, seed=1, micro_batch_tokens=300, window_tokens=3_000, packing=True
    )
    rows = [r for w in plan.windows for mb in w.micro_batches for r in mb]
    assert sorted(rows) == sorted(shard.train_rows.tolist())
    for w in plan.windows:
        for mb in w.micro_batches:
            assert len(mb) == 1 or shard.lengths[mb].sum() <= 300
    again = plan_epoch(shard, 2, 0, 1, 300, 3_000, packing=True)
    assert [w.micro_batches for w in again.windows] == [w.micro_batches for w in plan.windows]
    other = plan_epoch(shard, 3, 0, 1, 300, 3_000, packing=True)
    assert [w.micro_batches for w in other.windows] != [w.micro_batches for w in plan.windows]
    # A prompt's candidates are all held out or all trained.
    block = shard.read_pieces(list(range(len(pieces))))
    val_ids = {block.row_ids[i] for i in np.nonzero(shard.is_val)[0]}
    prompts = {}
    for rid in block.row_ids:
        prompts.setdefault(f"p{int(rid[1:]) // 2}", set()).add(rid in val_ids)
    assert all(len(v) == 1 for v in prompts.values())


def test_window_reader_holds_one_window_and_resumes_mid_epoch(tmp_path):
    files = _write_store(tmp_path)
    (pieces,) = assign_pieces(build_index(files), 1)
    shard = RankShard.open(pieces, COLUMNS)
    plan = plan_epoch(shard, 0, 0, 0, 400, 2_000, packing=True)
    assert len(plan.windows) > 3
    all_ids = _rows_of(shard)  # shard order
    reader = WindowReader(shard, plan)
    seen, largest = [], 0
    for k in range(plan.num_micro_batches):
        block, local, rows = reader.get(k)
        largest = max(largest, int(block.offsets[-1]))
        assert [block.row_ids[i] for i in local] == [all_ids[r] for r in rows]
        seen.append(rows)
    # Memory is bounded by a window (its tokens plus at most one piece past the target).
    biggest_piece = max(p.tokens for p in pieces)
    assert largest <= 2_000 + biggest_piece
    # A restarted reader asked for micro-batch k gives exactly the same rows.
    k = plan.num_micro_batches // 2 + 1
    block, local, rows = WindowReader(shard, plan_epoch(shard, 0, 0, 0, 400, 2_000, True)).get(k)
    assert rows == seen[k]
    assert shard.lengths[rows].tolist() == block.lengths()[local].tolist()


def test_an_inconsistent_length_column_is_refused(tmp_path):
    t = pa.table(
        {
            "row_id": ["a"],
            "input_ids": [[1, 2, 3]],
            "loss_mask": [[False, True, True]],
            "student_logprobs": [[0.0, -1.0, -1.0]],
            "num_tokens": pa.array([4], pa.int32()),
        }
    )
    pq.write_table(t, tmp_path / "x.parquet")
    (pieces,) = assign_pieces(build_index([str(tmp_path / "x.parquet")]), 1)
    shard = RankShard.open(pieces, ["row_id", "input_ids", "loss_mask", "student_logprobs"])
    with pytest.raises(ScoredDataError, match="num_tokens does not match"):
        shard.read_pieces([0])


def test_a_selection_indexes_only_its_kept_rows(tmp_path):
    files = _write_store(tmp_path)
    rng = np.random.default_rng(3)
    keep = frozenset(f"r{i}" for i in sorted(rng.choice(600, size=137, replace=False)))
    lengths = {
        r: n
        for f in files
        for r, n in zip(*pq.read_table(f, columns=["row_id", "num_tokens"]).to_pydict().values())
    }
    for world in (1, 3):
        shards = [
            RankShard.open(p, COLUMNS) for p in assign_pieces(build_index(files, keep), world)
        ]
        got = [r for s in shards for r in _rows_of(s)]
        assert sorted(got) == sorted(keep)  # the kept rows, once each, no others
        assert sum(int(s.lengths.sum()) for s in shards) == sum(lengths[r] for r in keep)
        for s in shards:  # the block read through the selection holds those rows' tokens
            block = s.read_pieces(list(range(len(s.pieces))))
            assert block.lengths().tolist() == [lengths[r] for r in block.row_ids]
    with pytest.raises(ScoredDataError, match="keeps 2 row ids but the scored store holds 1"):
        build_index(files, frozenset({"r1", "nope"}))


def test_the_plan_does_not_follow_how_ray_data_laid_the_store_out(tmp_path):
    """The same rows in the same groups, written in another file and group order (as two
    scorings of one data set can be): every rank gets the same rows and the same plan."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    files = _write_store(a, n_rows=300, n_files=1, row_group_size=50)
    t = pq.read_table(files[0])
    groups = [t.slice(i, 50) for i in range(0, 300, 50)]
    # b: groups reversed, split over two files whose names sort the other way round
    pq.write_table(pa.concat_tables(groups[3:][::-1]), str(b / "part-0.parquet"), row_group_size=50)
    pq.write_table(pa.concat_tables(groups[:3][::-1]), str(b / "part-1.parquet"), row_group_size=50)
    plans = []
    for folder in (a, b):
        shards = [
            RankShard.open(p, COLUMNS, val_share=0.2, seed=3)
            for p in assign_pieces(build_index(sorted(map(str, folder.glob("*.parquet")))), 2)
        ]
        rows = [_rows_of(s) for s in shards]
        windows = [
            [
                [[_rows_of(s)[i] for i in mb] for mb in w.micro_batches]
                for w in plan_epoch(s, 0, r, 1, 300, 3_000, packing=True).windows
            ]
            for r, s in enumerate(shards)
        ]
        plans.append((rows, windows))
    assert plans[0] == plans[1]
    assert sorted(plans[0][0][0] + plans[0][0][1]) == sorted(t.column("row_id").to_pylist())
