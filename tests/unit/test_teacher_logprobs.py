"""Teacher log-probs in the shapes users have them (``raydc.prepare.parse.read_teacher``):
lists, OpenAI API ``logprobs`` and vLLM dumps, in the traces or joined in from a file of
their own. A sentinel or impossible value is missing (NaN: the teacher mask's neutral
weight), never a value; a bad cell, or a Parquet string cell that is not UTF-8, is that
row's reject naming its field; repeated row ids fail the stage. Real tokenizers: the
byte-level Qwen2 one as the teacher's, tiny-bpe as the student's. Expected values are
worked out by hand in the comments."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.config import ConfigError, DataConfig, from_dict
from raydc.infra.artifacts import collect_parts, prepare_out_dir
from raydc.infra.models import load_tokenizer
from raydc.prepare.join import JOIN, TEACHER_COLUMNS, keyed_logprobs
from raydc.prepare.stage import PrepareError, check_unique_ids, prepare_batch
from tests.conftest import QWEN2_TOKENIZER

NAN = float("nan")


@pytest.fixture(scope="module")
def qwen2():
    return load_tokenizer(QWEN2_TOKENIZER)


def _raw(lines: list[bytes], name="traces.jsonl") -> pa.Table:
    return pa.table(
        {
            "_raw": pa.array(lines, pa.binary()),
            "_source": pa.array([name] * len(lines)),
            "_index": pa.array(range(len(lines)), pa.int64()),
        }
    )


def _tagged(table: pa.Table, name="traces.parquet") -> pa.Table:
    table = table.append_column("_source", pa.array([name] * table.num_rows))
    return table.append_column("_index", pa.array(range(table.num_rows), pa.int64()))


def _prepare(table: pa.Table, dcfg: DataConfig, tmp_path) -> tuple[dict, dict, dict]:
    """prepare_batch on one batch: (kept rows by id, rejects by id, summed counts)."""
    out = prepare_out_dir(tmp_path / "prep")
    kept = prepare_batch(table, "tiny-bpe", dcfg, str(out / "_parts"))
    totals, rejects = collect_parts(out, "prepare")
    assert totals["rows_in"] == kept.num_rows + rejects.num_rows  # nothing lost
    return (
        {r["row_id"]: r for r in kept.to_pylist()},
        {r["row_id"]: r for r in rejects.to_pylist()},
        totals,
    )


def _on_loss(row: dict) -> list[float]:
    return [v for v, m in zip(row["teacher_logprobs"], row["loss_mask"]) if m]


def _same(got: list[float], want: list[float]) -> bool:
    """Equal within float32 storage, NaN where NaN is expected."""
    return len(got) == len(want) and all(
        (math.isnan(w) and math.isnan(g)) or (not math.isnan(g) and abs(g - w) < 1e-6)
        for g, w in zip(got, want)
    )


def _lines(rows: list[dict]) -> list[bytes]:
    return [json.dumps(r).encode() for r in rows]


# ----------------------------------------------------------------------------- missing values


def test_sentinels_and_impossible_log_probs_are_missing_never_values(tmp_path):
    """Student-tokenizer log-probs, one per loss token ("Two." under tiny-bpe: "Two", "."
    and <|im_end|>). -9999 (OpenAI's sentinel), -1e30, NaN, inf, null and 0.5 become NaN
    (unknown: the score stage gives them a neutral weight); 0.0005 is within the positive
    tolerance and is 0. Each is counted by kind in the summary's counts."""
    rows = [
        {
            "id": "r1",
            "prompt": "hi",
            "response": "Two.",
            "teacher_logprobs": [-0.5, -9999.0, -0.25],
        },
        {"id": "r2", "prompt": "hi", "response": "Two.", "teacher_logprobs": [NAN, -0.5, math.inf]},
        {"id": "r3", "prompt": "hi", "response": "Two.", "teacher_logprobs": [-0.5, 0.5, None]},
        {"id": "r4", "prompt": "hi", "response": "Two.", "teacher_logprobs": [-0.5, 5e-4, -1e30]},
    ]
    kept, rejects, totals = _prepare(_raw(_lines(rows)), DataConfig(), tmp_path)
    assert not rejects
    assert _same(_on_loss(kept["r1"]), [-0.5, NAN, -0.25])
    assert _same(_on_loss(kept["r2"]), [NAN, -0.5, NAN])
    assert _same(_on_loss(kept["r3"]), [-0.5, NAN, NAN])
    assert _same(_on_loss(kept["r4"]), [-0.5, 0.0, NAN])
    assert totals["teacher_logprobs_missing"] == {
        "null": 1,
        "not_finite": 2,
        "below_floor": 2,
        "positive": 1,
    }


# ----------------------------------------------------------------------------- bad cells


def test_a_parquet_string_cell_that_is_not_utf8_rejects_only_its_row(tmp_path):
    """Invalid UTF-8 in one string cell (a writer that did not check) used to fail the
    batch with UnicodeDecodeError; now that row is rejected naming the column, whether the
    cell is the prompt, the response, the id or a message nested in a list of structs."""
    bad = b"caf\xe9"
    flat = pa.table(
        {
            "id": pa.array([b"a", b"b", b"c", bad], pa.binary()).view(pa.string()),
            "prompt": pa.array([b"Q?", bad, b"Q?", b"Q?"], pa.binary()).view(pa.string()),
            "response": pa.array([b"Two.", b"Two.", bad, b"Two."], pa.binary()).view(pa.string()),
        }
    )
    pq.write_table(flat, tmp_path / "t.parquet")
    kept, rejects, _ = _prepare(
        _tagged(pq.read_table(tmp_path / "t.parquet")), DataConfig(), tmp_path
    )
    assert set(kept) == {"a"}
    assert {k: (r["field"], r["reason"].split(":")[0]) for k, r in rejects.items()} == {
        "b": ("prompt", "undecodable"),
        "c": ("response", "undecodable"),
        "traces.parquet:3": ("id", "undecodable"),  # no usable id: its position names it
    }

    msg = pa.struct([("role", pa.binary()), ("content", pa.binary())])
    chat = pa.array(
        [
            [{"role": b"user", "content": b"Q?"}, {"role": b"assistant", "content": b"Two."}],
            [{"role": b"user", "content": b"Q?"}, {"role": b"assistant", "content": bad}],
        ],
        pa.list_(msg),
    ).view(pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
    kept, rejects, _ = _prepare(_tagged(pa.table({"messages": chat})), DataConfig(), tmp_path)
    assert set(kept) == {"traces.parquet:0"}
    (r,) = rejects.values()
    assert (r["field"], r["reason"].split(":")[0]) == ("messages[1].content", "undecodable")


def _join_in_process(traces: pa.Table, keyed: pa.Table, key: str) -> pa.Table:
    """What Ray Data's left outer join hands the prepare map: each trace row with the
    teacher columns of the log-prob row of its key (nulls when there is none)."""
    by_key = {r[JOIN]: r for r in keyed.to_pylist()}
    rows = []
    for r in traces.to_pylist():
        k = json.loads(r["_raw"]).get(key)
        match = by_key.get(k, {})
        rows.append({**r, JOIN: k, **{c: match.get(c) for c in TEACHER_COLUMNS}})
    types = {"_raw": pa.binary(), "_source": pa.string(), "_index": pa.int64(), JOIN: pa.string()}
    return pa.Table.from_pylist(rows, pa.schema({**types, **TEACHER_COLUMNS}))


def test_a_bad_cell_in_the_logprob_file_rejects_its_trace_naming_the_field(tmp_path, qwen2):
    """DASD's layout: the text keyed ``uuid``, the -Logprob file keyed ``sample_uuid``.
    A non-numeric or float token id, a string log-prob and null log-probs in the log-prob
    file used to crash the join (``int("abc")``), pass silently (``int(3.0)``,
    ``float("-0.5")``) or read as "no row for it"; each is now its trace's reject naming
    the field. -1e30 is missing (counted), and the row is kept."""
    text = "Two."
    ids = qwen2(text, add_special_tokens=False)["input_ids"]  # "Two", "."
    lp_rows = [
        {"sample_uuid": "ok", "token_ids": ids, "logprobs": [-0.5, -0.25]},
        {"sample_uuid": "abc", "token_ids": [ids[0], "abc"], "logprobs": [-0.5, -0.25]},
        {"sample_uuid": "float", "token_ids": [float(ids[0]), ids[1]], "logprobs": [-0.5, -0.25]},
        {"sample_uuid": "str-lp", "token_ids": ids, "logprobs": [-0.5, "-0.25"]},
        {"sample_uuid": "null-lps", "token_ids": ids, "logprobs": None},
        {"sample_uuid": "sentinel", "token_ids": ids, "logprobs": [-1e30, -0.25]},
        {"token_ids": ids, "logprobs": [-0.5, -0.25]},  # no key: cannot join, counted
    ]
    dcfg = DataConfig(
        id_key="uuid",
        join_key="uuid",
        teacher_join_key="sample_uuid",
        teacher_logprobs_path="lp.jsonl",
        teacher_token_ids_key="token_ids",
        teacher_logprobs_key="logprobs",
        teacher_tokenizer=QWEN2_TOKENIZER,
    )
    out = prepare_out_dir(tmp_path / "lp")
    keyed = keyed_logprobs(_raw(_lines(lp_rows), "lp.jsonl"), dcfg, str(out / "_parts"))
    counts, _ = collect_parts(out, "prepare")
    assert (counts["teacher_logprob_rows"], counts["teacher_logprob_rows_bad"]) == (7, 1)
    uuids = ["ok", "abc", "float", "str-lp", "null-lps", "sentinel", "lonely"]
    traces = _raw(_lines([{"uuid": u, "prompt": "Q?", "response": text} for u in uuids]))
    kept, rejects, totals = _prepare(_join_in_process(traces, keyed, "uuid"), dcfg, tmp_path)
    assert set(kept) == {"ok", "sentinel"}
    got = {k: (r["field"], r["reason"].split(":")[0]) for k, r in rejects.items()}
    assert got == {
        "abc": ("token_ids", "wrong_type"),
        "float": ("token_ids", "wrong_type"),
        "str-lp": ("logprobs", "wrong_type"),
        "null-lps": ("logprobs", "missing_key"),
        "lonely": ("uuid", "no_teacher_logprobs"),
    }
    assert "index 1 is 'abc'" in rejects["abc"]["reason"]
    assert "sample_uuid='abc'" in rejects["abc"]["reason"]  # which log-prob row
    assert "no row with sample_uuid='lonely'" in rejects["lonely"]["reason"]
    # "Two" and "." each end inside one student token; no teacher end-of-turn token
    assert _same(_on_loss(kept["ok"]), [-0.5, -0.25, NAN])
    assert _same(_on_loss(kept["sentinel"]), [NAN, -0.25, NAN])
    assert totals["teacher_logprobs_missing"]["below_floor"] == 1


def test_one_id_in_two_prepared_rows_fails_the_stage_naming_it(tmp_path):
    out = tmp_path / "prep"
    out.mkdir()
    pq.write_table(pa.table({"row_id": ["a", "b", "c"]}), out / "part-0.parquet")
    pq.write_table(pa.table({"row_id": ["d", "e"]}), out / "part-1.parquet")
    check_unique_ids(out, DataConfig())  # unique: fine
    pq.write_table(pa.table({"row_id": ["d", "b", "b"]}), out / "part-1.parquet")
    with pytest.raises(PrepareError, match=r"row id 'b' appears 3 times.*data.id_key='id'"):
        check_unique_ids(out, DataConfig())


# ----------------------------------------------------------------------------- formats

# "It is 𝒳!" in Qwen2's byte-level tokens: "It", " is", " " + the first two bytes of 𝒳
# (U+1D4B3, 4 bytes), its third byte, its fourth byte, "!", then <|im_end|>.
XTEXT = "It is 𝒳!"
XLPS = [-0.5, -0.25, -1.0, -2.0, -0.125, -0.75, -0.0625]
# On tiny-bpe's loss tokens "It", " is", " ", four byte tokens of 𝒳, "!", <|im_end|>:
# " \xf0\x9d" completes only the space (5, 6) -> " " gets -1.0; the two tokens that end in
# 𝒳 both credit the student token that completes it, the last of its four byte tokens:
# -2.0 + -0.125; the three before it get 0.0 (their probability is paid by the last).
XWANT = [-0.5, -0.25, -1.0, 0.0, 0.0, 0.0, -2.125, -0.75, -0.0625]


def _qwen_tokens(qwen2, text: str) -> tuple[list[int], list[bytes]]:
    """Qwen2's ids of ``text`` plus <|im_end|>, and each token's own bytes (read from the
    vocabulary through GPT-2's byte-to-unicode table, not from raydc)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    ids = qwen2(text, add_special_tokens=False)["input_ids"]
    raw = [bytes(byte_of[c] for c in t) for t in qwen2.convert_ids_to_tokens(ids)]
    return ids + [qwen2.convert_tokens_to_ids("<|im_end|>")], raw + [b""]


@pytest.mark.parametrize("fmt", ["openai", "auto"])
def test_openai_bytes_align_a_token_that_splits_a_character_exactly(tmp_path, qwen2, fmt):
    """Chat completions' logprobs.content: a token that splits 𝒳 has the string "\ufffd"
    (it cannot match the text) but its ``bytes`` are exact. The API returns no stop token,
    so the student's <|im_end|> is unknown (NaN). A -9999 entry is missing, not a value."""
    ids, raw = _qwen_tokens(qwen2, XTEXT)
    content = [
        {
            "token": qwen2.decode([i]),
            "logprob": lp,
            "bytes": list(b),
            "top_logprobs": [{"token": "x", "logprob": -9999.0, "bytes": [120]}],
        }
        for i, b, lp in zip(ids[:-1], raw[:-1], XLPS[:-1])
    ]
    assert content[3]["token"] == "\ufffd"  # the split character's middle byte
    no_bytes = [{**c, "bytes": None} for c in content]
    sentinel = [*content[:-1], {**content[-1], "logprob": -9999.0}]
    rows = [
        {"id": "bytes", "prompt": "Q?", "response": XTEXT, "logprobs": {"content": content}},
        {"id": "strings", "prompt": "Q?", "response": XTEXT, "logprobs": {"content": no_bytes}},
        {"id": "sentinel", "prompt": "Q?", "response": XTEXT, "logprobs": {"content": sentinel}},
    ]
    dcfg = DataConfig(teacher_logprobs_key="logprobs", teacher_logprobs_format=fmt)
    kept, rejects, totals = _prepare(_raw(_lines(rows)), dcfg, tmp_path)
    assert _same(_on_loss(kept["bytes"]), XWANT[:-1] + [NAN])
    assert _same(_on_loss(kept["sentinel"]), XWANT[:-2] + [NAN, NAN])  # "!" is -9999
    assert totals["teacher_logprobs_missing"]["below_floor"] == 1
    # Without bytes the token strings spell "It is \ufffd\ufffd\ufffd!", not the response.
    (r,) = rejects.values()
    assert (r["row_id"], r["field"]) == ("strings", "logprobs.content")
    assert r["reason"].startswith("teacher_tokens_mismatch")


def test_openai_completions_and_token_id_spellings(tmp_path, qwen2):
    """The completions API's {tokens, token_logprobs} (its first log-prob may be null:
    missing), and tokens spelt "token_id:<n>" (vLLM's return_tokens_as_token_ids), which
    are decoded with data.teacher_tokenizer like any token ids."""
    ids, _ = _qwen_tokens(qwen2, "Two. One.")
    toks = [qwen2.decode([i]) for i in ids[:-1]]  # "Two", ".", " One", "."
    spelt = [{"token": f"token_id:{i}", "logprob": lp} for i, lp in zip(ids, XLPS)]
    rows = [
        {
            "id": "completions",
            "prompt": "Q?",
            "response": "Two. One.",
            "logprobs": {"tokens": toks, "token_logprobs": [None, -0.25, -1.0, -2.0]},
        },
        {"id": "spelt", "prompt": "Q?", "response": "Two. One.", "logprobs": spelt[:5]},
    ]
    dcfg = DataConfig(teacher_logprobs_key="logprobs", teacher_tokenizer=QWEN2_TOKENIZER)
    kept, rejects, totals = _prepare(_raw(_lines(rows)), dcfg, tmp_path)
    assert not rejects
    student = load_tokenizer("tiny-bpe")
    s_ids = [t for t, m in zip(kept["spelt"]["input_ids"], kept["spelt"]["loss_mask"]) if m]
    # tiny-bpe splits it as Qwen2 does, plus <|im_end|>
    assert [student.decode([t]) for t in s_ids] == ["Two", ".", " One", ".", "<|im_end|>"]
    assert _same(_on_loss(kept["completions"]), [NAN, -0.25, -1.0, -2.0, NAN])
    # spelt: the four content ids then <|im_end|> (-0.125, the fifth value)
    assert _same(_on_loss(kept["spelt"]), [-0.5, -0.25, -1.0, -2.0, -0.125])
    assert totals["teacher_logprobs_missing"]["null"] == 1


@pytest.mark.parametrize("fmt", ["vllm", "auto"])
def test_vllm_maps_read_the_sampled_token_of_each_position(tmp_path, qwen2, fmt):
    """vLLM's per-position {token_id: {logprob, rank, decoded_token}}: the sampled token
    first, then the top-k. Keys as JSON writes them ("2132"), spelt "token_id:<n>", or an
    Arrow map's (key, value) pairs. With data.teacher_token_ids_key the given id picks the
    entry (it need not be first), and a None position (prompt log-probs start so) is
    missing."""
    ids, _ = _qwen_tokens(qwen2, XTEXT)

    def pos(k, i, lp):
        other = {"logprob": -9.0, "rank": 2, "decoded_token": "?"}
        mine = {"logprob": lp, "rank": 1, "decoded_token": qwen2.decode([i])}
        if k % 3 == 0:
            return {str(i): mine, "7": other}
        if k % 3 == 1:
            return {f"token_id:{i}": mine, "token_id:7": other}
        return [(i, mine), (7, other)]

    sampled = [pos(k, i, lp) for k, (i, lp) in enumerate(zip(ids, XLPS))]

    def top_first(p):  # the sampled token after another one: the given id must pick it
        return dict(reversed(p.items())) if isinstance(p, dict) else p[::-1]

    prompt_style = [None, *[top_first(p) for p in sampled[1:3]], *sampled[3:]]
    rows = [
        {"id": "sampled", "prompt": "Q?", "response": XTEXT, "logprobs": sampled},
        {
            "id": "prompt",
            "prompt": "Q?",
            "response": XTEXT,
            "logprobs": prompt_style,
            "token_ids": ids,
        },
    ]
    if fmt == "auto":  # each value's own shape: DASD's lists beside vLLM's maps
        rows.append({"id": "lists", "prompt": "Q?", "response": XTEXT, "logprobs": XLPS})
        rows[-1]["token_ids"] = ids
    dcfg = DataConfig(
        teacher_logprobs_key="logprobs",
        teacher_token_ids_key="token_ids",
        teacher_logprobs_format=fmt,
        teacher_tokenizer=QWEN2_TOKENIZER,
    )
    kept, rejects, totals = _prepare(_raw(_lines(rows)), dcfg, tmp_path)
    assert not rejects
    assert _same(_on_loss(kept["sampled"]), XWANT)
    assert _same(_on_loss(kept["prompt"]), [NAN, *XWANT[1:]])
    if fmt == "auto":
        assert _same(_on_loss(kept["lists"]), XWANT)
    assert totals["teacher_logprobs_missing"]["null"] == 1


def test_the_format_and_join_key_settings_are_checked():
    with pytest.raises(ConfigError, match="teacher_logprobs_format='jsonl': must be one of"):
        from_dict({"data": {"teacher_logprobs_format": "jsonl"}})
    with pytest.raises(ConfigError, match="set data.teacher_tokenizer too"):
        from_dict({"data": {"teacher_logprobs_path": "lp.parquet"}})
    # API log-probs carry their token strings: no teacher tokenizer needed
    cfg = from_dict(
        {"data": {"teacher_logprobs_path": "lp.jsonl", "teacher_logprobs_format": "openai"}}
    )
    assert cfg.data.teacher_join_key is None
