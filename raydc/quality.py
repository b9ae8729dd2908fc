"""The built-in quality benchmark's task, models, training loop and evaluation.

Why this task. A CPU pilot (see the project notes) found no exposure bias on a rigid task
and showed that what distribution correction changes is *which teacher tokens a student
learns from*. So the task here has:

- long step-by-step traces (8-14 steps, up to ~75 response tokens after a ~30-token
  prompt) with a checkable answer: a running sum mod 10 over a list of letter-labelled
  digits (``Sa3b9c4:``), one step per line naming the item, its digit and the sum
  (``c4=6``), then ``#answer``;
- two trace *styles* that are both correct but incompatible mid-trace: ``forward`` consumes
  the items a, b, c..., ``backward`` the last item first. A trace that starts in one style
  and drifts into the other skips or repeats items, so one slip derails it;
- a student with a strong, competent prior of its own: pre-trained on ``forward`` traces of
  shorter lists (3-10 digits) and on a side task (``D``: double each digit mod 10) that the
  teacher traces never show. What it keeps of that prior is measured, not assumed;
- a larger teacher trained on a mixture of styles (mostly ``backward``) and lengths 8-14,
  whose T = 1 samples (and noisier T = 1.5 samples, scored with T = 1 log-probs) are the
  offline traces.

Exposure bias is measured directly: one teacher-forced forward pass over a correct
reference trace says, per position, whether the student's argmax is a *valid* next token
(any unconsumed item's label, its digit, the right sum, the punctuation). The share of problems whose
every teacher-forced step is valid is what teacher forcing predicts for free generation;
free greedy generation on the same problems gives the realised accuracy.

Every training run (teacher, student pre-training, every arm) uses the library's loss:
``raydc.loss.chunked_token_logprobs`` for the per-token log-probs,
``raydc.weights.compute_weights`` for the weights and ``raydc.loss.weighted_token_loss``
for the reduction. Models are real Qwen2 causal LMs (head_dim 64, as vLLM CPU needs),
saved with ``save_pretrained`` so vLLM loads them. Nothing here imports ray.
"""

from __future__ import annotations

import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raydc.loss import chunked_token_logprobs, weighted_token_loss
from raydc.weights import WeightConfig, compute_weights, preset, weight_diagnostics

# ----------------------------------------------------------------------------- tokenizer

PAD, EOS = 0, 1
LETTERS = "abcdefghijklmn"  # item labels: lists hold up to 14 items
CHARS = "0123456789SD:=#\n" + LETTERS
VOCAB = ["<pad>", "<eos>", *CHARS]
VOCAB_SIZE = 64  # rounded up; ids >= len(VOCAB) never occur in data
_STOI = {c: i + 2 for i, c in enumerate(CHARS)}


