"""The generate stage on the real vLLM CPU build as Ray Data actors (one engine start for
the module), run as the job's first stage (``generate.enabled``): teacher log-probs at the
sampling temperature against transformers, the trace schema, and ``raydc prepare`` reusing
the stage and reading its traces."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

T = 0.7
GSM8K = Path(__file__).resolve().parents[2] / "raydc" / "assets" / "gsm8k" / "test.jsonl"


def _overrides(tmp, prompts, teacher, student):
    return [
        f"run.output_dir={tmp / 'run'}",
        "generate.enabled=true",
        f"generate.prompts={prompts}",
        f"score.teacher={teacher}",
        f"score.student={student}",
        "generate.engine.backend=ray",
        "generate.engine.max_model_len=512",
        f"generate.temperature={T}",
        "generate.n_samples=2",
        "generate.max_new_tokens=12",
        "generate.keep_truncated=true",
        "generate.seed=7",
    ]


@pytest.fixture(scope="module")
def generated(tiny_teacher, tiny_student, ray_local, tmp_path_factory):
    from raydc.config import load_config
    from raydc.pipeline import Pipeline

    tmp = tmp_path_factory.mktemp("generate")
    prompts = tmp / "prompts.jsonl"
    with open(GSM8K) as fh:
        rows = [json.loads(next(fh)) for _ in range(3)]
    rows = [{"id": f"q{i}", **r} for i, r in enumerate(rows)]
    rows.append({"id": "empty", "question": "   ", "answer": "#### 1"})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp / "job.yaml"
    config.write_text("select:\n  enabled: false\n")
    overrides = _overrides(tmp, prompts, tiny_teacher, tiny_student)
    pipe = Pipeline(load_config(config, overrides))
    summary = pipe.run_until("generate").summary
    out = tmp / "run" / "generate"
    traces = pq.read_table(out / "traces.parquet").to_pylist()
    tmp.joinpath("cli").write_text(json.dumps([str(config), *overrides]))
    return pipe.cfg, summary, traces, out, {r["id"]: r for r in rows}


def test_counts_and_rejects(generated):
    cfg, s, traces, tmp, _ = generated
    assert (s["rows_in"], s["rows_out"], s["rows_rejected"]) == (4, 3, 1)
    assert s["backend"] == "ray" and s["traces"] == len(traces) == 6
    # A random tiny teacher practically never emits its stop token within 12 tokens.
    assert s["traces_truncated"] == sum(r["finish_reason"] == "length" for r in traces)
    rej = pq.read_table(tmp / "rejects.parquet").to_pylist()
    assert rej == [
        {
            "row_id": "empty",
            "stage": "generate",
            "field": "question",
            "reason": "missing_prompt: no prompt text",
        }
    ]


def test_trace_schema_matches_the_data_config(generated):
    cfg, _, traces, _, sources = generated
    d = cfg.data
    assert sorted({r[d.prompt_id_key] for r in traces}) == ["q0", "q1", "q2"]
    assert sorted(r[d.id_key] for r in traces) == [f"q{i}:{k}" for i in range(3) for k in (0, 1)]
    for r in traces:
        n = r["num_tokens"]
        assert len(r[d.teacher_logprobs_key]) == len(r["teacher_pieces"]) == n
        assert len(r[d.teacher_offsets_key]) == len(r["teacher_token_ids"]) == n
        assert "".join(r["teacher_pieces"]) == r[d.response_key]
        for (s, e), piece in zip(r[d.teacher_offsets_key], r["teacher_pieces"]):
            assert piece == "" or r[d.response_key][s:e] == piece
        assert all(lp <= 0.0 for lp in r[d.teacher_logprobs_key])
        assert d.teacher_tokens_key not in r  # see raydc/generate.py: offsets keep all mass
        src = sources[r[d.prompt_id_key]]
        assert r[d.prompt_key] == src["question"] and r["answer"] == src["answer"]
    by_prompt = {}
    for r in traces:
        by_prompt.setdefault(r[d.prompt_id_key], []).append(r["teacher_token_ids"])
    # Per-sample seeds: the two samples of a prompt differ.
    assert all(a != b for a, b in by_prompt.values())


def test_logprobs_are_at_the_sampling_temperature(generated, tiny_teacher):
    import torch
    from transformers import AutoModelForCausalLM

    from raydc.engines.sampler import render_prompts
    from raydc.infra.models import load_tokenizer

    cfg, _, traces, _, _ = generated
    d = cfg.data
    tok = load_tokenizer(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    worst_tempered = max_raw_gap = 0.0
    for r in traces:
        (prompt_ids,) = render_prompts(tok, [r[d.prompt_key]], None)
        gen = r["teacher_token_ids"]
        ids = torch.tensor([prompt_ids + gen])
        with torch.no_grad():
            logits_TV = model(ids).logits[0, len(prompt_ids) - 1 : -1]  # predicts gen tokens
        idx = torch.tensor(gen)[:, None]
        tempered = torch.log_softmax(logits_TV / T, -1).gather(1, idx)[:, 0]
        raw = torch.log_softmax(logits_TV, -1).gather(1, idx)[:, 0]
        got = torch.tensor(r[d.teacher_logprobs_key])
        worst_tempered = max(worst_tempered, (got - tempered).abs().max().item())
        max_raw_gap = max(max_raw_gap, (got - raw).abs().max().item())
    assert worst_tempered < 1e-4
    assert max_raw_gap > 1e-2  # the untempered log-probs are measurably different


def test_raydc_prepare_reuses_the_stage_and_reads_its_traces(generated, capsys):
    from raydc.cli import main
    from raydc.infra.artifacts import data_files

    cfg, _, traces, out, _ = generated
    config, *overrides = json.loads(out.parent.parent.joinpath("cli").read_text())
    assert main(["prepare", "--config", config, *overrides]) == 0
    printed = capsys.readouterr().err  # the stage lines go to stderr
    assert "generate done before (fingerprint" in printed  # no second vLLM run
    stage = json.loads((out.parent / "prepare" / "_raydc_stage.json").read_text())
    s = stage["summary"]
    assert (s["rows_in"], s["rows_out"], s["rows_rejected"]) == (6, 6, 0)
    assert s["given_teacher_rows"] == 6
    prepared = {
        r["row_id"]: r
        for f in data_files(out.parent / "prepare")
        for r in pq.read_table(f).to_pylist()
    }
    for t in traces:
        p = prepared[t[cfg.data.id_key]]
        on_loss = [v for v, m in zip(p["teacher_logprobs"], p["loss_mask"]) if m]
        known = [v for v in on_loss if not math.isnan(v)]
        # Same tokenizer, character-span alignment: per-token values may move between
        # tokens, but the response's total teacher log-prob is conserved.
        assert sum(known) == pytest.approx(sum(t[cfg.data.teacher_logprobs_key]), abs=1e-3)
