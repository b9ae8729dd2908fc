"""run_eval (and run_generate's in-process path) on the real vLLM CPU build, with one
in-process engine for the module: metrics fields, rows in = rows graded, greedy
determinism, a non-trivial pass@1 on gold answers taken from the model's own greedy
answers, and sampled-token log-probs against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raydc.config import from_dict

pytestmark = pytest.mark.integration

GSM8K = Path(__file__).resolve().parents[2] / "raydc" / "assets" / "gsm8k" / "test.jsonl"
METRIC_FIELDS = {
    "pass@1",
    "pass@1_stderr",
    "pass@k",
    "prompts",
    "n_samples",
    "samples",
    "mean_response_tokens",
    "max_response_tokens",
    "no_answer_share",
    "truncated_share",
    "rows_in",
    "rows_out",
    "rows_rejected",
    "grader",
    "temperature",
    "backend",
    "seconds",
    "generated_tokens",
    "paths",
}


def _cfg(path, *overrides):
    return from_dict(
        {},
        [
            f"eval.path={path}",
            "eval.engine.backend=local",
            "eval.engine.max_model_len=512",
            "eval.max_new_tokens=24",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def engine(tiny_student):
    from raydc.engines.sampler import LocalEngine

    eng = LocalEngine(tiny_student, _cfg("unused").eval.engine)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "eval.jsonl"
    with open(GSM8K) as fh:
        rows = [json.loads(next(fh)) for _ in range(6)]
    rows.append({"question": "A question with no usable gold?", "answer": "#### n/a"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sampled_eval_metrics_and_counts(engine, tiny_student, eval_file, tmp_path):
    from raydc.eval import run_eval
    from raydc.eval.graders import grade

    cfg = _cfg(eval_file, "eval.n_samples=3", "eval.temperature=1.0", "eval.seed=5")
    m = run_eval(cfg, tiny_student, tmp_path, engine=engine)
    assert METRIC_FIELDS <= set(m)
    assert (m["rows_in"], m["rows_out"], m["rows_rejected"]) == (7, 6, 1)
    assert (m["prompts"], m["n_samples"], m["samples"]) == (6, 3, 18)
    assert json.loads((tmp_path / "metrics.json").read_text())["samples"] == 18
    gens = pq.read_table(tmp_path / "generations.parquet").to_pylist()
    assert len(gens) == 18  # rows in (accepted) x n = rows graded
    assert [(g["row_id"], g["sample"]) for g in gens] == [
        (f"eval.jsonl:{i}", k) for i in range(6) for k in range(3)
    ]
    for g in gens:  # the stored grade is the grader's verdict on the stored response
        again = grade("gsm8k", g["response"], g["gold"])
        assert (again.correct, again.predicted) == (g["correct"], g["predicted"])
        assert 0 < g["num_tokens"] <= 24
    assert m["mean_response_tokens"] == pytest.approx(sum(g["num_tokens"] for g in gens) / 18)
    assert m["no_answer_share"] == pytest.approx(sum(g["predicted"] is None for g in gens) / 18)
    assert 0.0 <= m["pass@1"] <= m["pass@k"]["3"] <= 1.0
    rej = pq.read_table(tmp_path / "rejects.parquet").to_pylist()
    assert [(r["row_id"], r["field"]) for r in rej] == [("eval.jsonl:6", "answer")]
    # Per-sample seeds: the samples of a prompt are not all the same.
    assert any(len({g["response"] for g in gens[i * 3 : i * 3 + 3]}) > 1 for i in range(6))


def test_greedy_eval_scores_its_own_answers(engine, tiny_student, eval_file, tmp_path):
    from raydc.eval import run_eval

    greedy = _cfg(eval_file, "eval.n_samples=2", "eval.temperature=0")
    run_eval(greedy, tiny_student, tmp_path / "first", engine=engine)
    first = pq.read_table(tmp_path / "first" / "generations.parquet").to_pylist()
    assert all(a["response"] == b["response"] for a, b in zip(first[::2], first[1::2]))
    # Gold answers = the model's own greedy answers (an impossible one where it gave none):
    # a second greedy run must then score exactly the share that reached an answer.
    own = tmp_path / "own.jsonl"
    with open(own, "w") as fh:
        for g in first[::2]:
            gold = g["predicted"] if g["predicted"] is not None else "987654321"
            fh.write(
                json.dumps({"id": g["row_id"], "question": g["prompt"], "answer": f"#### {gold}"})
                + "\n"
            )
    m = run_eval(
        _cfg(own, "eval.n_samples=2", "eval.temperature=0"),
        tiny_student,
        tmp_path / "second",
        engine=engine,
    )
    reached = sum(g["predicted"] is not None for g in first[::2]) / 6
    assert m["pass@1"] == pytest.approx(reached)
    assert m["no_answer_share"] == pytest.approx(1 - reached)


def test_local_generate_logprobs_match_transformers(engine, tiny_student, eval_file, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from raydc.engines.sampler import render_prompts
    from raydc.generate import run_generate
    from raydc.infra.models import load_tokenizer

    t = 1.3
    cfg = from_dict(
        {},
        [
            "generate.engine.backend=local",
            "generate.engine.max_model_len=512",
            f"generate.temperature={t}",
            "generate.top_p=1.0",
            "generate.max_new_tokens=10",
            "generate.num_prompts=2",
            "generate.keep_truncated=true",
        ],
    )
    s = run_generate(cfg, tiny_student, eval_file, tmp_path, engine=engine)
    assert s["backend"] == "local" and s["traces"] == 2
    traces = pq.read_table(tmp_path / "traces.parquet").to_pylist()
    tok = load_tokenizer(tiny_student)
    model = AutoModelForCausalLM.from_pretrained(tiny_student, dtype=torch.float32).eval()
    for r in traces:
        (prompt_ids,) = render_prompts(tok, [r["prompt"]], None)
        gen = r["teacher_token_ids"]
        with torch.no_grad():
            logits_TV = model(torch.tensor([prompt_ids + gen])).logits[0, len(prompt_ids) - 1 : -1]
        want = torch.log_softmax(logits_TV / t, -1).gather(1, torch.tensor(gen)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(r["teacher_logprobs"]), want, atol=1e-4)