def encode(text: str) -> list[int]:
    """Characters to ids; an unknown character is an error naming it."""
    try:
        return [_STOI[c] for c in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the task vocabulary") from None


def decode(ids: Sequence[int]) -> str:
    """Ids to text, stopping at the first EOS and dropping padding."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i == PAD:
            continue
        out.append(VOCAB[i] if i < len(VOCAB) else "?")
    return "".join(out)


# ----------------------------------------------------------------------------- the task

STYLES = ("forward", "backward")


@dataclass(frozen=True)
class Problem:
    """kind ``S``: running sum mod 10 over ``digits``; kind ``D``: double each digit (mod
    10), each after its label.

    The prompt labels each item with a letter (``Sa3b9c4:``); a step of the ``S`` trace
    names the item it consumes, its digit and the running sum (``c4=6``), one per line,
    then ``#answer``. Looking an item up by its label is easy for a small transformer;
    *which* label comes next is the trace's state, and that is where styles differ.
    """

    kind: str
    digits: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.digits) <= len(LETTERS):
            raise ValueError(f"a problem holds 1 to {len(LETTERS)} digits, got {len(self.digits)}")

    @property
    def prompt(self) -> str:
        items = "".join(f"{LETTERS[i]}{d}" for i, d in enumerate(self.digits))
        return f"{self.kind}{items}:"

    @property
    def answer(self) -> str:
        if self.kind == "S":
            return str(sum(self.digits) % 10)
        # Labelled like the prompt, after a mark (``=a6b8c8``): a look-up by label as in
        # the ``S`` trace, and distinct from it from the first token on.
        return "=" + "".join(f"{LETTERS[i]}{2 * d % 10}" for i, d in enumerate(self.digits))


def style_order(n: int, style: str) -> list[int]:
    """Item indices in the order a style consumes them."""
    if style == "forward":
        return list(range(n))
    if style == "backward":
        return list(range(n - 1, -1, -1))
    raise ValueError(f"style={style!r}: must be one of {STYLES}")


def solution(problem: Problem, style: str = "forward") -> str:
    """The correct response text (without EOS) in the given style."""
    if problem.kind == "D":
        return problem.answer
    lines, r = [], 0
    for i in style_order(len(problem.digits), style):
        d = problem.digits[i]
        r = (r + d) % 10
        lines.append(f"{LETTERS[i]}{d}={r}\n")
    return "".join(lines) + f"#{r}"


def make_problems(
    n: int, rng: random.Random, lengths: tuple[int, int], kind: str = "S"
) -> list[Problem]:
    """n random problems with list lengths uniform in [lo, hi]."""
    lo, hi = lengths
    return [
        Problem(kind, tuple(rng.randrange(10) for _ in range(rng.randint(lo, hi))))
        for _ in range(n)
    ]


_STEP = re.compile(r"([a-n])(\d)=(\d)")


@dataclass
class Grade:
    """What a response did. ``valid``: every step names an item not yet consumed, with
    its digit and the right running sum; every item is consumed once; the answer is
    right."""

    correct: bool  # the final answer is right
    valid: bool
    finished: bool  # reached ``#answer`` (then EOS or the end)
    n_steps: int
    style: str  # forward | backward | other


def grade(problem: Problem, response: str) -> Grade:
    """Grade a decoded response (text up to EOS) for ``problem``."""
    if problem.kind == "D":
        ok = response == problem.answer
        return Grade(ok, ok, True, 0, "other")
    body, sep, ans = response.partition("#")
    finished = bool(sep) and len(ans) == 1 and ans.isdigit()
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    n = len(problem.digits)
    consumed: list[int] = []
    r, steps_ok = 0, True
    for line in lines:
        m = _STEP.fullmatch(line)
        if not m:
            steps_ok = False
            break
        i, d, got = LETTERS.index(m.group(1)), int(m.group(2)), int(m.group(3))
        if i >= n or i in consumed or problem.digits[i] != d or got != (r + d) % 10:
            steps_ok = False
        r = got
        consumed.append(i)
    correct = finished and ans == problem.answer
    valid = correct and steps_ok and sorted(consumed) == list(range(n))
    if consumed == style_order(n, "forward"):
        style = "forward"
    elif consumed == style_order(n, "backward"):
        style = "backward"
    else:
        style = "other"
    return Grade(correct, valid, finished, len(lines), style)


def valid_next_tokens(problem: Problem, response: str) -> list[set[int]]:
    """For each position of ``response + EOS``: the set of token ids that are a valid next
    token *given the reference prefix before it* (any unconsumed item's label, then that
    item's digit, the right sum, the punctuation). ``response`` must be a correct ``S``
    solution in any style."""
    if problem.kind != "S":
        raise ValueError("valid_next_tokens is defined for S problems")
    left = set(range(len(problem.digits)))
    r, out = 0, []
    lines = response.split("\n")
    for line in lines[:-1]:
        m = _STEP.fullmatch(line)
        if not m:
            raise ValueError(f"reference step {line!r} is malformed")
        i = LETTERS.index(m.group(1))
        d = problem.digits[i]
        out.append({_STOI[LETTERS[k]] for k in left})
        out.append({_STOI[str(d)]})
        out.append({_STOI["="]})
        out.append({_STOI[str((r + d) % 10)]})
        out.append({_STOI["\n"]})
        left.discard(i)
        r = (r + d) % 10
    if lines[-1] != f"#{r}":
        raise ValueError(f"reference answer {lines[-1]!r} is not #{r}")
    out.append({_STOI["#"]})
    out.append({_STOI[str(r)]})
    out.append({EOS})
    return out


# ----------------------------------------------------------------------------- models

# (hidden, layers, heads, kv heads, intermediate); head_dim = hidden / heads = 64.
TEACHER_SIZE = (192, 3, 3, 1, 512)
STUDENT_SIZE = (128, 3, 2, 1, 256)


def build_model(sizes: tuple[int, int, int, int, int], seed: int, max_len: int = 256):
    """A random-init Qwen2 causal LM over the task vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter = sizes
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float()


def save_model(model, path: str | os.PathLike) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def load_model(path: str | os.PathLike):
    from transformers import Qwen2ForCausalLM

    return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- trace sets


@dataclass
class TraceSet:
    """Padded token rows and per-target arrays (position t scores token t + 1).

    ids_BL: prompt + response + EOS, right-padded with PAD. Target arrays are [B, L - 1]:
    loss_mask (response tokens and EOS), teacher_lp (teacher log-probs, 0 where unknown),
    student_lp (the initial student's log-probs, filled by ``score_traces``), sentence_ids
    (one sentence per step line). prompt_id groups candidates of one problem.
    """

    ids_BL: torch.Tensor
    loss_mask: torch.Tensor
    teacher_lp: torch.Tensor
    student_lp: torch.Tensor
    sentence_ids: torch.Tensor
    prompt_id: torch.Tensor
    lengths: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids_BL.shape[0])

    def subset(self, idx: Sequence[int]) -> TraceSet:
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        return TraceSet(
            self.ids_BL[ix],
            self.loss_mask[ix],
            self.teacher_lp[ix],
            self.student_lp[ix],
            self.sentence_ids[ix],
            self.prompt_id[ix],
            self.lengths[ix],
            dict(self.meta),
        )

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TraceSet:
        return cls(**torch.load(path, weights_only=False))


def build_trace_set(
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    teacher_lps: Sequence[Sequence[float]] | None = None,
    prompt_ids: Sequence[int] | None = None,
) -> TraceSet:
    """Rows from prompt ids and response ids (each response already ends with EOS if it
    finished). teacher_lps[i][j] is the teacher's log-prob of responses[i][j]."""
    n = len(prompts)
    if len(responses) != n:
        raise ValueError(f"{n} prompts but {len(responses)} responses")
    lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(lens)
    ids = torch.full((n, L), PAD, dtype=torch.long)
    mask = torch.zeros(n, L - 1, dtype=torch.bool)
    tlp = torch.zeros(n, L - 1, dtype=torch.float32)
    sid = torch.zeros(n, L - 1, dtype=torch.long)
    nl = _STOI["\n"]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if not p or not r:
            raise ValueError(f"row {i}: empty prompt or response")
        row = list(p) + list(r)
        ids[i, : len(row)] = torch.tensor(row)
        a, b = len(p) - 1, len(row) - 1  # targets of the response tokens
        mask[i, a:b] = True
        if teacher_lps is not None:
            lp = teacher_lps[i]
            if len(lp) != len(r):
                raise ValueError(f"row {i}: {len(lp)} teacher log-probs for {len(r)} tokens")
            tlp[i, a:b] = torch.tensor(lp, dtype=torch.float32)
        # Sentence = step line: a token belongs to the line it is on (the newline closes it).
        s = 0
        for j, tok in enumerate(r):
            sid[i, a + j] = s
            if tok == nl:
                s += 1
    pid = torch.tensor(list(prompt_ids) if prompt_ids is not None else range(n))
    return TraceSet(ids, mask, tlp, torch.zeros_like(tlp), sid, pid, torch.tensor(lens))


def examples_to_trace_set(problems: Sequence[Problem], styles: Sequence[str]) -> TraceSet:
    prompts = [encode(p.prompt) for p in problems]
    responses = [encode(solution(p, s)) + [EOS] for p, s in zip(problems, styles)]
    return build_trace_set(prompts, responses)


# ----------------------------------------------------------------------------- log-probs


def token_logprobs(model, ids_BL: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """log p(ids[:, t + 1] | ids[:, :t + 1]) [B, L - 1] via the library's chunked CE.

    Rows are right-padded, so no attention mask is needed: causal attention never lets a
    real token see the padding after it, and padded targets are off the loss mask.
    """
    hidden = model.model(input_ids=ids_BL).last_hidden_state  # [B, L, H]
    return chunked_token_logprobs(
        hidden[:, :-1], model.lm_head.weight, ids_BL[:, 1:], chunk_size=chunk_size
    )


@torch.no_grad()
def score_traces(model, ts: TraceSet, batch: int = 256) -> torch.Tensor:
    """The model's log-probs of every target [B, L - 1] (0 off the loss mask)."""
    model.eval()
    out = torch.zeros_like(ts.teacher_lp)
    for i in range(0, len(ts), batch):
        ids = ts.ids_BL[i : i + batch]
        L = int(ts.lengths[i : i + batch].max())
        lp = token_logprobs(model, ids[:, :L])
        m = ts.loss_mask[i : i + batch, : L - 1]
        out[i : i + batch, : L - 1] = torch.where(m, lp, torch.zeros_like(lp))
    return out


# ----------------------------------------------------------------------------- training


@dataclass
class TrainSpec:
    """One fine-tuning run. ``weights`` None means the ``sft`` preset."""

    steps: int
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 10
    weights: WeightConfig | None = None
    student_ref: str = "current"  # current | init (ts.student_lp)
    seed: int = 0
    grad_clip: float = 1.0
    decay: bool = False  # cosine decay to 10% after warmup (pre-training; arms keep it off)


def train(
    model,
    ts: TraceSet,
    spec: TrainSpec,
    on_step: Callable[[int, object], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """AdamW on the weighted token loss; constant LR after a linear warmup, so the model
    after k steps of a longer run equals a k-step run (budgets nest). ``on_step(step,
    model)`` is called after each step (the benchmark evaluates there)."""
    cfg = spec.weights or preset("sft")
    g = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)

    def lr_factor(s: int) -> float:
        warm = min(1.0, (s + 1) / max(1, spec.warmup_steps))
        if not spec.decay:
            return warm
        frac = min(1.0, s / max(1, spec.steps))
        return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    n = len(ts)
    stats = {"loss": [], "w_mean": [], "ess_fraction": []}
    t0, tokens = time.time(), 0
    for step in range(1, spec.steps + 1):
        model.train()
        idx = torch.randint(0, n, (spec.batch_size,), generator=g)
        L = int(ts.lengths[idx].max())
        ids = ts.ids_BL[idx, :L]
        m = ts.loss_mask[idx, : L - 1]
        logp = token_logprobs(model, ids)  # [B, L - 1], carries gradient
        if cfg.transform == "none":
            w = None
        else:
            s_lp = logp.detach() if spec.student_ref == "current" else ts.student_lp[idx, : L - 1]
            w = compute_weights(s_lp, ts.teacher_lp[idx, : L - 1], m, cfg)
        loss = weighted_token_loss(-logp, w, m, cfg.normalization)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        sched.step()
        tokens += int(m.sum())
        if step % 10 == 0 or step == spec.steps:
            stats["loss"].append(float(loss.detach()))
            if w is not None:
                d = weight_diagnostics(w, m, cfg)
                stats["w_mean"].append(d["mean"])
                stats["ess_fraction"].append(d["ess_fraction"])
            if log and step % 100 == 0:
                log(f"  step {step}/{spec.steps} loss {float(loss.detach()):.4f}")
        if on_step is not None:
            on_step(step, model)
    wall = time.time() - t0
    return {
        "steps": spec.steps,
        "wall_s": wall,
        "loss_tokens_per_s": tokens / max(wall, 1e-9),
        "final_loss": stats["loss"][-1] if stats["loss"] else float("nan"),
        "mean_weight": _mean(stats["w_mean"]),
        "mean_ess_fraction": _mean(stats["ess_fraction"]),
    }


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


# ----------------------------------------------------------------------------- generation


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


# ----------------------------------------------------------------------------- evaluation


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


# ----------------------------------------------------------------------------- vLLM sampling


def sample_with_vllm(
    model_dir: str,
    prompts: Sequence[list[int]],
    n: int,
    temperatures: Sequence[float],
    max_tokens: int,
    seed: int = 0,
) -> dict[float, list[list[tuple[list[int], list[float]]]]]:
    """Sample ``n`` continuations per prompt with one vLLM engine at each temperature;
    return {temperature: per prompt, [(token ids incl. EOS when reached, log-probs)]}.

    ``logprobs_mode="raw_logprobs"``: the log-probs are log-softmax of the raw logits, i.e.
    under the T = 1 distribution. At T = 1 (no top-k/top-p) that *is* the sampled
    distribution; for hotter sampling it is the teacher's own T = 1 view of the noisy
    token, which is what the weights compare the student to.
    """
    from raydc.models import offline_env

    offline_env()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.05,
        skip_tokenizer_init=True,
        enforce_eager=True,
        enable_prefix_caching=False,
        logprobs_mode="raw_logprobs",
        seed=seed,
    )
    # No per-request seed: it would give every prompt the same random stream. The engine
    # seed makes a run reproducible.
    requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
    results = {}
    for temperature in temperatures:
        params = SamplingParams(
            n=n,
            temperature=float(temperature),
            top_p=1.0,
            top_k=0,
            max_tokens=max_tokens,
            logprobs=0,
            detokenize=False,
            stop_token_ids=[EOS],
        )
        outs = llm.generate(requests, params, use_tqdm=False)
        if len(outs) != len(requests):
            raise RuntimeError(f"vLLM returned {len(outs)} results for {len(requests)} prompts")
        result = []
        for i, o in enumerate(outs):
            cands = []
            for c in o.outputs:
                ids = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) != len(ids):
                    raise RuntimeError(f"prompt {i}: log-probs missing for the sampled tokens")
                lps = [float(entry[t].logprob) for t, entry in zip(ids, c.logprobs)]
                cands.append((ids, lps))
            result.append(cands)
        results[float(temperature)] = result
    del llm
    return results


def check_vllm_logprobs(model, prompts, samples, k: int = 32) -> float:
    """Max |vLLM log-prob - transformers log-prob| over the first k samples' tokens."""
    rows_p, rows_r, rows_lp = [], [], []
    for p, cands in zip(prompts, samples):
        for ids, lps in cands:
            rows_p.append(p)
            rows_r.append(ids)
            rows_lp.append(lps)
            if len(rows_p) >= k:
                break
        if len(rows_p) >= k:
            break
    ts = build_trace_set(rows_p, rows_r, rows_lp)
    ref = score_traces(model, ts)
    return float((ref - ts.teacher_lp).abs()[ts.loss_mask].max())


def write_json_safe(obj):
    """Floats that JSON can hold (NaN -> None)."""
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: write_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [write_json_safe(v) for v in obj]
    return obj


def ensure_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


# ----------------------------------------------------------------------------- benchmark jobs

_CACHE: dict = {}


def _cached(key: str, loader: Callable[[], object]):
    if key not in _CACHE:
        _CACHE[key] = loader()
    return _CACHE[key]


def worker_init(threads: int = 1) -> None:
    """Pool initializer: one torch thread per worker process (2 workers on 2 cores)."""
    from raydc.models import offline_env

    offline_env()
    torch.set_num_threads(threads)


def run_job(job: dict) -> list[dict]:
    """Fine-tune the initial student on one trace set with one weighting and seed; evaluate
    at each budget (the budgets nest: one run, evaluated on the way). Returns one record a
    budget. Job keys: tags (copied into each record), traces (TraceSet path), student_dir, weights (WeightConfig dict
    or None for sft), seed, budgets, lr, batch_size, warmup_steps, student_ref, problems
    (path of a torch-saved dict with eval/side/val problem lists), eval_set (eval | val),
    max_digits, full_eval (False: greedy accuracy only)."""
    ts = _cached(job["traces"], lambda: TraceSet.load(job["traces"]))
    problems = _cached(job["problems"], lambda: torch.load(job["problems"], weights_only=False))
    model = load_model(job["student_dir"])
    budgets = sorted(int(b) for b in job["budgets"])
    wcfg = WeightConfig(**job["weights"]) if job.get("weights") else None
    records: list[dict] = []
    eval_problems = problems[job.get("eval_set", "eval")]
    t_eval = [0.0]

    def on_step(step: int, m) -> None:
        if step not in budgets:
            return
        t0 = time.time()
        if job.get("full_eval", True):
            res = evaluate(m, eval_problems, problems["side"], job["seed"], job["max_digits"])
        else:
            outs = generate(
                m, [encode(p.prompt) for p in eval_problems], max_new_tokens_for(job["max_digits"])
            )
            res = {"greedy": free_generation_metrics(eval_problems, outs)}
        t_eval[0] += time.time() - t0
        records.append({**job.get("tags", {}), "seed": job["seed"], "budget": step, **res})

    spec = TrainSpec(
        steps=budgets[-1],
        batch_size=job["batch_size"],
        lr=job["lr"],
        warmup_steps=job["warmup_steps"],
        weights=wcfg,
        student_ref=job["student_ref"],
        seed=job["seed"],
    )
    t0 = time.time()
    info = train(model, ts, spec, on_step=on_step)
    for r in records:
        r["train"] = info
        r["job_wall_s"] = time.time() - t0
        r["eval_wall_s"] = t_eval[0]
    return records


# ----------------------------------------------------------------------------- machine load


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime in clock ticks) for every live process."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        out[int(name)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    return out


