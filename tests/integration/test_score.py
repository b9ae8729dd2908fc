"""The score stage on a real local Ray with real vLLM CPU engines, checked against
transformers: one module-scoped run scores the student and a teacher with another
tokenizer (two engine starts), then many assertions read its outputs."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from raydc.config import from_dict
from raydc.infra.artifacts import data_files, fingerprint_paths
from raydc.infra.schemas import INSPECT_DIR, INSPECT_SCHEMA, SELECTION_FILE, scored_schema
from raydc.method.spans import align_by_char_spans
from raydc.score.teacher import load_teacher_tokenizer

pytestmark = pytest.mark.integration

GSM8K = "raydc/assets/gsm8k/train.jsonl"
SCORE_MAX_LEN = 200
# The traces' sampling temperature: the teacher is scored at it (vLLM's prompt log-probs
# ignore SamplingParams.temperature, so this checks the engine-side logit scaling).
TEACHER_T = 0.7


def _traces(path, n=6):
    rows = []
    with open(GSM8K) as fh:
        for i, line in zip(range(n), fh):
            d = json.loads(line)
            # Two candidate responses per prompt (ASCII, so no byte-split characters).
            rows.append(
                {
                    "id": f"g{i}",
                    "prompt": d["question"][:120],
                    "response": [d["answer"][:150], d["answer"][-90:]],
                }
            )
    rows.append({"id": "long", "prompt": "Count.", "response": " ".join(["one two"] * 105)})
    rows.append({"id": "bad", "prompt": "Q?", "response": ""})
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return rows


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_student, tiny_teacher_other_tokenizer, ray_local):
    from raydc.prepare.stage import run_prepare
    from raydc.score.stage import run_score

    tmp = tmp_path_factory.mktemp("score")
    _traces(tmp / "traces.jsonl")
    cfg = from_dict(
        {
            "data": {"path": str(tmp / "traces.jsonl"), "max_length": 256},
            "score": {
                "student": tiny_student,
                "teacher": tiny_teacher_other_tokenizer,
                "backend": "vllm",
                "engine": {
                    "max_model_len": SCORE_MAX_LEN,
                    "max_num_batched_tokens": 1024,
                    "cpus_per_engine": 0.5,
                    "batch_size": 4,
                },
                # fp32 log-probs, to compare with transformers at 1e-4 (the float16 default
                # rounds to 2**-11 of the value: test_the_float16_store_round_trips); the
                # side table holds what only people read (text, offsets, weights).
                "logprobs": "float32",
                "inspection": True,
                "teacher_temperature": TEACHER_T,
            },
            "weights": {"preset": "discord", "granularity": "sentence"},
        }
    )
    prep = run_prepare(cfg, tmp / "prepared")
    summary = run_score(cfg, tmp / "prepared", tmp / "scored")
    table = pq.read_table(data_files(tmp / "scored"))
    side = pq.read_table(tmp / "scored" / INSPECT_DIR)
    rows = {r["row_id"]: r for r in table.to_pylist()}
    for r in side.to_pylist():
        rows[r["row_id"]].update(r)
    return {
        "cfg": cfg,
        "prep": prep,
        "summary": summary,
        "dir": tmp / "scored",
        "rows": rows,
        "schema": table.schema,
        "side_schema": side.schema,
        "side_rows": side.num_rows,
    }


def test_counts_and_rejects(scored):
    prep, summary = scored["prep"], scored["summary"]
    assert prep["rows_in"] == 6 * 2 + 1 + 1 == prep["rows_out"] + prep["rows_rejected"]
    assert prep["reasons"] == {"empty_response": 1}
    assert summary["rows_in"] == prep["rows_out"]
    assert summary["rows_in"] == summary["rows_out"] + summary["rows_rejected"]
    rejects = pq.read_table(scored["dir"] / "rejects.parquet").to_pylist()
    # The long row fits data.max_length (256) but not score.engine.max_model_len (200).
    assert [(r["row_id"], r["stage"], r["field"], r["reason"].split(":")[0]) for r in rejects] == [
        ("long", "score", "input_ids", "too_long")
    ]
    assert set(scored["rows"]) == {f"g{i}#{k}" for i in range(6) for k in range(2)}


def test_schema_is_the_contract(scored):
    schema = scored["schema"]
    assert schema.equals(scored_schema("float32"))
    for name in ("student_logprobs", "teacher_logprobs"):
        assert str(schema.field(name).type) == "list<element: float>"  # score.logprobs
    # Text, offsets, conversation and weights live in the side table only, one row each.
    assert not {"text", "offsets", "conversation", "weights"} & set(schema.names)
    assert scored["side_schema"].equals(INSPECT_SCHEMA)
    assert scored["side_rows"] == len(scored["rows"])
    for r in scored["rows"].values():
        n = len(r["input_ids"])
        assert len(r["student_logprobs"]) == len(r["teacher_logprobs"]) == len(r["weights"]) == n
        assert r["student_logprobs"][0] == 0.0 and r["loss_mask"][0] is False


def test_vllm_student_equals_transformers_log_softmax(scored, tiny_student):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32).eval()
    worst = 0.0
    for r in scored["rows"].values():
        ids = torch.tensor([r["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        ref = logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
        got = torch.tensor(r["student_logprobs"][1:], dtype=torch.float64)
        worst = max(worst, float((got - ref).abs().max()))
    assert worst < 1e-4, worst


def test_cross_tokenizer_teacher_matches_transformers_aligned_by_spans(
    scored, tiny_teacher_other_tokenizer
):
    """The teacher (WordPiece) is scored on its own tokens and carried onto the student's
    (byte-level BPE) by character spans, at the traces' temperature; recomputed here with
    transformers as log_softmax(logits / T)."""
    from transformers import AutoModelForCausalLM

    teacher = tiny_teacher_other_tokenizer
    tok = load_teacher_tokenizer(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    checked = unknown = 0
    for r in scored["rows"].values():
        msgs = json.loads(r["conversation"])
        text = tok.apply_chat_template(msgs, tokenize=False)
        content = msgs[-1]["content"]
        cs = text.rfind(content)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        # Teacher tokens beyond score.engine.max_model_len are not scored: their share is unknown.
        enc = {k: v[:SCORE_MAX_LEN] for k, v in enc.items()}
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double() / TEACHER_T, -1)
        t_lp = [0.0] + logp[:-1].gather(-1, ids[0, 1:, None])[:, 0].tolist()
        src, vals = [], []
        for (s, e), v in zip(enc["offset_mapping"], t_lp):
            if e > cs and s < cs + len(content):
                src.append((max(s, cs) - cs, min(e, cs + len(content)) - cs))
                vals.append(v)
        s_offs = list(zip(r["offsets"][::2], r["offsets"][1::2]))
        scs = r["response_spans"][0]
        loss = [i for i, m in enumerate(r["loss_mask"]) if m]
        content_idx, eot = loss[:-1], loss[-1]
        expect = align_by_char_spans(
            src, vals, [(s_offs[i][0] - scs, s_offs[i][1] - scs) for i in content_idx]
        )
        known = r["teacher_mask"]  # null: every teacher value of the row is known
        for i, v in zip(content_idx, expect):
            got = r["teacher_logprobs"][i]
            if v is None:  # the teacher says nothing here: neutral, the student's value
                assert got == pytest.approx(r["student_logprobs"][i], abs=1e-6)
                assert known is not None and known[i] is False, (r["row_id"], i)
                unknown += 1
            else:
                assert got == pytest.approx(v, abs=1e-4), (
                    r["row_id"],
                    i,
                    got,
                    v,
                    r["text"][s_offs[i][0] : s_offs[i][1]],
                )
                assert known is None or known[i] is True, (r["row_id"], i)
                checked += 1
        # The student's <|im_end|> gets the teacher's own end-of-turn token's log-prob.
        t_eot = [k for k, (s, _) in enumerate(enc["offset_mapping"]) if s >= cs + len(content)]
        want = t_lp[t_eot[0]] if t_eot else r["student_logprobs"][eot]
        assert r["teacher_logprobs"][eot] == pytest.approx(want, abs=1e-4)
        # The teacher's tokens are WordPiece pieces of the text, at the right characters.
        for (s, e), t in zip(enc["offset_mapping"], tok.convert_ids_to_tokens(enc["input_ids"])):
            assert t in tok.all_special_tokens or t == "[UNK]" or text[s:e] == t.removeprefix("##")
        # Off the loss mask, teacher log-probs are 0.
        assert all(r["teacher_logprobs"][i] == 0.0 for i, m in enumerate(r["loss_mask"]) if not m)
    assert checked > 5 * unknown > 0, (checked, unknown)  # unknown: newlines, spaces
    assert scored["summary"]["teacher_unknown_tokens"] == unknown


def test_weights_are_compute_weights_of_the_config(scored):
    from raydc.method.weights import compute_weights

    cfg = scored["cfg"]
    for r in scored["rows"].values():
        w = compute_weights(
            torch.tensor([r["student_logprobs"]]),
            torch.tensor([r["teacher_logprobs"]]),
            torch.tensor([r["loss_mask"]]),
            cfg.weights,
            torch.tensor([r["sentence_ids"]]),
        )[0]
        assert torch.allclose(w, torch.tensor(r["weights"]), atol=1e-6)
        # Sentence granularity: one weight per sentence of the response.
        by_sid: dict = {}
        for wt, sid, m in zip(r["weights"], r["sentence_ids"], r["loss_mask"]):
            if m:
                by_sid.setdefault(sid, set()).add(round(wt, 5))
        assert all(len(v) == 1 for v in by_sid.values())


def test_manifest(scored, tiny_student, tiny_teacher_other_tokenizer):
    m = json.loads((scored["dir"] / "manifest.json").read_text())
    assert m["student"] == {"path": tiny_student, "fingerprint": fingerprint_paths(tiny_student)}
    assert m["teacher"]["path"] == tiny_teacher_other_tokenizer
    assert m["teacher"]["same_tokenizer"] is False and m["teacher"]["scored"] is True
    assert m["teacher"]["temperature"] == TEACHER_T
    assert m["backend"] == "vllm" and m["vllm_version"]
    assert m["counts"]["rows_out"] == len(scored["rows"])
    assert m["counts"]["loss_tokens"] == sum(sum(r["loss_mask"]) for r in scored["rows"].values())
    assert m["weights"] == scored["cfg"].weights.to_dict()
    d = m["weight_diagnostics"]
    assert d["tokens"] == m["counts"]["loss_tokens"] and 0 < d["ess_fraction"] <= 1
    assert d["sampled"] is False and sum(d["histogram"]["counts"]) == d["tokens"]
    assert (
        m["config"]["score"]["engine"]["max_model_len"] == SCORE_MAX_LEN and m["input_fingerprint"]
    )


def test_select_on_scored_data_keeps_the_top_candidate(scored, tmp_path):
    from raydc.method.selection import divergence_scores
    from raydc.select import run_select

    cfg = scored["cfg"]
    cfg.select.top_k = 1
    summary = run_select(cfg, scored["dir"], tmp_path / "selected")
    # No second copy of the rows: the kept ids only.
    assert data_files(tmp_path / "selected") == []
    kept = set(pq.read_table(tmp_path / "selected" / SELECTION_FILE).column("row_id").to_pylist())
    expect = set()
    for i in range(6):
        pair = [scored["rows"][f"g{i}#{k}"] for k in range(2)]
        T = max(len(r["input_ids"]) for r in pair)

        def pad(key, dtype, rows=pair, T=T):
            return torch.tensor([r[key] + [0] * (T - len(r[key])) for r in rows], dtype=dtype)

        sc = divergence_scores(
            pad("student_logprobs", torch.float64),
            pad("teacher_logprobs", torch.float64),
            pad("sentence_ids", torch.long),
            pad("loss_mask", torch.bool),
        )
        expect.add(f"g{i}#{0 if sc[0] >= sc[1] else 1}")
    assert kept == expect
    assert summary["rows_in"] == 12 == summary["rows_out"] + summary["rows_rejected"]
    assert not math.isnan(summary["mean_score_kept"])


def test_training_reads_the_score_stage_output_with_real_sentence_ids(
    scored, tiny_student, tmp_path
):
    """Training fed by the real score and select stages (not a hand-written fixture): rows
    with several sentences, sentence granularity, one worker, two steps, through the
    selection's row-id list: exactly the kept rows."""
    from raydc.select import run_select
    from raydc.train import run_train

    assert max(max(r["sentence_ids"]) for r in scored["rows"].values()) >= 2
    scored["cfg"].select.top_k = 1
    run_select(scored["cfg"], scored["dir"], tmp_path / "selected")
    kept = pq.read_table(tmp_path / "selected" / SELECTION_FILE).column("row_id").to_pylist()
    rows = [scored["rows"][k] for k in kept]
    assert 0 < len(rows) < len(scored["rows"])
    cfg = from_dict(
        {
            "train": {
                "student": tiny_student,
                "num_workers": 1,
                "zero_stage": 1,
                "max_steps": 2,
                "micro_batch_tokens": 512,
                "log_every": 1,
                "checkpoint_every": 2,
                "val_share": 0.0,
            },
            "weights": {"preset": "discord", "granularity": "sentence"},
        }
    )
    summary = run_train(cfg, str(tmp_path / "selected"), tmp_path / "train")
    m = summary["metrics"]
    assert m["step"] == 2 and math.isfinite(m["loss"]) and m["loss"] > 0
    assert math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
    assert sum(summary["shards"]["rows_per_rank"]) == len(rows)
    assert sum(summary["shards"]["tokens_per_rank"]) == sum(len(r["input_ids"]) for r in rows)


