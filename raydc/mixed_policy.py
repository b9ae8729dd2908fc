"""Mixed-policy traces: the student starts, the teacher finishes (DASD, arXiv 2601.09088).

For prompts that have a teacher trace, the current student writes its own response (at
most ``length_cap`` times the teacher trace's length, in student tokens), the response is
cut at a random token past ``cut_after`` of its length, and the teacher continues from the
student's prefix, recording its log-prob of every token it writes at the sampling
temperature. Optionally only continuations whose final answer grades correct are kept.
The traces train like any other: the student-written prefix carries no teacher log-probs
(its positions are "teacher unknown": a neutral weight under every preset, unless the
score stage scores the teacher), and ``data.mask_student_prefix`` takes it out of the loss
(DASD trained on it: 83.3/74.8 on AIME24/25 against 80.8/72.3 masked).

``out_dir/traces.parquet`` has the generate stage's columns (``raydc.generate``) plus
``student_prefix_chars`` (the response's first characters the student wrote) and
``student_prefix_tokens``. Counts, over the input traces: ``rows_in == rows_out +
rows_rejected``; rejects.parquet says why (no prompt, a student budget or an engine context
too small to cut a response and continue it, a student response too short to cut, a
truncated continuation, a wrong final answer). The budgets are sized to
``engine.max_model_len`` before any engine starts (``fit_budgets``);
``student_caps_cut_to_context`` counts the rows whose ``length_cap`` budget was cut to fit.

The prompts, prefixes and token ids of the requests are held in this process, as the
generate stage holds its prompts; samples stream to Parquet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from raydc.config import ConfigError, roles
from raydc.engines.sampler import (
    PROMPT_KEYS,
    ParquetSink,
    Request,
    Sampling,
    iter_samples,
    now,
    pick_key,
    read_records,
    render_prompts,
    resolve_backend,
    stop_token_ids,
    write_rejects,
)
from raydc.eval.graders import GoldAnswerError, gold_answer, grade
from raydc.infra.artifacts import fingerprint_paths
from raydc.infra.models import check_context, check_input, check_model, check_vocab
from raydc.infra.runtime import connect_ray
from raydc.infra.schemas import trace_schema
from raydc.infra.stage import Stage
from raydc.method.align import char_spans, token_pieces

ANSWER_KEYS = ("answer", "solution")
STAGE = "mixed_policy"
PREFIX_COLUMNS = ("student_prefix_chars", "student_prefix_tokens")


# ----------------------------------------------------------------------------- pure parts


def length_cap(teacher_tokens: int, multiple: float) -> int:
    """The student's token budget: ``multiple`` times the teacher trace's length, >= 1."""
    return max(1, math.ceil(multiple * teacher_tokens))


def cut_point(n_tokens: int, cut_after: float, key: str, seed: int) -> int | None:
    """How many of the student's ``n_tokens`` content tokens the prefix keeps: uniform over
    ``[ceil(cut_after * n), n - 1]`` (at least 1, never the whole response), drawn from a
    hash of ``seed`` and the row's ``key`` (reproducible, independent of order). None when
    the response is too short to cut (fewer than 2 tokens)."""
    if n_tokens < 2:
        return None
    lo = min(max(1, math.ceil(cut_after * n_tokens)), n_tokens - 1)
    span = n_tokens - lo  # choices lo .. n-1
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return lo + h % span


class MixedPolicyError(RuntimeError):
    """The mixed-policy stage made nothing to train on."""


@dataclass
class Item:
    """One input trace on its way through: ids, the student's prefix, then the teacher's."""

    row_id: str
    prompt_id: str
    prompt: str
    gold: str | None
    extra: dict  # the source row's other string columns, kept in the trace row
    cap: int = 0  # the student's token budget
    trace_tokens: int = 0  # the teacher trace's length in student tokens (sizes ``cap``)
    prompt_ids: list[int] = dataclasses.field(default_factory=list)  # the student's prompt
    prefix: str = ""
    prefix_tokens: int = 0


def _reject(rejects: list, row_id: str, field: str, reason: str) -> None:
    rejects.append({"row_id": row_id, "stage": STAGE, "field": field, "reason": reason})


# ----------------------------------------------------------------------------- inputs


def read_items(cfg, path: str | Path, student_tok, rejects: list) -> tuple[list[Item], str]:
    """The input traces as Items with the student's length cap, and their prompt column;
    bad rows to ``rejects``."""
    mcfg, dcfg = cfg.mixed_policy, cfg.data
    records = read_records(path)
    if mcfg.num_prompts is not None:
        records = records[: mcfg.num_prompts]
    rows = [r for _, r in records]
    pkey = pick_key(rows, mcfg.prompt_key, PROMPT_KEYS, "prompt")
    rkey = dcfg.response_key
    akey = _answer_key(rows, mcfg.answer_key)
    own = set(trace_schema(dcfg, []).names) | set(PREFIX_COLUMNS) | {pkey, rkey}
    extra_keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, str)} - own)
    items, seen = [], set()
    for default_id, row in records:
        rid = str(row.get(dcfg.id_key) or default_id)
        prompt, response = row.get(pkey), row.get(rkey)
        if not isinstance(prompt, str) or not prompt.strip():
            _reject(rejects, rid, pkey, "missing_prompt: no prompt text")
            continue
        if not isinstance(response, str) or not response.strip():
            _reject(rejects, rid, rkey, "missing_response: no teacher trace to size the student's")
            continue
        if rid in seen:
            _reject(rejects, rid, dcfg.id_key, f"duplicate_id: row id {rid!r} seen before")
            continue
        seen.add(rid)
        n_teacher = len(student_tok(response, add_special_tokens=False)["input_ids"])
        gold = row.get(akey) if akey else None
        extra = {k: row.get(k) if isinstance(row.get(k), str) else None for k in extra_keys}
        items.append(
            Item(
                row_id=rid,
                prompt_id=str(row.get(dcfg.prompt_id_key) or rid),
                prompt=prompt,
                gold=gold if isinstance(gold, str) else response,  # else: the trace's answer
                extra=extra,
                cap=length_cap(n_teacher, mcfg.length_cap),
                trace_tokens=n_teacher,
            )
        )
    return items, pkey


def check_length_cap(mcfg, items: list[Item]) -> None:
    """A ``length_cap`` that gives no trace a student response long enough to cut (2
    tokens) is a config error, raised before any engine starts."""
    if not items or any(it.cap >= 2 for it in items):
        return
    longest = max(it.trace_tokens for it in items)
    raise ConfigError(
        f"mixed_policy.length_cap={mcfg.length_cap!r}: too small for every trace: the longest "
        f"teacher trace ({longest} student tokens) gives the student "
        f"{length_cap(longest, mcfg.length_cap)} token(s), and a cut needs a response of 2; "
        "raise it (the default is 1.5)"
    )


def _answer_key(rows: list[dict], key: str) -> str | None:
    if key != "auto":
        return key
    return next((k for k in ANSWER_KEYS if any(k in r for r in rows[:100])), None)


# ----------------------------------------------------------------------------- passes


def teacher_head(teacher_tok, mcfg, prompt: str) -> str:
    """The teacher's prompt in its own chat template, ready for the answer (the student's
    prefix follows it)."""
    messages = [{"role": "user", "content": prompt}]
    if mcfg.system_prompt:
        messages.insert(0, {"role": "system", "content": mcfg.system_prompt})
    return teacher_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def fit_budgets(
    cfg, student_tok, teacher_tok, items: list[Item], pkey: str, rejects: list
) -> tuple[list[Item], int]:
    """Before any generation: each Item's student budget (``cap``) cut to what
    ``mixed_policy.engine.max_model_len`` holds on both sides, or the row rejected with what
    stops it (every row used to reach the student's engine first, and a context too small
    for the teacher was found only after the whole student pass):

    - ``student_cap_too_small`` (field ``mixed_policy.length_cap``): ``length_cap`` x the
      teacher trace's tokens gives under 2 tokens, and a cut needs a response of 2;
    - ``prompt_too_long`` (the prompt column): the student's prompt leaves under 2 tokens
      for its response;
    - ``teacher_context_too_small`` (field ``mixed_policy.engine.max_model_len``): the
      teacher's prompt and ``mixed_policy.max_new_tokens`` leave no token for a prefix.

    A kept cap fits the student's prompt + response in the context (one token spare) and the
    teacher's prompt + the longest prefix (``cap - 1`` tokens, ``cut_point``) +
    ``max_new_tokens``. The prefix is counted in student tokens: under another tokenizer the
    teacher's count can differ, and ``teacher_requests`` still rejects a request that does
    not fit. Returns the kept Items (with ``prompt_ids``) and how many caps were cut to fit.
    """
    mcfg = cfg.mixed_policy
    context, new = mcfg.engine.max_model_len, mcfg.max_new_tokens
    ids = render_prompts(student_tok, [it.prompt for it in items], mcfg.system_prompt)
    kept, shortened = [], 0
    for it, p_ids in zip(items, ids):
        head = teacher_tok(teacher_head(teacher_tok, mcfg, it.prompt), add_special_tokens=False)
        n_head = len(head["input_ids"])
        student_room = context - len(p_ids) - 1  # the student's response
        teacher_room = context - new - n_head  # the student's prefix, under the teacher
        if it.cap < 2:
            _reject(
                rejects,
                it.row_id,
                "mixed_policy.length_cap",
                f"student_cap_too_small: length_cap={mcfg.length_cap} x {it.trace_tokens} "
                f"teacher trace token(s) gives the student {it.cap}; a cut needs a response of 2",
            )
        elif student_room < 2:
            _reject(
                rejects,
                it.row_id,
                pkey,
                f"prompt_too_long: {len(p_ids)} student prompt tokens leave "
                f"{max(student_room, 0)} for its response within "
                f"mixed_policy.engine.max_model_len={context}; a cut needs 2",
            )
        elif teacher_room < 1:
            _reject(
                rejects,
                it.row_id,
                "mixed_policy.engine.max_model_len",
                f"teacher_context_too_small: the teacher's prompt ({n_head} tokens) + "
                f"mixed_policy.max_new_tokens ({new}) + a 1-token student prefix need "
                f"{n_head + new + 1} > mixed_policy.engine.max_model_len={context}",
            )
        else:
            cap = min(it.cap, student_room, teacher_room + 1)
            shortened += cap < it.cap
            it.cap, it.prompt_ids = cap, p_ids
            kept.append(it)
    return kept, shortened


def student_prefixes(
    cfg,
    student_dir: str,
    student_tok,
    items: list[Item],
    backend: str,
    rejects: list,
    log_dir: str | Path | None = None,
) -> list[Item]:
    """The student's responses, cut: each kept Item gains ``prefix`` (text) and
    ``prefix_tokens``. ``items``: as ``fit_budgets`` keeps them (a cap and the prompt's ids).
    Requests are grouped by their cap rounded up to a power of two (one sampling call each);
    a sample is then cut to its own cap, which with a per-request seed is exactly a sample
    drawn with that cap. ``log_dir``: where the engines write their errors
    (``raydc.engines.sampler.iter_samples``)."""
    mcfg = cfg.mixed_policy
    special = {int(i) for i in student_tok.all_special_ids}
    stops = stop_token_ids(student_dir, student_tok)
    room = mcfg.engine.max_model_len
    groups: dict[int, list[Request]] = {}
    for i, it in enumerate(items):
        bucket = 1 << (it.cap - 1).bit_length()
        groups.setdefault(min(bucket, room - len(it.prompt_ids) - 1), []).append(
            Request(key=i, prompt_token_ids=it.prompt_ids, seed=mcfg.seed + i)
        )
    kept = []
    for budget, requests in sorted(groups.items()):
        s = Sampling(mcfg.temperature, mcfg.top_p, budget, logprobs=False)
        for batch in iter_samples(
            student_dir, requests, s, mcfg.engine, backend, stops, log_dir=log_dir
        ):
            for smp in batch:
                it = items[smp.key]
                content = [t for t in smp.token_ids[: it.cap] if int(t) not in stops]
                cut = cut_point(len(content), mcfg.cut_after, it.row_id, mcfg.seed)
                if cut is None:
                    _reject(
                        rejects,
                        it.row_id,
                        "student_response",
                        f"student_too_short: {len(content)} token(s), nothing to cut",
                    )
                    continue
                it.prefix, _ = token_pieces(student_tok, content[:cut], special)
                it.prefix_tokens = cut
                kept.append(it)
    return sorted(kept, key=lambda it: it.row_id)


def teacher_requests(cfg, teacher_tok, items: list[Item], rejects: list) -> tuple[list, list]:
    """The teacher's prompt (its own chat template, ready for the answer) followed by the
    student's prefix as the start of the answer, as text, tokenized by the teacher.
    Returns the requests and their Items (those with room left for the continuation)."""
    mcfg = cfg.mixed_policy
    room = mcfg.engine.max_model_len - mcfg.max_new_tokens
    requests, kept = [], []
    for it in items:
        head = teacher_head(teacher_tok, mcfg, it.prompt)
        ids = list(teacher_tok(head + it.prefix, add_special_tokens=False)["input_ids"])
        if len(ids) > room:
            _reject(
                rejects,
                it.row_id,
                "student_prefix",
                f"prompt_too_long: {len(ids)} teacher "
                f"tokens > engine.max_model_len - max_new_tokens = {room}",
            )
            continue
        seed = mcfg.seed + 1_000_003 + len(kept)  # apart from the student's seeds
        requests.append(Request(key=len(kept), prompt_token_ids=ids, seed=seed))
        kept.append(it)
    return requests, kept


def trace_row(cfg, it: Item, smp, teacher_tok, special: set[int]) -> dict:
    """A trace row in the generate stage's layout; teacher spans shifted past the prefix."""
    dcfg, mcfg = cfg.data, cfg.mixed_policy
    text, pieces = token_pieces(teacher_tok, smp.token_ids, special)
    shift = len(it.prefix)
    spans = [[s + shift, e + shift] for s, e in char_spans(pieces, smp.token_ids, special)]
    return {
        dcfg.id_key: f"{it.row_id}:mixed",
        dcfg.prompt_id_key: it.prompt_id,
        dcfg.prompt_key: it.prompt,
        dcfg.response_key: it.prefix + text,
        dcfg.teacher_logprobs_key: smp.logprobs,
        dcfg.teacher_offsets_key: spans,
        "teacher_pieces": pieces,
        "teacher_token_ids": list(smp.token_ids),
        "finish_reason": smp.finish_reason,
        "num_tokens": len(smp.token_ids),
        "sample": 0,
        "temperature": float(mcfg.temperature),
        "student_prefix_chars": shift,
        "student_prefix_tokens": it.prefix_tokens,
        **it.extra,
    }


def mixed_schema(dcfg, extra: list[str]) -> pa.Schema:
    """The generate stage's trace columns plus the student prefix's length."""
    schema = trace_schema(dcfg, extra)
    for name in PREFIX_COLUMNS:
        schema = schema.append(pa.field(name, pa.int32()))
    return schema


def _verdict(cfg, it: Item, smp, response: str) -> str | None:
    """Why a continuation is dropped, or None to keep it."""
    mcfg = cfg.mixed_policy
    if smp.finish_reason == "length" and not mcfg.keep_truncated:
        return f"truncated: no stop token within max_new_tokens={mcfg.max_new_tokens}"
    if not mcfg.require_correct:
        return None
    try:
        gold = gold_answer(mcfg.grader, it.gold or "")
    except GoldAnswerError as e:
        return f"no_gold_answer: {e}"
    g = grade(mcfg.grader, response, gold)
    return None if g.correct else f"wrong_answer: {g.predicted!r} (gold {gold!r})"


# ----------------------------------------------------------------------------- the stage


def run_mixed_policy(
    cfg, student_dir: str, teacher_dir: str, traces_path: str | Path, out_dir: str | Path
) -> dict:
    """Mixed-policy traces for the traces in ``traces_path``; returns the summary (also
    ``out_dir/summary.json``)."""
    from raydc.infra.models import load_tokenizer

    t0 = now()
    mcfg = cfg.mixed_policy
    for role, model in (("student", student_dir), ("teacher", teacher_dir)):
        check_context(
            "mixed_policy.engine.max_model_len", mcfg.engine.max_model_len, role, str(model)
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student_tok, teacher_tok = load_tokenizer(student_dir), load_tokenizer(teacher_dir)
    rejects: list[dict] = []
    items, pkey = read_items(cfg, traces_path, student_tok, rejects)
    rows_in = len(items) + len(rejects)
    check_length_cap(mcfg, items)
    items, shortened = fit_budgets(cfg, student_tok, teacher_tok, items, pkey, rejects)
    backend = resolve_backend(mcfg.engine.backend, cfg.run.ray_address)
    if backend == "ray" and items:
        connect_ray(cfg.run.ray_address)
    t_student = now()
    items = student_prefixes(cfg, str(student_dir), student_tok, items, backend, rejects, out)
    t_teacher = now()
    sink, counts = _write_continuations(
        cfg, str(teacher_dir), teacher_tok, items, backend, out, rejects
    )
    write_rejects(out / "rejects.parquet", rejects)
    summary = {
        "rows_in": rows_in,
        "rows_out": sink.rows,
        "rows_rejected": len(rejects),
        **counts,
        "student_caps_cut_to_context": shortened,
        "length_cap": mcfg.length_cap,
        "cut_after": mcfg.cut_after,
        "temperature": mcfg.temperature,
        "require_correct": mcfg.require_correct,
        "student": str(student_dir),
        "teacher": str(teacher_dir),
        "backend": backend,
        "student_seconds": t_teacher - t_student,
        "teacher_seconds": now() - t_teacher,
        "seconds": now() - t0,
        "paths": {"traces": str(out / "traces.parquet"), "rejects": str(out / "rejects.parquet")},
    }
    if summary["rows_in"] != summary["rows_out"] + summary["rows_rejected"]:
        raise RuntimeError(f"mixed_policy: rows do not add up: {summary}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if summary["rows_out"] == 0:
        codes: dict[str, int] = {}
        first: dict[str, dict] = {}
        for r in rejects:
            code = r["reason"].split(":", 1)[0]
            codes[code] = codes.get(code, 0) + 1
            first.setdefault(code, r)
        top = first[max(codes, key=codes.get)] if codes else None
        example = f"; e.g. row {top['row_id']!r}, {top['field']}: {top['reason']}" if top else ""
        raise MixedPolicyError(
            f"mixed_policy kept no traces: {rows_in} in, {len(rejects)} rejected (reasons "
            f"{codes}); see {out / 'rejects.parquet'} and {out / 'summary.json'}{example}"
        )
    return summary


def _write_continuations(cfg, teacher_dir, teacher_tok, items, backend, out, rejects):
    mcfg = cfg.mixed_policy
    special = {int(i) for i in teacher_tok.all_special_ids}
    requests, items = teacher_requests(cfg, teacher_tok, items, rejects)
    extra = sorted(items[0].extra) if items else []
    s = Sampling(mcfg.temperature, mcfg.top_p, mcfg.max_new_tokens, logprobs=True)
    stops = stop_token_ids(teacher_dir, teacher_tok)
    sink = ParquetSink(out / "traces.parquet", mixed_schema(cfg.data, extra))
    counts = {"student_prefix_tokens": 0, "teacher_tokens": 0, "wrong_answers": 0, "truncated": 0}
    returned = 0
    for batch in iter_samples(teacher_dir, requests, s, mcfg.engine, backend, stops, log_dir=out):
        rows = []
        for smp in batch:
            returned += 1
            it = items[smp.key]
            row = trace_row(cfg, it, smp, teacher_tok, special)
            why = _verdict(cfg, it, smp, row[cfg.data.response_key])
            if why is not None:
                counts["wrong_answers" if why.startswith("wrong") else "truncated"] += 1
                _reject(rejects, it.row_id, "teacher_continuation", why)
                continue
            counts["student_prefix_tokens"] += it.prefix_tokens
            counts["teacher_tokens"] += len(smp.token_ids)
            rows.append(row)
        sink.write(rows)
    sink.close()
    if returned != len(requests):
        raise RuntimeError(f"mixed_policy: {len(requests)} continuations asked, {returned} came")
    return sink, counts


# ----------------------------------------------------------------------------- the stage


def _models(cfg) -> tuple[str, str, str]:
    """The traces, the student that writes the prefixes and the teacher that continues."""
    r = roles(cfg)
    if not r.mixed_teacher:
        raise ConfigError(
            "mixed_policy.teacher: not set, nor generate.teacher or score.teacher; name "
            "the model that continues the student's prefixes"
        )
    return cfg.mixed_policy.traces or cfg.data.path, r.mixed_student, r.mixed_teacher


def _reads(cfg, up) -> dict:
    traces, student, teacher = _models(cfg)
    return {
        "mixed_policy": dataclasses.asdict(cfg.mixed_policy),
        "data_keys": dataclasses.asdict(cfg.data),
        "traces": fingerprint_paths(traces),
        "student": fingerprint_paths(student),
        "teacher": fingerprint_paths(teacher),
    }


def _run(cfg, up, out: Path) -> dict:
    traces, student, teacher = _models(cfg)
    return run_mixed_policy(cfg, student, teacher, traces, out)


def _check(cfg) -> None:
    """The traces, and both models as the score stage checks its teacher: each a model
    folder whose vocabulary covers its tokenizer and whose context holds
    ``mixed_policy.engine.max_model_len`` (both failed only once their engine started)."""
    traces, student, teacher = _models(cfg)
    check_input("mixed_policy.traces", traces)
    mcfg = cfg.mixed_policy
    fields = {
        "student": "mixed_policy.student"
        if mcfg.student
        else ("train.student" if cfg.train.student else "score.student"),
        "teacher": "mixed_policy.teacher"
        if mcfg.teacher
        else ("generate.teacher" if cfg.generate.teacher else "score.teacher"),
    }
    for role, model in (("student", student), ("teacher", teacher)):
        check_model(fields[role], model)
        if model and Path(model).expanduser().is_dir():
            check_vocab(fields[role], model)
            check_context(
                "mixed_policy.engine.max_model_len", mcfg.engine.max_model_len, fields[role], model
            )


MIXED_POLICY = Stage(
    "mixed_policy",
    help="mixed-policy traces: student prefixes continued by the teacher",
    enabled=lambda cfg: cfg.mixed_policy.enabled,
    check=_check,
    reads=_reads,
    run=_run,
)