def _busy_ticks() -> int:
    with open("/proc/stat") as fh:
        parts = fh.readline().split()[1:]
    vals = [int(x) for x in parts]
    return sum(vals) - vals[3] - vals[4]  # all but idle and iowait


class LoadMonitor:
    """Samples the machine while the benchmark runs: the 1-minute load average, and how
    much CPU went to processes *outside* this run's process tree ("foreign" CPU). A run
    whose foreign share is above ``contended_share`` of the cores is labelled contended:
    its timings are not benchmark figures. Processes that exit between two samples lose
    their last partial interval (counted as foreign), so the foreign share is an upper
    bound."""

    def __init__(self, interval_s: float = 2.0, contended_share: float = 0.10):
        import threading

        self.interval_s = interval_s
        self.contended_share = contended_share
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.ncpu = os.cpu_count() or 1
        self.hz = os.sysconf("SC_CLK_TCK")

    def _ours(self, table: dict) -> dict[int, int]:
        root = os.getpid()
        mine, changed = {root}, True
        while changed:
            changed = False
            for pid, (ppid, _) in table.items():
                if ppid in mine and pid not in mine:
                    mine.add(pid)
                    changed = True
        return {pid: table[pid][1] for pid in mine if pid in table}

    def _run(self) -> None:
        prev_t, prev_busy = time.time(), _busy_ticks()
        prev_ours = self._ours(_proc_table())
        while not self._stop.wait(self.interval_s):
            now, busy = time.time(), _busy_ticks()
            ours = self._ours(_proc_table())
            d_ours = sum(v - prev_ours.get(p, 0) for p, v in ours.items())
            wall = now - prev_t
            with open("/proc/loadavg") as fh:
                load1 = float(fh.read().split()[0])
            total = (busy - prev_busy) / self.hz
            foreign = max(0.0, total - d_ours / self.hz)
            self.samples.append(
                {
                    "t": now,
                    "load1": load1,
                    "ours_cores": d_ours / self.hz / wall,
                    "foreign_cores": foreign / wall,
                }
            )
            prev_t, prev_busy, prev_ours = now, busy, ours

    def start(self) -> LoadMonitor:
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.summary()

    def summary(self) -> dict:
        s = self.samples
        if not s:
            return {"samples": 0, "contended": None}
        foreign = [x["foreign_cores"] for x in s]
        mean_foreign = sum(foreign) / len(s)
        return {
            "samples": len(s),
            "cpu_count": self.ncpu,
            "load1_mean": sum(x["load1"] for x in s) / len(s),
            "load1_max": max(x["load1"] for x in s),
            "ours_cores_mean": sum(x["ours_cores"] for x in s) / len(s),
            "foreign_cores_mean": mean_foreign,
            "foreign_cores_p90": sorted(foreign)[int(0.9 * (len(s) - 1))],
            "foreign_share": mean_foreign / self.ncpu,
            "contended": mean_foreign / self.ncpu > self.contended_share,
        }


