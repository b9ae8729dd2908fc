"""A public teacher-log-prob set in a file of its own (DASD's layout: the text set keyed
``uuid``, the -Logprob set keyed ``sample_uuid`` with the teacher's token_ids and
logprobs, in the teacher's own tokenizer), joined in the prepare stage (Ray Data's hash
join), then aligned to another tokenizer's student tokens without losing teacher mass.
Bad cells on either side are their row's reject naming the field; repeated row ids and
a prepare that keeps nothing fail the stage."""

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
from tests.unit.test_prepare import DASD_TEXTS, _dasd_rows

pytestmark = pytest.mark.integration


def _cfg(tmp_path, texts, logprobs):
    return from_dict(
        {
            "run": {"output_dir": str(tmp_path / "run")},
            "data": {
                "path": str(texts),
                "prompt_key": "input",
                "response_key": "output",
                "id_key": "uuid",
                "teacher_logprobs_path": str(logprobs),
                "join_key": "uuid",
                "teacher_join_key": "sample_uuid",
                "teacher_token_ids_key": "token_ids",
                "teacher_logprobs_key": "logprobs",
                "teacher_tokenizer": QWEN2_TOKENIZER,
                "tokenizer": "tiny-bpe",
                "max_reject_share": 1.0,
            },
        }
    )


def _texts_parquet(path, rows: list[dict]) -> None:
    """DASD's text set (every field a string) as Parquet; ``bytes`` values are written
    unchecked into the string columns, as a writer that does not validate UTF-8 would."""
    cols = {
        k: pa.array(
            [r[k].encode() if isinstance(r[k], str) else r[k] for r in rows], pa.binary()
        ).view(pa.string())
        for k in ("uuid", "input", "output", "domain")
    }
    pq.write_table(pa.table(cols), path)


@pytest.fixture(scope="module")
def dasd_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dasd")
    ttok = load_tokenizer(QWEN2_TOKENIZER)
    rows = _dasd_rows(ttok, DASD_TEXTS + ["Three plus four is 7.\n#### 7"])
    text = [
        {"uuid": r["sample_uuid"], "input": r["prompt"], "output": r["response"], "domain": "math"}
        for r in rows
    ]
    extra = ["lonely", "bad-id", "null-lps", "sentinel", "api", "bad-utf8"]
    text += [{"uuid": u, "input": "Q?", "output": "Two.", "domain": "math"} for u in extra]
    text[-1]["output"] = b"caf\xe9"  # not UTF-8, in a string column
    texts = tmp / "texts.parquet"
    _texts_parquet(texts, text)
    two = ttok("Two.", add_special_tokens=False)["input_ids"]  # "Two", "."
    lp_rows = [{k: r[k] for k in ("sample_uuid", "token_ids", "logprobs")} for r in rows]
    lp_rows += [
        {"sample_uuid": "orphan", "token_ids": [1, 2], "logprobs": [-0.1, -0.2]},
        {"sample_uuid": "bad-id", "token_ids": [two[0], "abc"], "logprobs": [-0.5, -0.25]},
        {"sample_uuid": "null-lps", "token_ids": two, "logprobs": None},
        {"sample_uuid": "sentinel", "token_ids": two, "logprobs": [-0.5, -1e30]},
        {"sample_uuid": "bad-utf8", "token_ids": two, "logprobs": [-0.5, -0.25]},
        {  # an API response's log-probs beside DASD's lists (auto: each row's own shape)
            "sample_uuid": "api",
            "logprobs": {
                "content": [
                    {"token": "Two", "logprob": -0.5, "bytes": list(b"Two")},
                    {"token": ".", "logprob": -0.25, "bytes": list(b".")},
                ]
            },
        },
        {"token_ids": two, "logprobs": [-0.5, -0.25]},  # no key: not joinable
    ]
    logprobs = tmp / "logprobs.jsonl"
    lines = [json.dumps(r) for r in lp_rows] + ['{"sample_uuid": "broken", ']
    logprobs.write_text("\n".join(lines) + "\n")
    return rows, texts, logprobs


def _kept(out) -> dict:
    return {
        r["row_id"]: r
        for f in sorted(out.glob("*.parquet"))
        if f.name != "rejects.parquet"
        for r in pq.read_table(f).to_pylist()
    }


