"""Build a task and a trained tiny teacher/student pair for it (the candidate for the
embedded default that shows a student getting better; issue 15).

    python scripts/build_sumtask.py --out /tmp/sumtask               # models + traces
    python scripts/build_sumtask.py --out /tmp/sumtask --only data   # re-sample the traces

The task is a running value mod 10 over a labelled digit list, two operations:

    prompt    Sum mod 10: a3 b9 c4        Diff mod 10: a3 b9 c4
    response  a3=3                        a3=3
              b9=2                        b9=4
              c4=6                        c4=0
              #### 6                      #### 0

one scratchpad line per item, the answer after ``####`` (the stock ``gsm8k`` grader reads
it). Both models are Qwen2 shapes with the shipped ``tiny-bpe`` tokenizer, trained from
scratch on fresh problems in the chat format prepare renders (loss on the answer and its
end-of-turn token, as in raydc's trainer), saved as float16 and measured as saved:

- the teacher (192 x 3, the built-in teacher size) on both operations;
- the student (128 x 2) on ``Sum`` only: the skill the teacher has and the student lacks.

Then the data: ``train.jsonl`` holds 2 teacher samples at T=1 per training problem (the
candidates DASD selection chooses between) plus 2 malformed rows that prepare rejects;
``eval.jsonl`` holds held-out problems with their gold solution. ``models/TRAINING.json``
records the settings, the time taken and the greedy accuracy per operation and length.

Measured on the 2-core development machine (2026-12-04): the teacher, 1,000 steps in
489 s, solves both operations at every length 2-8 (0.98-1.00); the student, 800 steps in
222 s, solves ``Sum`` (0.94-1.00) and not ``Diff`` (0.10-0.32). Fine-tuning that student on
the teacher's traces within the default run's budget (<= 100 steps of ~54 traces) did not
teach it ``Diff`` (lr 3e-4: 0.51 -> 0.51 pass@1 over both operations; lr 1e-3 broke
``Sum``), so this pair is not the default yet (issue 15's closing notes say what was
tried and what to try next).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from raydc.models import build_tiny_model, load_tokenizer

LABELS = "abcdefghijklmnop"

TEACHER = {
    "ops": ("sum", "diff"),
    "lengths": (2, 8),
    "steps": 1000,
    "lr": 2e-3,
    "batch": 64,
    "seed": 1,
}
STUDENT = {"ops": ("sum",), "lengths": (2, 8), "steps": 800, "lr": 2e-3, "batch": 64, "seed": 2}
DATA = {"train_problems": 120, "samples": 2, "temperature": 1.0, "eval_problems": 64, "seed": 3}


# ----------------------------------------------------------------------------- the task


OPS = {"sum": "Sum", "diff": "Diff"}


@dataclass(frozen=True)
class Problem:
    op: str  # sum: s = s + d; diff: s = s - d (from the first digit), both mod 10
    digits: tuple[int, ...]


def make_problem(rng: random.Random, lengths: tuple[int, int], ops=("sum",)) -> Problem:
    op = ops[rng.randrange(len(ops))]
    return Problem(op, tuple(rng.randrange(10) for _ in range(rng.randint(*lengths))))


def prompt_text(p: Problem) -> str:
    return f"{OPS[p.op]} mod 10: " + " ".join(f"{LABELS[i]}{d}" for i, d in enumerate(p.digits))


def running(p: Problem) -> list[int]:
    out, s = [], 0
    for i, d in enumerate(p.digits):
        s = d if i == 0 else (s + d if p.op == "sum" else s - d) % 10
        out.append(s)
    return out


def solution(p: Problem) -> str:
    """One line per item: its label and digit, then the running value (``b9=2``)."""
    states = running(p)
    lines = [f"{LABELS[i]}{d}={s}" for i, (d, s) in enumerate(zip(p.digits, states))]
    return "\n".join(lines) + f"\n#### {states[-1]}"


def answer(p: Problem) -> int:
    return running(p)[-1]


# ----------------------------------------------------------------------------- training


class Encoder:
    """Chat-format token ids for (prompt, response) and the mask of the trained tokens."""

    def __init__(self, tok):
        self.tok = tok

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def pair(self, prompt: str, response: str) -> tuple[list[int], list[bool]]:
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
        text = self.tok.apply_chat_template(messages, tokenize=False)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        start = text.rindex(response)
        end_of_turn = start + len(response)  # the <|im_end|> after the answer is trained too
        ids = enc["input_ids"]
        mask = [s >= start and s <= end_of_turn and e > s for s, e in enc["offset_mapping"]]
        return ids, mask


def batch_tensors(pairs, pad_id: int):
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    attn = torch.zeros((len(pairs), width), dtype=torch.long)
    for r, (row, mask) in enumerate(pairs):
        ids[r, : len(row)] = torch.tensor(row)
        attn[r, : len(row)] = 1
        labels[r, : len(row)] = torch.tensor([t if m else -100 for t, m in zip(row, mask)])
    return ids, attn, labels


def train_model(role: str, spec: dict, out: Path, log) -> dict:
    from transformers import AutoModelForCausalLM

    build_tiny_model(out, role=role, tokenizer="tiny-bpe", seed=spec["seed"])
    tok = load_tokenizer(out)
    enc = Encoder(tok)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.manual_seed(spec["seed"])
    with torch.no_grad():  # the standard 0.02 init trains; the tiny models' wide one is for tests
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
    steps, warm = spec["steps"], 20

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if spec.get("constant"):  # a run stopped early: no decay
            return 1.0
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(spec["seed"])
    t0 = time.time()
    model.train()
    for step in range(steps):
        pairs = []
        for _ in range(spec["batch"]):
            prob = make_problem(rng, spec["lengths"], spec["ops"])
            pairs.append(enc.pair(prompt_text(prob), solution(prob)))
        ids, attn, labels = batch_tensors(pairs, tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"{role} step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
        if step + 1 in spec.get("probe_steps", ()):
            model.eval()
            probe = out.parent / f"{role}-step{step + 1}"
            model.save_pretrained(probe, safe_serialization=True)
            tok.save_pretrained(probe)
            acc = accuracy_by_length(model, tok, spec["lengths"], TEACHER["ops"], 30, seed=98)
            log(f"{role} step {step + 1}: {acc} mean {sum(acc.values()) / len(acc):.3f}")
            model.train()
    seconds = time.time() - t0
    # Shipped as float16 (half the bytes; every consumer loads it as float32), and measured
    # as shipped.
    model.eval().half().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    acc = accuracy_by_length(model, tok, spec["lengths"], TEACHER["ops"], per_length=50, seed=99)
    log(f"{role}: greedy accuracy by length {acc}")
    return {**spec, "seconds": round(seconds, 1), "greedy_accuracy_by_length": acc}


# ----------------------------------------------------------------------------- sampling


@torch.no_grad()
def generate(model, tok, prompts: list[str], temperature: float, seed: int, max_new=64):
    """Responses for ``prompts`` (greedy when temperature is 0), left-padded batches."""
    enc = Encoder(tok)
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(prompts), 64):
        rows = [enc.prompt_ids(p) for p in prompts[i : i + 64]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, width - len(row) :] = torch.tensor(row)
            attn[r, width - len(row) :] = 1
        kwargs = {"do_sample": False}
        if temperature > 0:
            kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        gen = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=max_new,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **kwargs,
        )
        for row in gen[:, width:]:
            out.append(tok.decode(row, skip_special_tokens=True))
    return out


def graded(response: str, p: Problem) -> bool:
    tail = response.rsplit("####", 1)[-1].strip().split()
    return "####" in response and bool(tail) and tail[0] == str(answer(p))


def accuracy_by_length(model, tok, lengths, ops, per_length: int, seed: int) -> dict[str, float]:
    """Greedy accuracy per operation and list length (``sum/5``)."""
    rng = random.Random(seed)
    acc = {}
    for op in ops:
        for n in range(lengths[0], lengths[1] + 1):
            probs = [
                Problem(op, tuple(rng.randrange(10) for _ in range(n))) for _ in range(per_length)
            ]
            responses = generate(model, tok, [prompt_text(p) for p in probs], 0.0, seed)
            acc[f"{op}/{n}"] = round(sum(map(graded, responses, probs)) / per_length, 3)
    return acc


# ----------------------------------------------------------------------------- data


def write_data(out: Path, log) -> dict:
    from transformers import AutoModelForCausalLM

    teacher_dir = out / "models" / "teacher"
    tok = load_tokenizer(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    rng = random.Random(DATA["seed"])
    seen: set[Problem] = set()

    def fresh(k: int) -> list[Problem]:
        got = []
        while len(got) < k:
            p = make_problem(rng, TEACHER["lengths"], TEACHER["ops"])
            if p not in seen:
                seen.add(p)
                got.append(p)
        return got

    eval_problems = fresh(DATA["eval_problems"])
    train_problems = fresh(DATA["train_problems"])
    prompts = [prompt_text(d) for d in train_problems for _ in range(DATA["samples"])]
    responses = generate(teacher, tok, prompts, DATA["temperature"], DATA["seed"])
    rows, correct = [], 0
    for k, (p, r) in enumerate(zip(prompts, responses)):
        prob = train_problems[k // DATA["samples"]]
        correct += graded(r, prob)
        pid = f"sumtask-train-{k // DATA['samples']}"
        rows.append(
            {"id": f"{pid}/t{k % DATA['samples']}", "prompt_id": pid, "prompt": p, "response": r}
        )
    # Two malformed rows, so the default run shows rejects.parquet at work.
    rows.append({"id": "sumtask-bad-0", "prompt_id": "sumtask-bad-0", "prompt": prompts[0]})
    rows.append({"id": "sumtask-bad-1", "prompt": 7, "response": "#### 7"})
    with open(out / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(out / "eval.jsonl", "w") as f:
        for k, d in enumerate(eval_problems):
            row = {"id": f"sumtask-eval-{k}", "question": prompt_text(d), "answer": solution(d)}
            f.write(json.dumps(row) + "\n")
    share = round(correct / len(responses), 3)
    log(
        f"data: {len(rows)} train rows ({share} of teacher samples correct), {len(eval_problems)} eval"
    )
    return {**DATA, "train_rows": len(rows), "teacher_sample_accuracy": share}


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", choices=("teacher", "student", "data"), default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out
    (out / "models").mkdir(parents=True, exist_ok=True)
    record_path = out / "models" / "TRAINING.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}

    def log(msg: str) -> None:
        print(msg, flush=True)

    for role, spec in (("teacher", TEACHER), ("student", STUDENT)):
        if args.only in (None, role):
            shutil.rmtree(out / "models" / role, ignore_errors=True)
            record[role] = train_model(role, spec, out / "models" / role, log)
            record_path.write_text(json.dumps(record, indent=2) + "\n")
    if args.only in (None, "data"):
        record["data"] = write_data(out, log)
    record["script"] = "scripts/build_sumtask.py"
    record["torch"] = torch.__version__
    record_path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
