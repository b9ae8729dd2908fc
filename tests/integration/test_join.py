"""A public teacher-log-prob set in a file of its own (DASD's -Logprob shape: sample_uuid,
the teacher's token_ids and logprobs, in the teacher's own tokenizer), joined to the text
set by sample_uuid in the prepare stage (Ray Data's hash join), then aligned to another
tokenizer's student tokens without losing teacher mass."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.config import from_dict
from raydc.infra.models import load_tokenizer
from raydc.prepare.stage import PrepareError, run_prepare
from tests.conftest import QWEN2_TOKENIZER
from tests.unit.test_ingest import DASD_TEXTS, _dasd_rows

pytestmark = pytest.mark.integration


def _cfg(tmp_path, texts, logprobs):
    return from_dict(
        {
            "run": {"output_dir": str(tmp_path / "run")},
            "data": {
                "path": str(texts),
                "id_key": "sample_uuid",
                "teacher_logprobs_path": str(logprobs),
                "join_key": "sample_uuid",
                "teacher_token_ids_key": "token_ids",
                "teacher_logprobs_key": "logprobs",
                "teacher_tokenizer": QWEN2_TOKENIZER,
                "tokenizer": "tiny-bpe",
                "max_reject_share": 1.0,
            },
        }
    )


@pytest.fixture(scope="module")
def dasd_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dasd")
    ttok = load_tokenizer(QWEN2_TOKENIZER)
    rows = _dasd_rows(ttok, DASD_TEXTS + ["Three plus four is 7.\n#### 7"])
    texts = tmp / "texts.jsonl"
    lines = [json.dumps({k: r[k] for k in ("sample_uuid", "prompt", "response")}) for r in rows]
    lines += [json.dumps({"sample_uuid": "lonely", "prompt": "Q?", "response": "No logprobs."})]
    lines += ['{"sample_uuid": "broken", "prompt": ']  # malformed line
    texts.write_text("\n".join(lines) + "\n")
    lp_rows = [{k: r[k] for k in ("sample_uuid", "token_ids", "logprobs")} for r in rows]
    lp_rows += [{"sample_uuid": "orphan", "token_ids": [1, 2], "logprobs": [-0.1, -0.2]}]
    lp_rows += [{"sample_uuid": "no-lps", "token_ids": [1], "logprobs": None}]
    logprobs = tmp / "logprobs.parquet"
    pq.write_table(pa.Table.from_pylist(lp_rows), logprobs)
    return rows, texts, logprobs


def test_the_logprob_file_joins_by_uuid_and_aligns_without_losing_mass(
    tmp_path, dasd_files, ray_local
):
    rows, texts, logprobs = dasd_files
    out = tmp_path / "prep"
    summary = run_prepare(_cfg(tmp_path, texts, logprobs), out)
    assert summary["rows_in"] == 5 and summary["rows_out"] == 3
    assert summary["rows_rejected"] == 2
    join = summary["teacher_logprobs_join"]
    assert (join["logprob_rows"], join["logprob_rows_bad"], join["matched_rows"]) == (5, 1, 3)
    rejects = {r["row_id"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert rejects["lonely"]["field"] == "sample_uuid"
    assert rejects["lonely"]["reason"].startswith("no_teacher_logprobs: sample_uuid='lonely'")
    (broken,) = [r for r in rejects.values() if r["row_id"] != "lonely"]
    assert broken["reason"].startswith("invalid_json")
    got = {
        r["row_id"]: r
        for f in sorted(out.glob("*.parquet"))
        if f.name != "rejects.parquet"
        for r in pq.read_table(f).to_pylist()
    }
    assert set(got) == {r["sample_uuid"] for r in rows}
    for src in rows:
        g = got[src["sample_uuid"]]
        on_loss = [v for v, m in zip(g["teacher_logprobs"], g["loss_mask"]) if m]
        assert not any(math.isnan(v) for v in on_loss)  # byte-level Qwen2 covers every char
        assert sum(on_loss) == pytest.approx(sum(src["logprobs"]), abs=1e-4)
        assert on_loss[-1] == pytest.approx(src["logprobs"][-1], abs=1e-6)  # end of turn


def test_a_key_in_two_logprob_rows_fails_the_stage(tmp_path, dasd_files, ray_local):
    rows, texts, _ = dasd_files
    dup = tmp_path / "dup.parquet"
    lp = [{k: r[k] for k in ("sample_uuid", "token_ids", "logprobs")} for r in rows]
    pq.write_table(pa.Table.from_pylist(lp + lp[:1]), dup)
    with pytest.raises(PrepareError, match="appears in more than one log-prob row"):
        run_prepare(_cfg(tmp_path, texts, dup), tmp_path / "prep")
