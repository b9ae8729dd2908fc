"""Build the embedded default's task, its trained tiny teacher and student, and the traces.

    python scripts/build_sumtask.py --out raydc/assets/sumtask                # everything
    python scripts/build_sumtask.py --out raydc/assets/sumtask --only data    # re-sample

The task is a running sum mod 10 over a list of codes, each worth a digit (40 codes of
three letters, values fixed by a seed):

    prompt    Sum mod 10: sus sux jev
    response  sus0=0
              sux9=9
              jev5=4
              #### 4

one scratchpad line per code (the code, its value, the sum so far), the answer after
``####`` (the stock ``gsm8k`` grader reads it). Both models are the built-in tiny Qwen2
shapes (raydc.infra.models.TINY_SIZES) with the shipped ``tiny-bpe`` tokenizer, trained from
scratch on fresh problems in the chat format prepare renders (loss on the answer and its
end-of-turn token, as in raydc's trainer), saved as float16 and measured as saved:

- the teacher (192 x 3) on lists of all 40 codes: it knows every value;
- the student (128 x 2) on lists of the first 24 codes only: it has the algorithm, and has
  never seen the other 16 codes. The teacher knows something the student does not, and
  training on the teacher's traces can teach it.

Then the data: ``train.jsonl`` holds 2 teacher samples at T=1 for each of 400 training
problems over all codes (the candidates DASD selection chooses between) plus 2 malformed
rows that prepare rejects; ``eval.jsonl`` holds 64 held-out problems with their gold
solution. ``models/TRAINING.json`` records the settings, the time taken, the greedy accuracy
per list length (on lists of known codes, and on lists holding a new one) and the code
table. Problems come from seeded generators, so a rebuild repeats on one machine (CPU
kernels may differ across machines in the last bits).

What was tried before this task (2026-12-04, 2 cores), so nobody repeats it: a running
sum/difference task where the student knew only the sum did not learn the difference
within the default's budget (<= 100 steps of ~54 traces: 0.51 -> 0.51 pass@1 at lr 3e-4;
lr 1e-3 broke the sum), and an early-stopped student of the same task gained at most 0.11
in 100 steps: an algorithmic skill is learned too slowly by these tiny models. A missing
fact table is learned in tens of steps (a pilot: 0.23 -> 0.68 in 60 steps at lr 1e-3).
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

from raydc.infra.models import build_tiny_model, load_tokenizer

# The world: 40 three-letter codes, each worth a digit. The student was trained where only
# the first 24 exist; the teacher knows all 40.
CODE_SEED, N_CODES, N_KNOWN = 11, 40, 24
TEACHER = {"pool": "all", "lengths": (2, 6), "steps": 700, "lr": 2e-3, "batch": 64, "seed": 1}
STUDENT = {"pool": "known", "lengths": (2, 6), "steps": 800, "lr": 2e-3, "batch": 64, "seed": 2}
DATA = {"train_problems": 400, "samples": 2, "temperature": 1.0, "eval_problems": 64, "seed": 3}


def make_codes() -> dict[str, int]:
    """The codes and their values, in a fixed order (the first N_KNOWN are the student's)."""
    rng = random.Random(CODE_SEED)
    consonants = "bcdfghjklmnpqrstvwxz"
    codes: dict[str, int] = {}
    while len(codes) < N_CODES:
        c = rng.choice(consonants) + rng.choice("aeiou") + rng.choice(consonants)
        if c not in codes:
            codes[c] = -1
    return {c: rng.randrange(10) for c in codes}


VALUES = make_codes()
POOLS = {"all": list(VALUES), "known": list(VALUES)[:N_KNOWN], "new": list(VALUES)[N_KNOWN:]}


@dataclass(frozen=True)
class Problem:
    codes: tuple[str, ...]


def make_problem(rng: random.Random, lengths: tuple[int, int], pool: str = "all") -> Problem:
    return Problem(tuple(rng.choice(POOLS[pool]) for _ in range(rng.randint(*lengths))))


def prompt_text(p: Problem) -> str:
    return "Sum mod 10: " + " ".join(p.codes)


def running(p: Problem) -> list[int]:
    out, s = [], 0
    for c in p.codes:
        s = (s + VALUES[c]) % 10
        out.append(s)
    return out


def solution(p: Problem) -> str:
    """One line per code: the code, its value, the running sum (``jev5=4``)."""
    lines = [f"{c}{VALUES[c]}={s}" for c, s in zip(p.codes, running(p))]
    return "\n".join(lines) + f"\n#### {running(p)[-1]}"


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


def fit(model, pad_id: int, spec: dict, pair, log, after_step=None) -> float:
    """``spec["steps"]`` AdamW steps of ``spec["batch"]`` pairs (``pair(rng)``: one
    (ids, loss mask)), lr ``spec["lr"]``: a 20-step warmup, then a cosine to a tenth (held
    at 1 with ``spec["constant"]``: a run stopped early). ``after_step(step)`` runs in eval
    mode after each step. Returns the seconds it took."""
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
    steps, warm = spec["steps"], 20

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if spec.get("constant"):
            return 1.0
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(spec["seed"])
    t0 = time.time()
    model.train()
    for step in range(steps):
        ids, attn, labels = batch_tensors([pair(rng) for _ in range(spec["batch"])], pad_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
        if after_step is not None:
            model.eval()
            after_step(step)
            model.train()
    return time.time() - t0


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

    def pair(rng):
        prob = make_problem(rng, spec["lengths"], spec["pool"])
        return enc.pair(prompt_text(prob), solution(prob))

    def probe(step: int) -> None:
        if step + 1 in spec.get("probe_steps", ()):
            folder = out.parent / f"{role}-step{step + 1}"
            model.save_pretrained(folder, safe_serialization=True)
            tok.save_pretrained(folder)
            acc = accuracy_by_length(model, tok, spec["lengths"], 30, seed=98)
            log(f"{role} step {step + 1}: {acc} mean {sum(acc.values()) / len(acc):.3f}")

    seconds = fit(model, tok.pad_token_id, spec, pair, lambda m: log(f"{role} {m}"), probe)
    # Shipped as float16 (half the bytes; every consumer loads it as float32), and measured
    # as shipped.
    model.eval().half().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    acc = accuracy_by_length(model, tok, spec["lengths"], per_length=50, seed=99)
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


def accuracy_by_length(model, tok, lengths, per_length: int, seed: int) -> dict[str, float]:
    """Greedy accuracy per list length on lists of known codes only (``known/4``) and on
    lists holding at least one new code (``new/4``)."""
    rng = random.Random(seed)
    acc = {}
    for group in ("known", "new"):
        for n in range(lengths[0], lengths[1] + 1):
            probs = []
            while len(probs) < per_length:
                p = Problem(
                    tuple(
                        rng.choice(POOLS["known" if group == "known" else "all"]) for _ in range(n)
                    )
                )
                if group == "known" or any(c in POOLS["new"] for c in p.codes):
                    probs.append(p)
            responses = generate(model, tok, [prompt_text(p) for p in probs], 0.0, seed)
            acc[f"{group}/{n}"] = round(sum(map(graded, responses, probs)) / per_length, 3)
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
            p = make_problem(rng, TEACHER["lengths"], "all")
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
    record["codes"] = {"values": VALUES, "known_to_student": POOLS["known"]}
    record["script"] = "scripts/build_sumtask.py"
    record["torch"] = torch.__version__
    record_path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
