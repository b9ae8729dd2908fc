"""Build the models of the quality benchmark's capacity (C) and long-horizon (L) regimes.

    python scripts/build_regimes.py                     # all three models
    python scripts/build_regimes.py --only teacher_long # one of them

The knowledge regime (K) uses the embedded default's pair (raydc/assets/sumtask): the
student lacks 16 of the teacher's 40 codes. C and L need a student that already knows
every code, and teachers whose traces differ from what that student writes in a way each
regime names (docs/results.md defines the regimes). Each model here is a shipped sumtask
model fine-tuned further (the same trainer as scripts/build_sumtask.py: AdamW, a 20-step
warmup, cosine to 10%, loss on the answer and its end-of-turn token), saved as float16
under bench/quality/assets/<name>/ and measured as saved:

- ``student_all``: the shipped student (128 x 2) on lists of all 40 codes, 2-6 long, one
  line per code. It knows every code and the algorithm, on lists as long as it was taught.
- ``teacher_terse`` (C): the shipped teacher (192 x 3) writing each line without the
  code's value, ``sux=9``: the value's lookup and the addition merged into one token, a
  step the student was never taught to take at once (it writes ``sux9=9``).
- ``teacher_merged``: a first try at C, the teacher writing two codes a line
  (``sus0+sux9=9``, three digits summed in one token). Its 400 steps left it right on 2
  codes and at 0.15 / 0.075 on 4 / 6 (2026-12-06): a teacher that cannot do the task
  gives no regime, so C uses ``teacher_terse``. Kept here to rebuild that finding.
- ``teacher_long`` (L): the shipped teacher on lists of 2-16 codes, one line per code.

``bench/quality/assets/TRAINING.json`` records the settings, the time taken and each
model's greedy accuracy per list length, as built.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's raydc
_spec = importlib.util.spec_from_file_location("build_sumtask", ROOT / "scripts/build_sumtask.py")
sumtask = importlib.util.module_from_spec(_spec)
sys.modules["build_sumtask"] = sumtask  # its dataclasses look their module up
_spec.loader.exec_module(sumtask)

SHIPPED = ROOT / "raydc/assets/sumtask/models"
OUT = ROOT / "bench/quality/assets"
MODELS = {
    "student_all": dict(
        init="student", fmt="step", lengths=(2, 6), steps=300, batch=64, lr=1e-3, seed=21
    ),
    "teacher_terse": dict(
        init="teacher", fmt="terse", lengths=(2, 6), steps=400, batch=64, lr=1e-3, seed=24
    ),
    "teacher_merged": dict(
        init="teacher", fmt="merged", lengths=(2, 6), steps=400, batch=64, lr=1e-3, seed=22
    ),
    "teacher_long": dict(
        init="teacher", fmt="step", lengths=(2, 16), steps=500, batch=32, lr=1e-3, seed=23
    ),
}


def solution(p, fmt: str) -> str:
    """The scratchpad in ``fmt``: ``step`` (build_sumtask's, one code a line), ``terse``
    (one code a line without its value, ``sux=9``) or ``merged`` (two codes a line,
    ``sus0+sux9=9``; an odd last code alone)."""
    if fmt == "step":
        return sumtask.solution(p)
    sums, vals = sumtask.running(p), [sumtask.VALUES[c] for c in p.codes]
    if fmt == "terse":
        lines = [f"{c}={s}" for c, s in zip(p.codes, sums)]
        return "\n".join(lines) + f"\n#### {sums[-1]}"
    lines = []
    for i in range(0, len(p.codes), 2):
        j = min(i + 1, len(p.codes) - 1)
        parts = [f"{p.codes[k]}{vals[k]}" for k in range(i, j + 1)]
        lines.append("+".join(parts) + f"={sums[j]}")
    return "\n".join(lines) + f"\n#### {sums[-1]}"


def fine_tune(name: str, spec: dict, log) -> dict:
    from transformers import AutoModelForCausalLM

    out = OUT / name
    shutil.rmtree(out, ignore_errors=True)
    tok = sumtask.load_tokenizer(SHIPPED / spec["init"])
    enc = sumtask.Encoder(tok)
    model = AutoModelForCausalLM.from_pretrained(SHIPPED / spec["init"], dtype=torch.float32)
    torch.manual_seed(spec["seed"])

    def pair(rng):
        prob = sumtask.make_problem(rng, spec["lengths"], "all")
        return enc.pair(sumtask.prompt_text(prob), solution(prob, spec["fmt"]))

    seconds = sumtask.fit(model, tok.pad_token_id, spec, pair, lambda m: log(f"{name} {m}"))
    model.eval().half().save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    acc = accuracy_by_length(model, tok, (2, 16), per_length=40, seed=99)
    log(f"{name}: greedy accuracy by length {acc}")
    return {**spec, "seconds": round(seconds, 1), "greedy_accuracy_by_length": acc}


def accuracy_by_length(model, tok, lengths, per_length: int, seed: int) -> dict[str, float]:
    """Greedy accuracy (the answer after ``####``) on lists of all codes, per length."""
    rng = random.Random(seed)
    acc = {}
    for n in range(lengths[0], lengths[1] + 1, 2):
        probs = [sumtask.make_problem(rng, (n, n), "all") for _ in range(per_length)]
        prompts = [sumtask.prompt_text(p) for p in probs]
        responses = sumtask.generate(model, tok, prompts, 0.0, seed, max_new=24 + 8 * n)
        acc[str(n)] = round(sum(map(sumtask.graded, responses, probs)) / per_length, 3)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=sorted(MODELS), default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    record_path = OUT / "TRAINING.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    for name, spec in MODELS.items():
        if (args.only is None and name != "teacher_merged") or args.only == name:
            record[name] = fine_tune(name, spec, log)
            record["script"] = "scripts/build_regimes.py"
            record["torch"] = torch.__version__
            record_path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