# ----------------------------------------------------------------------------- reporting


def _msd(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd


# (column, getter) of the per-seed figures the table and results.json aggregate.
METRICS: dict[str, Callable[[dict], float]] = {
    "greedy_acc": lambda r: r["greedy"]["accuracy"],
    "sampled_acc": lambda r: r["sampled"]["accuracy"],
    "derailed_greedy": lambda r: r["greedy"]["derailed"],
    "derailed_sampled": lambda r: r["sampled"]["derailed"],
    "length_error_sd": lambda r: r["sampled"]["length_error_sd"],
    "forward_share": lambda r: r["greedy"]["forward_share"],
    "backward_share": lambda r: r["greedy"]["backward_share"],
    "side_acc": lambda r: r["side_accuracy"],
    "tf_predicted": lambda r: r["tf_predicted_best"],
    "tf_predicted_backward": lambda r: r["teacher_forced"]["predicted_accuracy"],
    "tf_step_acc": lambda r: r["teacher_forced"]["step_accuracy"],
    "exposure_gap": lambda r: r["exposure_gap"],
}


def aggregate(records: Sequence[dict]) -> list[dict]:
    """One row per (traces, arm, budget): mean, sd and per-seed values of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["traces"], r["arm"], r["budget"]), []).append(r)
    rows = []
    for (traces, arm, budget), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        row = {"traces": traces, "arm": arm, "budget": budget, "seeds": len(rs)}
        for name, get in METRICS.items():
            vals = [float(get(r)) for r in rs]
            row[name], row[name + "_sd"] = _msd(vals)
            row[name + "_per_seed"] = vals
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict], arms_order: Sequence[str]) -> str:
    """The results table (mean ± sd over seeds)."""
    order = {a: i for i, a in enumerate(arms_order)}
    rows = sorted(rows, key=lambda r: (r["traces"], r["budget"], order.get(r["arm"], 99)))
    head = (
        "| traces | steps | arm | seeds | greedy acc. | sampled acc. (T=1) | derailed (greedy) "
        "| derailed (sampled) | length err. sd | forward style (prior) | side task (prior) "
        "| TF-predicted | exposure gap |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def f(r, k, sd=True):
        return f"{r[k]:.3f} ± {r[k + '_sd']:.3f}" if sd else f"{r[k]:.3f}"

    lines = [
        f"| {r['traces']} | {r['budget']} | {r['arm']} | {r['seeds']} | {f(r, 'greedy_acc')} "
        f"| {f(r, 'sampled_acc')} | {f(r, 'derailed_greedy', False)} "
        f"| {f(r, 'derailed_sampled', False)} | {f(r, 'length_error_sd', False)} "
        f"| {f(r, 'forward_share', False)} | {f(r, 'side_acc')} | {f(r, 'tf_predicted', False)} "
        f"| {f(r, 'exposure_gap')} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], arms_order: Sequence[str], path: str | os.PathLike) -> None:
    """Greedy accuracy, sampled accuracy and the two prior measures per arm; one row of
    panels per trace set, one bar per budget, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = sorted({r["traces"] for r in rows})
    budgets = sorted({r["budget"] for r in rows})
    arms = [a for a in arms_order if any(r["arm"] == a for r in rows)]
    panels = [
        ("greedy_acc", "greedy accuracy"),
        ("sampled_acc", "sampled accuracy (T=1)"),
        ("forward_share", "own style kept (forward share)"),
        ("side_acc", "side-task accuracy (prior)"),
    ]
    fig, axes = plt.subplots(
        len(traces), len(panels), figsize=(4.2 * len(panels), 3.2 * len(traces)), squeeze=False
    )
    width = 0.8 / max(1, len(budgets))
    for i, tr in enumerate(traces):
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            for k, b in enumerate(budgets):
                xs, ms, sds = [], [], []
                for a_i, a in enumerate(arms):
                    r = next(
                        (r for r in rows if (r["traces"], r["arm"], r["budget"]) == (tr, a, b)),
                        None,
                    )
                    if r is None:
                        continue
                    x = a_i + (k - (len(budgets) - 1) / 2) * width
                    xs.append(x)
                    ms.append(r[key])
                    sds.append(r[key + "_sd"])
                    ax.scatter(
                        [x] * len(r[key + "_per_seed"]),
                        r[key + "_per_seed"],
                        s=6,
                        color="black",
                        zorder=3,
                    )
                ax.bar(xs, ms, width=width, yerr=sds, label=f"{b} steps", alpha=0.75, capsize=2)
            ax.set_xticks(range(len(arms)))
            ax.set_xticklabels(arms, rotation=60, ha="right", fontsize=7)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{tr}: {title}", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pretrain_student_job(job: dict) -> dict:
    """The student's own prior (runs in a worker, beside the teacher's training): forward
    traces of shorter lists plus the side task, then its evaluation. Saves the model to
    job["dir"] and returns its training info and evaluations. Job keys: dir, seed, pool,
    lengths, side_share, steps, batch_size, lr, problems (path), eval_lengths_max."""
    t0 = time.time()
    rng = random.Random(job["seed"] + 1)
    pool = make_problems(job["pool"], rng, tuple(job["lengths"]))
    pool = [Problem("D", p.digits) if rng.random() < job["side_share"] else p for p in pool]
    student = build_model(STUDENT_SIZE, seed=job["seed"] + 1)
    spec = TrainSpec(job["steps"], job["batch_size"], job["lr"], seed=job["seed"] + 1, decay=True)
    info = train(student, examples_to_trace_set(pool, ["forward"] * len(pool)), spec)
    save_model(student, job["dir"])
    problems = torch.load(job["problems"], weights_only=False)
    short = make_problems(len(problems["eval"]), random.Random(10_005), tuple(job["lengths"]))
    return {
        "train": info,
        "eval": evaluate(
            student, problems["eval"], problems["side"], job["seed"], job["eval_lengths_max"]
        ),
        "own_lengths": evaluate(
            student, short, problems["side"], job["seed"], job["lengths"][1], "forward"
        ),
        "wall_s": time.time() - t0,
    }