def test_the_float16_store_round_trips_within_its_bound(scored, tmp_path):
    """The default store (float16 log-probs) against the fp32 one, on the real traces: the
    store's own finish step and writer, read back by training's reader. Every preset's
    weights and the training loss they give agree within the tolerance docs/contracts.md
    states; the log-probs within round-to-nearest (2**-11 of the value)."""
    import pyarrow as pa

    from raydc.infra.schemas import SCORED_WRITE_ARGS
    from raydc.method.loss import weighted_token_loss
    from raydc.method.weights import PRESETS, compute_weights, needs_entropy, preset
    from raydc.score.store import finish_batch
    from raydc.train.batch import RowBlock

    names = scored_schema("float32").names
    rows = sorted(scored["rows"].values(), key=lambda r: r["row_id"])
    fp32 = pa.Table.from_pylist([{k: r[k] for k in names} for r in rows], scored_schema("float32"))
    (tmp_path / "parts").mkdir()
    fp16 = finish_batch(fp32, preset("discord"), str(tmp_path / "parts"), logprobs="float16")
    assert fp16.schema.field("student_logprobs").type == pa.list_(pa.float16())
    pq.write_table(fp16, tmp_path / "fp16.parquet", **SCORED_WRITE_ARGS)
    a = RowBlock.from_table(fp32)
    b = RowBlock.from_table(pq.read_table(tmp_path / "fp16.parquet"))
    assert a.row_ids == b.row_ids and (a.input_ids == b.input_ids).all()
    for x, y in (
        (a.student_logprobs, b.student_logprobs),
        (a.teacher_logprobs, b.teacher_logprobs),
    ):
        assert (abs(x - y) <= abs(x) * 2.0**-11 + 2.0**-24).all()

    def padded(block, name):
        out = torch.zeros(len(block), int(block.lengths().max()))
        dtype = {"loss_mask": torch.bool, "sentence_ids": torch.long}.get(name, torch.float32)
        out = out.to(dtype)
        for r in range(len(block)):
            v = getattr(block, name)[block.span(r)]
            out[r, : len(v)] = torch.as_tensor(v.astype("float32") if dtype == torch.float32 else v)
        return out

    m, sid = padded(a, "loss_mask"), padded(a, "sentence_ids")
    s32, t32 = padded(a, "student_logprobs"), padded(a, "teacher_logprobs")
    s16, t16 = padded(b, "student_logprobs"), padded(b, "teacher_logprobs")
    nll = -s32  # the student's own loss at step 0, in fp32
    # The stated bound (docs/contracts.md): a weight's relative error is at most
    # 2 * 2**-11 * L / tau, L the largest |log p_S| + |log p_T| on a loss token (self-norm
    # and sequence means included: each moves log w by at most 2**-11 * L / tau per side).
    L = float(((s32.abs() + t32.abs()) * m).max())
    bound = 2 * 2.0**-11 * L
    worst = {}
    for name in PRESETS:
        if needs_entropy(preset(name)):
            continue  # the store holds no student entropy (yet): nothing to compare
        for gran in ("token", "sentence"):
            cfg = preset(name, granularity=gran)
            w32 = compute_weights(s32, t32, m, cfg, sid)
            w16 = compute_weights(s16, t16, m, cfg, sid)
            rel = float(((w32 - w16).abs() / w32.abs().clamp(min=1e-6) * m).max())
            l32 = weighted_token_loss(nll, w32, m, cfg.normalization)
            l16 = weighted_token_loss(nll, w16, m, cfg.normalization)
            dl = float((l32 - l16).abs() / l32.abs())
            worst[(name, gran)] = (round(rel, 6), round(dl, 7))
            tau = getattr(cfg, "tau", 1.0) or 1.0
            assert rel <= bound / tau and dl <= bound / tau, (name, gran, rel, dl, bound)
    print(f"L={L:.2f} bound={bound:.5f}; worst relative dw, dloss:", worst)
