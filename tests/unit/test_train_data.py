"""raydc.train.data: the scored-folder checks, the student check, the store format and
selections, the held-out split."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from raydc.train.data import (
    ScoredDataError,
    StoreManifest,
    check_schema,
    check_student,
    is_val_key,
    open_store,
    scored_files,
)
from tests.unit.test_train_batch import scored_table


def test_scored_files_skip_rejects_and_schema_names_missing_columns(tmp_path):
    import pyarrow.parquet as pq

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
    pq.write_table(scored_table(), tmp_path / "x.parquet")
    with pytest.raises(ScoredDataError, match=r"x.parquet: scored column\(s\) \['num_tokens'\]"):
        check_schema([str(tmp_path / "x.parquet")])


def test_other_students_scores_are_refused(tmp_path):
    from raydc.infra.artifacts import fingerprint_paths

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "config.json").write_text(json.dumps({"x": 1}))
    (b / "config.json").write_text(json.dumps({"x": 2}))
    data = {"student": {"path": str(a), "fingerprint": fingerprint_paths(a)}}
    manifest = StoreManifest.parse(data, tmp_path / "manifest.json")
    assert check_student(manifest, str(a)) == fingerprint_paths(a)
    with pytest.raises(ScoredDataError, match="made with student .* re-score"):
        check_student(manifest, str(b))
    # A fingerprint given by the caller is used as is (a sweep computes it once).
    with pytest.raises(ScoredDataError, match="fingerprint nope"):
        check_student(manifest, str(a), fp="nope")


def test_val_split_is_deterministic_and_near_the_share():
    keys = [f"p{i}" for i in range(4000)]
    picked = [is_val_key(k, 0.1, 0) for k in keys]
    assert picked == [is_val_key(k, 0.1, 0) for k in keys]
    assert 0.08 < sum(picked) / len(keys) < 0.12
    assert not any(is_val_key(k, 0.0, 0) for k in keys)


def _store(folder, manifest, rows=("a", "b", "c")):
    import pyarrow.parquet as pq

    folder.mkdir()
    pq.write_table(scored_table(row_id=list(rows)), folder / "part-0.parquet")
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_store_newer_than_this_raydc_is_refused_and_format_1_is_read(tmp_path):
    from raydc.infra.schemas import STORE_FORMAT

    _store(tmp_path / "new", {"store": {"format": STORE_FORMAT + 1}})
    with pytest.raises(ScoredDataError, match=f"format {STORE_FORMAT + 1} is newer.*re-score"):
        open_store(tmp_path / "new")
    _store(tmp_path / "old", {"student": {}})  # no `store` entry: written before format 2
    store = open_store(tmp_path / "old")
    assert store.keep is None and [f.rsplit("/", 1)[1] for f in store.files] == ["part-0.parquet"]


def test_a_selection_reads_its_source_and_refuses_a_changed_one(tmp_path):
    import os

    import pyarrow.parquet as pq

    from raydc.infra.schemas import SELECTION_FILE, SELECTION_SCHEMA

    _store(tmp_path / "score", {"store": {"format": 2}})
    sel = tmp_path / "select"
    sel.mkdir()
    pq.write_table(
        pa.table({"row_id": ["c", "a"], "prompt_id": ["p", "q"], "score": [0.5, 0.25]}).cast(
            SELECTION_SCHEMA
        ),
        sel / SELECTION_FILE,
    )
    size = os.path.getsize(tmp_path / "score" / "part-0.parquet")
    manifest = {
        "store": {"format": 2},
        "selection": {"source": "../score", "source_files": {"part-0.parquet": size}},
    }
    (sel / "manifest.json").write_text(json.dumps(manifest))
    store = open_store(sel)
    assert store.keep == frozenset({"a", "c"})
    assert store.files == [str((tmp_path / "score" / "part-0.parquet").resolve())]
    # The store was scored again with other rows after the selection: refused.
    pq.write_table(
        scored_table(row_id=["a", "b", "c"], input_ids=[[1] * 9, [4, 5], [6]]),
        tmp_path / "score" / "part-0.parquet",
    )
    assert os.path.getsize(tmp_path / "score" / "part-0.parquet") != size
    with pytest.raises(ScoredDataError, match=r"changed since .* 1 file\(s\) differ, part-0"):
        open_store(sel)
    del manifest["selection"]["source"]
    (sel / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ScoredDataError, match="selection.source is missing"):
        open_store(sel)
