"""Generation and the benchmark's measures: accuracy (greedy, sampled), derailed share,
length spread, the teacher-forced prediction, the prior kept, and ExAccErr.

ExAccErr (Arora et al. 2022, "Why exposure bias matters"; the form MiniLLM uses), with the
teacher p as the oracle and the student q:

    eps(l) = E_{y ~ p} [ 1/l * sum_{t<=l} KL(p(.|y<t) || q(.|y<t)) ]   (teacher's prefixes)
    R(l)   = E_{y ~ q} [ sum_{t<=l} KL(p(.|y<t) || q(.|y<t)) ]          (student's prefixes)
    ExAccErr(l) = (R(l) - l * eps(l)) / (l * eps(l)) * 100%

the error the student accumulates on its own prefixes beyond what its per-step error under
teacher forcing predicts. Each KL is exact over the vocabulary; each expectation is the
mean over the T = 1 samples (one per evaluation prompt) that reach length l.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bench.quality.task import PAD, Problem, grade

EXACC_LENGTHS = (8, 16, 24, 32)
MIN_SAMPLES = 10  # fewer samples of a length than this: ExAccErr(l) is not estimated
EXACC_PROMPTS = 100  # ExAccErr uses the first this many evaluation prompts


def _left_padded(prompts: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), PAD, dtype=torch.long)
    att = torch.zeros(B, P, dtype=torch.long)
    for j, p in enumerate(prompts):
        ids[j, P - len(p) :] = torch.tensor(p)
        att[j, P - len(p) :] = 1
    return ids, att


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[list[int]],
    eos: int,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    batch: int = 256,
    with_logprobs: bool = False,
):
    """Greedy (temperature 0) or sampled continuations with a KV cache, left padding.
    Each continuation runs up to and including ``eos`` (or max_new_tokens tokens).
    ``with_logprobs``: ``(continuations, logprobs)``, each token's log-prob under the
    distribution it was drawn from (log_softmax(logits / temperature); the model's own at
    temperature 1 or 0): the sampling policy's log-probs of on-policy distillation."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    outs: list[list[int]] = []
    lps: list[list[float]] = []
    for i in range(0, len(prompts), batch):
        ids, att = _left_padded(prompts[i : i + batch])
        B = ids.shape[0]
        pos = (att.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
        nxt_pos = pos[:, -1:] + 1
        done = torch.zeros(B, dtype=torch.bool)
        gen = torch.full((B, max_new_tokens), PAD, dtype=torch.long)
        gen_lp = torch.zeros(B, max_new_tokens)
        for t in range(max_new_tokens):
            logits = out.logits[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                tok = torch.multinomial(probs, 1, generator=g).squeeze(1)
            else:
                tok = logits.argmax(-1)
            if with_logprobs:
                scaled = logits / temperature if temperature > 0 else logits
                gen_lp[:, t] = torch.log_softmax(scaled, -1).gather(1, tok[:, None]).squeeze(1)
            gen[:, t] = torch.where(done, torch.full_like(tok, PAD), tok)
            done = done | (tok == eos)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            att = torch.cat([att, torch.ones(B, 1, dtype=torch.long)], dim=1)
            out = model(
                input_ids=tok[:, None],
                attention_mask=att,
                position_ids=nxt_pos,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            nxt_pos = nxt_pos + 1
        for row, lp in zip(gen.tolist(), gen_lp.tolist()):
            n = row.index(eos) + 1 if eos in row else len(row)
            outs.append(row[:n])
            lps.append(lp[:n])
    return (outs, lps) if with_logprobs else outs


def free_generation_metrics(problems: Sequence[Problem], texts: Sequence[str]) -> dict:
    """Accuracy, derailed share and the spread of the step-line count's error."""
    grades = [grade(p, t) for p, t in zip(problems, texts)]
    n = len(grades)
    errs = [g.lines_error for g in grades]
    return {
        "accuracy": sum(g.correct for g in grades) / n,
        "derailed": sum(g.derailed for g in grades) / n,
        "lines_error_sd": math.sqrt(sum(e * e for e in errs) / n),
    }


def _rows(prompts: Sequence[list[int]], responses: Sequence[list[int]]):
    """Right-padded prompt + response rows and each response's first target index."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    ids = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, [len(p) - 1 for p in prompts]


@torch.no_grad()
def teacher_forced_prediction(model, prompts, gold: Sequence[list[int]], batch: int = 128):
    """Per token of the gold responses, whether the model's argmax is the gold token.
    ``predicted_accuracy``: share of responses whose every token is (what free greedy
    decoding would reach if its own prefixes behaved like the gold ones)."""
    ok_all = ok_tok = n_tok = 0
    for i in range(0, len(gold), batch):
        ids, starts = _rows(prompts[i : i + batch], gold[i : i + batch])
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        for j, (a, r) in enumerate(zip(starts, gold[i : i + batch])):
            ok = pred[j, a : a + len(r)] == torch.tensor(r)
            ok_all += bool(ok.all())
            ok_tok += int(ok.sum())
            n_tok += len(r)
    return {"predicted_accuracy": ok_all / len(gold), "token_accuracy": ok_tok / n_tok}


@torch.no_grad()
def step_kl(teacher, student, prompts, responses, batch: int = 64) -> list[list[float]]:
    """KL(p_teacher || q_student) of the next-token distributions at each response
    position (exact over the vocabulary), one list per response."""
    out: list[list[float]] = []
    for i in range(0, len(responses), batch):
        ids, starts = _rows(prompts[i : i + batch], responses[i : i + batch])
        lp = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1].float(), -1)
        lq = torch.log_softmax(student(input_ids=ids).logits[:, :-1].float(), -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)  # [B, L - 1]
        for j, (a, r) in enumerate(zip(starts, responses[i : i + batch])):
            out.append(kl[j, a : a + len(r)].tolist())
    return out


def exacc_err(
    student_kl: Sequence[Sequence[float]],
    teacher_kl: Sequence[Sequence[float]],
    lengths: Sequence[int] = EXACC_LENGTHS,
) -> dict[str, float]:
    """ExAccErr(l) in percent per length l (module docstring) from per-step KLs along the
    student's own samples (R) and along the teacher's samples (eps); NaN where fewer than
    MIN_SAMPLES samples of either reach length l."""
    out = {}
    for L in lengths:
        own = [sum(k[:L]) for k in student_kl if len(k) >= L]
        forced = [sum(k[:L]) / L for k in teacher_kl if len(k) >= L]
        if len(own) < MIN_SAMPLES or len(forced) < MIN_SAMPLES:
            out[str(L)] = float("nan")
            continue
        R, eps = sum(own) / len(own), sum(forced) / len(forced)
        out[str(L)] = (R - L * eps) / (L * eps) * 100.0
    return out


def evaluate(model, teacher, data: dict, decode, seed: int, full: bool = True) -> dict:
    """Every measure of one model. ``data`` (stages.make_eval_data): eval problems with
    prompt ids, gold ids and the teacher's T = 1 samples; the prior's problems (lists of the
    student's known codes only). ``full`` False: greedy accuracy on ``data["eval"]`` only
    (the tune search on its validation split)."""
    eos, probs, prompts = data["eos"], data["eval"], data["eval_prompts"]
    n = data.get("max_new_tokens", 64)
    greedy_ids = generate(model, prompts, eos, max_new_tokens=n)
    greedy = free_generation_metrics(probs, [decode(o) for o in greedy_ids])
    if not full:
        return {"greedy": greedy}
    sampled_ids = generate(model, prompts, eos, temperature=1.0, seed=seed, max_new_tokens=n)
    sampled = free_generation_metrics(probs, [decode(o) for o in sampled_ids])
    prior_ids = generate(model, data["prior_prompts"], eos, max_new_tokens=n)
    prior = free_generation_metrics(data["prior"], [decode(o) for o in prior_ids])
    tf = teacher_forced_prediction(model, prompts, data["eval_gold"])
    k = EXACC_PROMPTS
    exacc = exacc_err(
        step_kl(teacher, model, prompts[:k], sampled_ids[:k]),
        step_kl(teacher, model, prompts[:k], data["teacher_samples"][:k]),
    )
    return {
        "greedy": greedy,
        "sampled": sampled,
        "prior_accuracy": prior["accuracy"],
        "teacher_forced": tf,
        "exposure_gap": tf["predicted_accuracy"] - greedy["accuracy"],
        "exacc_err": exacc,
        "length_mean": sum(map(len, sampled_ids)) / len(sampled_ids),
    }
