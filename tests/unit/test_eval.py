"""Eval metrics, token pieces/offsets, input handling and config of eval/generate (no engine)."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from raydc.config import ConfigError, from_dict
from raydc.engines.sampler import (
    pick_key,
    read_records,
    render_prompts,
    resolve_backend,
    stop_token_ids,
)
from raydc.eval.stage import format_metrics, pass_at_k, run_eval, summarize
from raydc.infra.models import load_tokenizer
from raydc.method.align import offsets_from_strings, token_pieces
from tests.conftest import QWEN2_TOKENIZER


def test_pass_at_k_matches_enumeration():
    # n=4, c=2, k=2: of the 6 pairs, only the one with both wrong fails.
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 2, 1) == pytest.approx(0.5)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarize_hand_computed():
    correct = [[True, True], [True, False], [False, False]]
    m = summarize(correct, [10, 20, 30, 40, 50, 60], [True] * 5 + [False], [False] * 5 + [True])
    shares = [1.0, 0.5, 0.0]
    assert m["pass@1"] == pytest.approx(0.5)
    sd = math.sqrt(sum((s - 0.5) ** 2 for s in shares) / 2)
    assert m["pass@1_stderr"] == pytest.approx(sd / math.sqrt(3))
    assert m["pass@k"]["2"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["mean_response_tokens"] == 35 and m["max_response_tokens"] == 60
    assert m["no_answer_share"] == pytest.approx(1 / 6)
    assert m["truncated_share"] == pytest.approx(1 / 6)
    assert (m["prompts"], m["n_samples"], m["samples"]) == (3, 2, 6)
    assert "pass@1 0.500 +- " in format_metrics({**m, "temperature": 0.0})
    with pytest.raises(ValueError):
        summarize([[True], [True, False]], [1, 1, 1], [True] * 3, [False] * 3)
    assert summarize([[True]], [3], [True], [False])["pass@1_stderr"] is None


@pytest.mark.parametrize("name", ["tiny-bpe", "tiny-wordpiece", QWEN2_TOKENIZER])
def test_token_pieces_tile_the_decoded_text(name):
    tok = load_tokenizer(name)
    special = {int(i) for i in tok.all_special_ids}
    text = "It is 5.5 dollars. Done!\nYes ünï 😀 über 12,000 — ok"
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    decoded, pieces = token_pieces(tok, ids, special)
    assert decoded == tok.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == decoded and len(pieces) == len(ids)
    assert pieces[-1] == ""  # the stop token has no characters
    offsets = offsets_from_strings(pieces)
    assert all(decoded[s:e] == p for (s, e), p in zip(offsets, pieces))
    assert offsets[-1] == (len(decoded), len(decoded))
    # Each non-empty piece is what the token adds to the decode of the tokens before it.
    for i in (0, 3, len(ids) // 2):
        assert tok.decode(ids[: i + 1], skip_special_tokens=True).endswith(pieces[i])


def test_token_pieces_multibyte_and_truncated_character():
    tok = load_tokenizer("tiny-bpe")
    ids = tok("ab 😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 3  # the emoji is several byte tokens
    _, pieces = token_pieces(tok, ids, set())
    assert pieces[-1] == "😀" and all(p == "" for p in pieces[2:-1])
    text, pieces = token_pieces(tok, ids[:-1], set())  # cut inside the character
    assert "".join(pieces) == text and text.endswith("\ufffd")


def test_read_records_and_keys(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"question": "q1", "answer": "#### 1"}\n\n{"id": "x", "question": "q2"}\n')
    recs = read_records(f)
    assert [r[0] for r in recs] == ["a.jsonl:0", "a.jsonl:2"]
    assert pick_key([r for _, r in recs], "auto", ("problem", "question"), "prompt") == "question"
    with pytest.raises(ValueError, match="no gold column"):
        pick_key([r for _, r in recs], "auto", ("solution",), "gold")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match="b.jsonl:2"):
        read_records(bad)
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")
    pq.write_table(
        __import__("pyarrow").table({"question": ["p"], "answer": ["#### 2"]}),
        tmp_path / "c.parquet",
    )
    assert read_records(tmp_path / "c.parquet") == [
        ("c.parquet:0", {"question": "p", "answer": "#### 2"})
    ]


def test_render_prompts_uses_the_chat_template():
    tok = load_tokenizer("tiny-bpe")
    (ids,) = render_prompts(tok, ["What is 2+3?"], system_prompt="Be brief.")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n") and "What is 2+3?" in text
    assert stop_token_ids("no-such-dir", tok) == {tok.eos_token_id}


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_backend("local", "auto") == "local"
    assert resolve_backend("ray", None) == "ray"
    assert resolve_backend("auto", "auto") == "ray"
    with pytest.raises(ValueError, match="backend='gpu'"):
        resolve_backend("gpu", None)


def test_eval_and_generate_config_validation():
    cfg = from_dict(
        {}, ["eval.engine.dtype=bfloat16", "generate.temperature=0.6", "generate.n_samples=4"]
    )
    assert cfg.eval.engine.dtype == "bfloat16" and cfg.generate.n_samples == 4
    for bad, field in [
        ("eval.max_new_tokens=4096", "eval.max_new_tokens"),
        ("eval.top_p=0", "eval.top_p"),
        ("eval.n_samples=0", "eval.n_samples"),
        ("generate.temperature=-1", "generate.temperature"),
        ("generate.engine.backend=gpu", "generate.engine.backend"),
        ("eval.engine.gpu_memory_utilization=1.5", "eval.engine.gpu_memory_utilization"),
    ]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            from_dict({}, [bad])


def test_run_eval_rejects_bad_rows_before_starting_an_engine(tmp_path):
    data = tmp_path / "eval.jsonl"
    rows = [
        {"id": "a", "question": "", "answer": "#### 1"},
        {"id": "b", "question": "How many?", "answer": "no marker"},
        {"id": "c", "question": "How many?"},
        {"id": "d", "question": "word " * 600, "answer": "#### 3"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(
        {},
        [
            f"eval.path={data}",
            "eval.engine.max_model_len=512",
            "eval.max_new_tokens=32",
            "eval.engine.backend=local",
        ],
    )
    # "tiny-bpe" is a tokenizer, not a model: reaching the engine would fail differently.
    with pytest.raises(ValueError, match="all 4 rows"):
        run_eval(cfg, "tiny-bpe", tmp_path / "out")
    rej = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [(r["row_id"], r["field"], r["reason"].split(":")[0]) for r in rej] == [
        ("a", "question", "missing_prompt"),
        ("b", "answer", "bad_gold"),
        ("c", "answer", "missing_answer"),
        ("d", "question", "prompt_too_long"),
    ]


def test_char_spans_keep_byte_tokens_on_their_character():
    from raydc.method.align import char_spans

    tok = load_tokenizer("tiny-bpe")
    ids = tok("ab 😀!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    special = {int(i) for i in tok.all_special_ids}
    text, pieces = token_pieces(tok, ids, special)
    spans = char_spans(pieces, ids, special)
    emoji = text.index("😀")
    # Every byte token of the emoji ends on the emoji's one character...
    byte_tokens = [i for i, p in enumerate(pieces) if p in ("", "😀") and ids[i] not in special]
    assert len(byte_tokens) > 1
    assert all(spans[i] == (emoji, emoji + 1) for i in byte_tokens)
    # ...ordinary tokens keep their piece's span, and the stop token sits after the text.
    assert text[slice(*spans[-2])] == "!" and spans[-1] == (len(text), len(text))
    # Summing values by the token whose span ends inside a character range loses none.
    from raydc.method.spans import align_by_char_spans

    values = [float(-(i + 1)) for i in range(len(ids) - 1)]
    whole = align_by_char_spans(spans[:-1], values, [(0, len(text))])
    assert whole == [pytest.approx(sum(values))]


def test_finish_reason_and_sampled_logprobs():
    from raydc.engines.sampler import GenerationError, _sampled_logprobs, finish_reason

    assert finish_reason([5, 6, 7], 3, {2}) == "length"
    assert finish_reason([5, 6, 2], 3, {2}) == "stop"  # stopped on the last allowed token
    assert finish_reason([5, 2], 3, {2}) == "stop"
    # Ray rows carry {token_id: {"logprob": ...}}; the in-process engine Logprob objects.
    assert _sampled_logprobs(0, [4, 9], [{4: {"logprob": -1.5}}, {9: {"logprob": -0.25}}]) == [
        -1.5,
        -0.25,
    ]
    with pytest.raises(GenerationError, match="no log-prob for sampled token 9"):
        _sampled_logprobs(0, [4, 9], [{4: {"logprob": -1.5}}, {8: {"logprob": -0.25}}])
    with pytest.raises(GenerationError, match="1 log-prob entries for 2 tokens"):
        _sampled_logprobs(0, [4, 9], [{4: {"logprob": -1.5}}])


@pytest.mark.parametrize(
    "template, why",
    [
        ("{prompt}\nPut the final answer in \\boxed{}.", "IndexError: Replacement index 0"),
        ("{question}", "KeyError: 'question'"),
        ("{prompt} {", "ValueError: Single '{' encountered"),
        ("Solve it.", "has no {prompt}, so every question would get the same message"),
    ],
)
def test_a_prompt_template_str_format_cannot_fill_fails_at_load(template, why):
    """The eval stage fills eval.prompt_template with str.format; a stray `\\boxed{}` used to
    fail there, at eval, after training. Now the config fails as it loads, naming the field."""
    with pytest.raises(ConfigError) as e:
        from_dict({"eval": {"prompt_template": template}})
    assert str(e.value).startswith(f"eval.prompt_template={template!r}: {why}")
    # doubled braces are literal braces: the eval stage's message keeps them single
    from raydc.eval.stage import user_message

    cfg = from_dict({"eval": {"prompt_template": "{prompt}\nIn \\boxed{{}}."}})
    assert user_message(cfg.eval, "2+2?") == "2+2?\nIn \\boxed{}."


def test_reverse_kl_gives_its_engine_the_eval_folder_for_vllms_errors(tmp_path, monkeypatch):
    """val_reverse_kl's student engine, like eval's, writes vLLM's errors to the trial's
    eval folder (log_dir), so that an engine that dies is reported with its own error; the
    figure is the mean of log p_S - log p_T over the sampled tokens (hand-computed)."""
    import numpy as np

    import raydc.engines
    import raydc.eval.reverse_kl as rkl
    from raydc.engines.sampler import Sample
    from raydc.infra.models import tokenizer_path

    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "What is 2+3?", "answer": "#### 5"}) + "\n")
    model = tokenizer_path("tiny-bpe")  # the teacher shares the student's tokenizer
    cfg = from_dict({"eval": {"path": str(data)}, "score": {"teacher": model}})
    seen = {}

    def sample_requests(model_dir, tokenizer, prompt_ids, s, ecfg, address, engine, **kw):
        seen.update(kw, prompts=len(prompt_ids))
        return "local", iter([[Sample(0, [7, 8], [-1.0, -2.0], "stop")]])

    class Teacher:
        def score(self, rows):
            (ids,) = rows
            return [np.array([0.0] * (len(ids) - 2) + [-1.5, -1.0], np.float32)]

        def close(self):
            pass

    monkeypatch.setattr(rkl, "sample_requests", sample_requests)
    monkeypatch.setattr(raydc.engines, "make_scorer", lambda *a, **k: Teacher())
    out = rkl.reverse_kl(cfg, model, tmp_path / "trial" / "eval")
    assert seen == {"log_dir": tmp_path / "trial" / "eval", "prompts": 1}
    # (-1.0 - -1.5) and (-2.0 - -1.0): 0.5 and -1.0, mean -0.25 per token
    assert out["val_reverse_kl"] == pytest.approx(-0.25)
    assert out["sampled_tokens"] == 2 and out["samples"] == 1
