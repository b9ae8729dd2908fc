"""The prepare stage and the transformers backend on a real local Ray: the three source
formats, the reject-share failure, refusing another tokenizer's data, and DASD selection
on rows with given teacher log-probs whose expected winners are known by construction."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.config import from_dict
from raydc.infra.artifacts import data_files
from raydc.infra.schemas import PREPARED_SCHEMA, SELECTION_FILE

pytestmark = pytest.mark.integration

ROWS = [
    {"id": "a", "prompt": "What is 2+3?", "response": "It is 5. Done."},
    {
        "id": "b",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."},
        ],
    },
    {"prompt": "Missing response"},
    {"id": "d", "prompt": "Q?", "response": ["First answer.", "Second answer."]},
]


def _cfg(path, student, **data):
    return from_dict(
        {
            "data": {"path": str(path), **data},
            "score": {
                "student": student,
                "backend": "transformers",
                "engine": {"max_model_len": 256, "cpus_per_engine": 0.5},
            },
        }
    )


def _check_prepared(out, summary, source_name):
    assert summary["rows_in"] == 5 == summary["rows_out"] + summary["rows_rejected"]
    assert summary["rows_rejected"] == 1 and summary["reasons"] == {"missing_key": 1}
    table = pq.read_table(data_files(out))
    assert table.schema.equals(PREPARED_SCHEMA)
    assert sorted(table.column("row_id").to_pylist()) == ["a", "b", "d#0", "d#1"]
    (rej,) = pq.read_table(out / "rejects.parquet").to_pylist()
    assert rej == {
        "row_id": f"{source_name}:2",
        "stage": "prepare",
        "field": "response",
        "reason": "missing_key: 'response' is missing or null",
    }
    assert json.loads((out / "summary.json").read_text())["rows_out"] == 4


def test_prepare_reads_jsonl_parquet_and_hf_folders(tmp_path, tiny_student, ray_local):
    from raydc.prepare.stage import run_prepare

    with open(tmp_path / "t.jsonl", "w") as fh:
        for r in ROWS:
            fh.write(json.dumps(r) + "\n")
    out = tmp_path / "p_jsonl"
    _check_prepared(out, run_prepare(_cfg(tmp_path / "t.jsonl", tiny_student), out), "t.jsonl")

    # Parquet and a saved HF dataset need one schema: messages as a JSON string column.
    flat = [
        {
            **r,
            "messages": json.dumps(r["messages"]) if "messages" in r else None,
            "response": (
                json.dumps(r["response"])
                if isinstance(r.get("response"), list)
                else r.get("response")
            ),
        }
        for r in ROWS
    ]
    flat[3]["response"] = None
    flat[3]["messages"] = None
    flat[3]["response_list"] = ROWS[3]["response"]
    table = pa.Table.from_pylist(flat)
    pq.write_table(table, tmp_path / "t.parquet")
    summary = run_prepare(_cfg(tmp_path / "t.parquet", tiny_student), tmp_path / "p_pq")
    # Row d has its candidates under another key here, so it is rejected: 4 in, 2 out.
    assert summary["rows_in"] == 4 == summary["rows_out"] + summary["rows_rejected"]

    import datasets

    datasets.Dataset.from_list(
        [
            {"prompt": r["prompt"], "response": r["response"]}
            for r in ROWS
            if isinstance(r.get("response"), str)
        ]
    ).save_to_disk(str(tmp_path / "hf"))
    summary = run_prepare(_cfg(tmp_path / "hf", tiny_student), tmp_path / "p_hf")
    assert summary["rows_in"] == 1 == summary["rows_out"]
    table = pq.read_table(data_files(tmp_path / "p_hf"))
    assert table.column("row_id").to_pylist() == ["data-00000-of-00001.arrow:0"]  # no id column


def test_prepare_fails_when_rejects_exceed_the_share(tmp_path, tiny_student, ray_local):
    from raydc.prepare.stage import PrepareError, run_prepare

    with open(tmp_path / "t.jsonl", "w") as fh:
        for r in ROWS:
            fh.write(json.dumps(r) + "\n")
    with pytest.raises(
        PrepareError, match=r"1 of 5 rows rejected \(20.0%\) > data.max_reject_share=10.0%"
    ):
        run_prepare(_cfg(tmp_path / "t.jsonl", tiny_student, max_reject_share=0.1), tmp_path / "o")
    assert pq.read_table(tmp_path / "o" / "rejects.parquet").num_rows == 1  # still inspectable


def test_score_refuses_data_of_another_tokenizer(tmp_path, tiny_student, ray_local):
    from raydc.engines.base import ScoreError
    from raydc.prepare.stage import run_prepare
    from raydc.score.stage import run_score

    with open(tmp_path / "t.jsonl", "w") as fh:
        fh.write(json.dumps(ROWS[0]) + "\n")
    cfg = _cfg(tmp_path / "t.jsonl", tiny_student, tokenizer="tiny-wordpiece")
    run_prepare(cfg, tmp_path / "p")
    with pytest.raises(ScoreError, match="not the student's tokenizer"):
        run_score(cfg, tmp_path / "p", tmp_path / "s")


def test_score_refuses_a_mix_of_rows_with_and_without_teacher_logprobs(
    tmp_path, tiny_student, ray_local
):
    """Without score.teacher to fill the gaps, a data set where some rows give teacher
    log-probs and others do not is refused before any engine starts, naming a row."""
    from raydc.engines.base import ScoreError
    from raydc.infra.models import load_tokenizer
    from raydc.prepare.parse import parse_row
    from raydc.prepare.render import prepare_candidate
    from raydc.prepare.stage import run_prepare
    from raydc.score.stage import run_score

    tok = load_tokenizer(tiny_student)
    cfg = _cfg(tmp_path / "t.jsonl", tiny_student)
    with open(tmp_path / "t.jsonl", "w") as fh:
        for k in range(3):
            row = {"id": f"r{k}", "prompt": f"Say {k}", "response": "One. Two."}
            if k != 1:
                (cand,) = parse_row(row, cfg.data, "x")
                row["teacher_logprobs"] = [-1.0] * sum(
                    prepare_candidate(tok, cand, cfg.data).loss_mask
                )
            fh.write(json.dumps(row) + "\n")
    assert run_prepare(cfg, tmp_path / "p")["given_teacher_rows"] == 2
    with pytest.raises(ScoreError, match=r"row 'r1': no teacher_logprobs, but 2 of 3 rows"):
        run_score(cfg, tmp_path / "p", tmp_path / "s")
    assert not (tmp_path / "s").exists()  # refused before the stage wrote anything


def test_dasd_selection_keeps_the_expected_candidates(tmp_path, tiny_student, ray_local):
    """Per prompt three candidates; the teacher's given log-probs make one of them
    far likelier under the teacher than under the student in most sentences."""
    from raydc.infra.models import load_tokenizer
    from raydc.prepare.parse import parse_row
    from raydc.prepare.render import prepare_candidate
    from raydc.prepare.stage import run_prepare
    from raydc.score.stage import run_score
    from raydc.select import run_select

    tok = load_tokenizer(tiny_student)
    cfg0 = _cfg(tmp_path / "t.jsonl", tiny_student)
    responses = ["One. Two. Three.", "Four. Five. Six.", "Seven. Eight. Nine."]
    expected = {"p0": 1, "p1": 2, "p2": 0}
    with open(tmp_path / "t.jsonl", "w") as fh:
        for pid, best in expected.items():
            for k, resp in enumerate(responses):
                row = {
                    "id": f"{pid}-{k}",
                    "prompt_id": pid,
                    "prompt": f"Say {pid}",
                    "response": resp,
                }
                (cand,) = parse_row(row, cfg0.data, "x")
                n = sum(prepare_candidate(tok, cand, cfg0.data).loss_mask)
                # log p_T = 0 (certain) beats any student log-prob; -30 loses to all.
                row["teacher_logprobs"] = [0.0 if k == best else -30.0] * n
                fh.write(json.dumps(row) + "\n")
    run_prepare(cfg0, tmp_path / "p")
    scored = run_score(cfg0, tmp_path / "p", tmp_path / "s")
    assert scored["rows_out"] == 9 and scored["teacher_rows"] == 9
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["backend"] == "transformers" and manifest["vllm_version"] is None
    for top_k, want in ((1, {f"{p}-{b}" for p, b in expected.items()}), (2, None)):
        cfg0.select.top_k = top_k
        out = tmp_path / f"sel{top_k}"
        summary = run_select(cfg0, tmp_path / "s", out)
        kept = set(pq.read_table(out / SELECTION_FILE).column("row_id").to_pylist())
        if want is not None:
            assert kept == want
        else:
            assert len(kept) == 6 and {f"{p}-{b}" for p, b in expected.items()} <= kept
        assert summary["rows_in"] == 9 == summary["rows_out"] + summary["rows_rejected"]
        rejects = pq.read_table(out / "rejects.parquet").to_pylist()
        assert {r["row_id"] for r in rejects} == {
            f"{p}-{k}" for p in expected for k in range(3)
        } - kept
        assert all(r["reason"].startswith("not_selected") for r in rejects)
        assert json.loads((out / "manifest.json").read_text())["selection"]["top_k"] == top_k
