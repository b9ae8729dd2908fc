"""The embedded default's shipped task, traces and trained models (raydc/assets/sumtask/):
the traces solve the prompts they answer, the teacher knows every code and the student only
the codes of its own world, the regime in which the default run shows a student getting
better. Gold answers are recomputed here from the prompt and the code table the record
ships, not read from the traces."""

from __future__ import annotations

import json
import re

import pytest
import torch

from raydc.eval.graders import grade
from raydc.infra.models import ASSETS, load_tokenizer

SUMTASK = ASSETS / "sumtask"
RECORD = json.loads((SUMTASK / "models" / "TRAINING.json").read_text())
VALUES = RECORD["codes"]["values"]
KNOWN = set(RECORD["codes"]["known_to_student"])
PROMPT = re.compile(r"^Sum mod 10: ([a-z]{3}(?: [a-z]{3})+)$")


def codes(prompt: str) -> list[str]:
    m = PROMPT.match(prompt)
    assert m, prompt
    return m.group(1).split()


def gold(prompt: str) -> str:
    return str(sum(VALUES[c] for c in codes(prompt)) % 10)


def _rows(name):
    return [json.loads(x) for x in (SUMTASK / name).read_text().splitlines()]


def test_the_code_table():
    assert len(VALUES) == 40 and len(KNOWN) == 24 and KNOWN < set(VALUES)
    assert all(isinstance(v, int) and 0 <= v <= 9 for v in VALUES.values())


def test_traces_and_eval_rows():
    train, held_out = _rows("train.jsonl"), _rows("eval.jsonl")
    good = [r for r in train if isinstance(r.get("prompt"), str) and r.get("response")]
    assert len(train) == 802 and len(good) == 800  # and the 2 malformed rows
    assert len({r["prompt_id"] for r in good}) == 400
    right = sum(grade("gsm8k", r["response"], gold(r["prompt"])).correct for r in good)
    assert right / len(good) >= 0.95  # teacher samples at T=1: nearly all correct
    assert len(held_out) == 64
    for r in held_out:
        assert grade("gsm8k", r["answer"], gold(r["question"])).correct, r["id"]
    assert not {r["question"] for r in held_out} & {r["prompt"] for r in good}
    # Most held-out lists hold a code the student has never seen.
    new = sum(any(c not in KNOWN for c in codes(r["question"])) for r in held_out)
    assert new >= 32


@torch.no_grad()
def _greedy_accuracy(model_dir, prompts):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    right = 0
    for p in prompts:
        text = tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=64,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        response = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        right += grade("gsm8k", response, gold(p)).correct
    return right / len(prompts)


@pytest.mark.parametrize("lists", ["known codes only", "with new codes"])
def test_the_teacher_knows_every_code_the_student_only_its_own(lists):
    held_out = [r["question"] for r in _rows("eval.jsonl")]
    unseen = [any(c not in KNOWN for c in codes(p)) for p in held_out]
    prompts = [p for p, u in zip(held_out, unseen) if u == (lists == "with new codes")][:12]
    assert len(prompts) >= 5
    teacher = _greedy_accuracy(SUMTASK / "models" / "teacher", prompts)
    student = _greedy_accuracy(SUMTASK / "models" / "student", prompts)
    assert teacher >= 0.9, teacher
    if lists == "known codes only":
        assert student >= 0.75, student
    else:
        assert student <= 0.4, student  # what distillation has to teach it


def test_the_training_record_names_the_script_and_the_figures():
    assert RECORD["script"] == "scripts/build_sumtask.py"
    for role in ("teacher", "student"):
        assert RECORD[role]["seconds"] > 0 and RECORD[role]["greedy_accuracy_by_length"]
    assert RECORD["teacher"]["pool"] == "all" and RECORD["student"]["pool"] == "known"