def test_uuid_joins_sample_uuid_aligns_without_losing_mass_and_rejects_bad_cells(
    tmp_path, dasd_files, ray_local
):
    rows, texts, logprobs = dasd_files
    out = tmp_path / "prep"
    summary = run_prepare(_cfg(tmp_path, texts, logprobs), out)
    assert summary["rows_in"] == 9 == summary["rows_out"] + summary["rows_rejected"]
    assert summary["rows_out"] == 5
    join = summary["teacher_logprobs_join"]
    assert (join["key"], join["teacher_key"]) == ("uuid", "sample_uuid")
    # 3 + orphan + 5 extra rows have a key; the keyless row and the broken line do not
    assert (join["logprob_rows"], join["logprob_rows_bad"], join["matched_rows"]) == (11, 2, 8)
    rejects = {r["row_id"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert {k: (r["field"], r["reason"].split(":")[0]) for k, r in rejects.items()} == {
        "lonely": ("uuid", "no_teacher_logprobs"),
        "bad-id": ("token_ids", "wrong_type"),
        "null-lps": ("logprobs", "missing_key"),
        "bad-utf8": ("output", "undecodable"),
    }
    assert rejects["lonely"]["reason"].startswith(
        "no_teacher_logprobs: uuid='lonely': no row with sample_uuid='lonely'"
    )
    got = _kept(out)
    assert set(got) == {r["sample_uuid"] for r in rows} | {"sentinel", "api"}
    for src in rows:
        g = got[src["sample_uuid"]]
        on_loss = [v for v, m in zip(g["teacher_logprobs"], g["loss_mask"]) if m]
        assert not any(math.isnan(v) for v in on_loss)  # byte-level Qwen2 covers every char
        assert sum(on_loss) == pytest.approx(sum(src["logprobs"]), abs=1e-4)
        assert on_loss[-1] == pytest.approx(src["logprobs"][-1], abs=1e-6)  # end of turn
    # -1e30 is missing, never a value: "." unknown, and no teacher end-of-turn token
    sentinel = got["sentinel"]
    on_loss = [v for v, m in zip(sentinel["teacher_logprobs"], sentinel["loss_mask"]) if m]
    assert on_loss[0] == pytest.approx(-0.5) and math.isnan(on_loss[1]) and math.isnan(on_loss[2])
    assert summary["teacher_logprobs_missing"]["below_floor"] == 1
    api = got["api"]  # "Two", "." placed from their bytes; the API sends no stop token
    on_loss = [v for v, m in zip(api["teacher_logprobs"], api["loss_mask"]) if m]
    assert on_loss[:2] == pytest.approx([-0.5, -0.25]) and math.isnan(on_loss[2])


def test_a_uuid_on_two_trace_rows_fails_the_stage_naming_it(tmp_path, dasd_files, ray_local):
    """Before, both rows passed prepare and a whole scoring pass, and select refused them
    (with select off they trained twice)."""
    rows, _, logprobs = dasd_files
    texts = tmp_path / "texts.parquet"
    text = [{"uuid": r["sample_uuid"], "input": "Q?", "output": r["response"]} for r in rows]
    text.append({**text[1], "input": "Another question?"})
    _texts_parquet(texts, [{**t, "domain": "math"} for t in text])
    with pytest.raises(PrepareError, match=r"row id 'u1' appears 2 times.*data.id_key='uuid'"):
        run_prepare(_cfg(tmp_path, texts, logprobs), tmp_path / "prep")


def test_a_prepare_that_keeps_no_row_fails_naming_why(tmp_path, ray_local):
    """Before, an empty source was marked done and score said "run the prepare stage
    first", which a rerun cannot fix."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = from_dict(
        {
            "run": {"output_dir": str(tmp_path / "run")},
            "data": {"path": str(empty), "tokenizer": "tiny-bpe"},
        }
    )
    with pytest.raises(PrepareError, match=r"kept no rows: 0 in, 0 rejected.*rejects.parquet"):
        run_prepare(cfg, tmp_path / "prep")


def test_a_key_in_two_logprob_rows_fails_the_stage(tmp_path, dasd_files, ray_local):
    rows, texts, _ = dasd_files
    dup = tmp_path / "dup.parquet"
    lp = [{k: r[k] for k in ("sample_uuid", "token_ids", "logprobs")} for r in rows]
    pq.write_table(pa.Table.from_pylist(lp + lp[:1]), dup)
    with pytest.raises(PrepareError, match="appears in more than one log-prob row"):
        run_prepare(_cfg(tmp_path, texts, dup), tmp_path / "prep")
