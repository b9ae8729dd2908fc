"""Greedy generation and the evaluations: free generation, teacher-forced validity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from raydc.quality.task import EOS, PAD, Problem, decode, encode, grade, solution, valid_next_tokens
from raydc.quality.traces import build_trace_set


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch: int = 512,
) -> list[list[int]]:
    """Greedy (temperature 0) or sampled continuations with a KV cache; left padding.
    Returns each continuation up to and including EOS (or max_new_tokens tokens)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    outs: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        B, P = len(chunk), max(len(p) for p in chunk)
        ids = torch.full((B, P), PAD, dtype=torch.long)
        att = torch.zeros(B, P, dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, P - len(p) :] = torch.tensor(p)
            att[j, P - len(p) :] = 1
        pos = (att.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
        nxt_pos = pos[:, -1] + 1
        done = torch.zeros(B, dtype=torch.bool)
        gen = torch.full((B, max_new_tokens), PAD, dtype=torch.long)
        for t in range(max_new_tokens):
            logits = logits.float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                tok = torch.multinomial(probs, 1, generator=g).squeeze(1)
            else:
                tok = logits.argmax(-1)
            tok = torch.where(done, torch.full_like(tok, PAD), tok)
            gen[:, t] = tok
            done = done | (tok == EOS)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            att = torch.cat([att, torch.ones(B, 1, dtype=torch.long)], dim=1)
            out = model(
                input_ids=tok[:, None],
                attention_mask=att,
                position_ids=nxt_pos[:, None],
                past_key_values=past,
                use_cache=True,
            )
            past, logits = out.past_key_values, out.logits[:, -1]
            nxt_pos = nxt_pos + 1
        for j in range(B):
            row = gen[j].tolist()
            k = row.index(EOS) + 1 if EOS in row else len(row)
            outs.append(row[:k])
    return outs


def max_new_tokens_for(max_digits: int) -> int:
    return 5 * max_digits + 8


def free_generation_metrics(problems: Sequence[Problem], outputs: Sequence[list[int]]) -> dict:
    grades = [grade(p, decode(o)) for p, o in zip(problems, outputs)]
    n = len(grades)
    lens = [len(o) for o in outputs]
    mean_len = sum(lens) / n
    return {
        "n": n,
        "accuracy": sum(g.valid for g in grades) / n,
        "answer_correct": sum(g.correct for g in grades) / n,
        "derailed": sum(not g.valid for g in grades) / n,
        "unfinished": sum(not g.finished for g in grades) / n,
        "forward_share": sum(g.style == "forward" for g in grades) / n,
        "backward_share": sum(g.style == "backward" for g in grades) / n,
        "other_share": sum(g.style == "other" for g in grades) / n,
        "length_mean": mean_len,
        "length_sd": math.sqrt(sum((x - mean_len) ** 2 for x in lens) / n),
        # Length error relative to a correct trace (5 tokens a digit + "#r" + EOS).
        "length_error_sd": math.sqrt(
            sum((len(o) - (5 * len(p.digits) + 3)) ** 2 for p, o in zip(problems, outputs)) / n
        ),
    }


@torch.no_grad()
def teacher_forced_metrics(model, problems: Sequence[Problem], style: str) -> dict:
    """Per-position argmax validity on correct reference traces of ``style``.

    ``predicted_accuracy``: share of problems whose every position is valid under teacher
    forcing (what free greedy decoding would reach if its own prefixes behaved like the
    reference's). ``step_accuracy``: share of valid steps; ``independent_prediction``:
    step_accuracy ** mean steps.
    """
    refs = [solution(p, style) for p in problems]
    ts = build_trace_set([encode(p.prompt) for p in problems], [encode(r) + [EOS] for r in refs])
    model.eval()
    hidden = model.model(input_ids=ts.ids_BL).last_hidden_state
    pred = model.lm_head(hidden[:, :-1]).argmax(-1)  # [B, L - 1]
    tok_ok = tok_n = step_ok = step_n = all_ok = 0
    for i, (p, r) in enumerate(zip(problems, refs)):
        allowed = valid_next_tokens(p, r)
        a = len(encode(p.prompt)) - 1
        row = pred[i, a : a + len(allowed)].tolist()
        ok = [t in s for t, s in zip(row, allowed)]
        tok_ok += sum(ok)
        tok_n += len(ok)
        steps = [all(ok[k : k + 5]) for k in range(0, len(ok) - 3, 5)]
        step_ok += sum(steps)
        step_n += len(steps)
        all_ok += all(ok)
    n = len(problems)
    step_acc = step_ok / step_n
    mean_steps = step_n / n
    return {
        "token_accuracy": tok_ok / tok_n,
        "step_accuracy": step_acc,
        "predicted_accuracy": all_ok / n,
        "independent_prediction": step_acc**mean_steps,
    }


def evaluate(
    model,
    eval_problems: Sequence[Problem],
    side_problems: Sequence[Problem],
    seed: int,
    max_digits: int,
    tf_style: str = "backward",
) -> dict:
    """Greedy and T = 1 sampled accuracy, trace stability, style shares, side-task
    accuracy (the prior-only capability) and the teacher-forced prediction."""
    prompts = [encode(p.prompt) for p in eval_problems]
    mnt = max_new_tokens_for(max_digits)
    greedy = free_generation_metrics(eval_problems, generate(model, prompts, mnt))
    sampled = free_generation_metrics(
        eval_problems, generate(model, prompts, mnt, temperature=1.0, seed=seed)
    )
    side_out = generate(model, [encode(p.prompt) for p in side_problems], max_digits + 2)
    side_acc = sum(grade(p, decode(o)).valid for p, o in zip(side_problems, side_out)) / len(
        side_problems
    )
    # Teacher forcing on correct references of both styles; the gap is measured against
    # the better of the two predictions, so a student that stays in its own style is not
    # charged for the style it does not use.
    tf = teacher_forced_metrics(model, eval_problems, tf_style)
    other = "forward" if tf_style == "backward" else "backward"
    tf_other = teacher_forced_metrics(model, eval_problems, other)
    best = max(tf["predicted_accuracy"], tf_other["predicted_accuracy"])
    return {
        "greedy": greedy,
        "sampled": sampled,
        "side_accuracy": side_acc,
        "teacher_forced": tf,
        f"teacher_forced_{other}": tf_other,
        "tf_predicted_best": best,
        "exposure_gap": best - greedy["accuracy"],
    }
