"""The stage-folder contract: the one hashing rule and the common head of a stage summary."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.infra.artifacts import (
    PARTS_DIR,
    REJECTS_FILE,
    TOKENIZER_FILES,
    fingerprint_paths,
    summarize_parts,
    tokenizer_fingerprint,
    write_parts,
)


def test_fingerprint_paths_hashes_several_files_and_only_named_ones(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    both = fingerprint_paths(str(a), str(b))
    assert both == fingerprint_paths(a, b) and both != fingerprint_paths(a)
    assert fingerprint_paths(b, a) != both  # the order is part of the identity
    b.write_bytes(b"Second")  # same size, other bytes: small files are hashed whole
    assert fingerprint_paths(a, b) != both
    assert fingerprint_paths(None, "") is None

    tok = tmp_path / "model"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "model.safetensors").write_bytes(b"weights")
    fp = tokenizer_fingerprint(tok)
    assert fp == fingerprint_paths(tok, names=TOKENIZER_FILES)
    (tok / "model.safetensors").write_bytes(b"other weights")
    assert tokenizer_fingerprint(tok) == fp  # the weights are not the tokenizer
    assert fingerprint_paths(tok) != fingerprint_paths(tok, names=TOKENIZER_FILES)
    # a folder with no tokenizer files hashes its name, like a hub name
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tokenizer_fingerprint(empty) != tokenizer_fingerprint(tmp_path / "empty2")


def test_summarize_parts_gives_the_summary_head_and_refuses_lost_rows(tmp_path):
    out = tmp_path / "stage"
    (out / PARTS_DIR).mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), out / "part-0.parquet")
    rejects = [{"row_id": "r3", "field": "text", "reason": "too_long: 9 tokens"}]
    write_parts(str(out / PARTS_DIR), "k0", "prepare", rejects, {"rows_in": 3, "tokens": 7})
    head, totals = summarize_parts(out, "prepare", error=ValueError)
    assert head == {
        "stage": "prepare",
        "rows_in": 3,
        "rows_out": 2,
        "rows_rejected": 1,
        "reasons": {"too_long": 1},
    }
    assert totals["tokens"] == 7 and (out / REJECTS_FILE).exists()

    (out / PARTS_DIR).mkdir()
    write_parts(str(out / PARTS_DIR), "k0", "prepare", [], {"rows_in": 5})
    with pytest.raises(ValueError, match="prepare lost rows: 5 in != 2 out \\+ 0 rejected"):
        summarize_parts(out, "prepare", error=ValueError)
