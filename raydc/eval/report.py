"""The eval stage: generate on held-out prompts, grade, and report pass@1 with its error.

``run_eval(cfg, model_dir, out_dir)`` reads ``cfg.eval.path`` (JSONL / Parquet; GSM8K's
``{"question", "answer"}`` and MATH's ``{"problem", "solution"|"answer"}`` directly), renders
each prompt with the model's chat template, samples ``n_samples`` responses per prompt with
vLLM (Ray Data actors or an in-process engine, see ``raydc.eval.generation``), grades the
final answers (``raydc.eval.graders``) and writes:

- ``metrics.json``: the figures of :func:`summarize` plus counts and settings;
- ``generations.parquet``: one row per sample (prompt, response, gold and extracted answer,
  correct, length, finish reason);
- ``rejects.parquet``: input rows that could not be evaluated (no prompt, a gold solution
  with no final answer, a prompt too long for the engine), with the field and reason.

Counts: ``rows_in == rows_out + rows_rejected`` over prompts, and every accepted prompt has
exactly ``n_samples`` graded samples (``samples == rows_out * n_samples``).

pass@1 is the mean over prompts of each prompt's share of correct samples; its standard
error is the standard deviation of those per-prompt shares over sqrt(prompts) (samples of
one prompt are not independent, so the prompt is the unit). pass@k uses the unbiased
estimator 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from raydc.eval.generation import (
    LocalEngine,
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
from raydc.runtime import connect_ray

PROMPT_KEYS = ("question", "problem", "prompt")
ANSWER_KEYS = ("answer", "solution")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased probability that at least one of k samples (of n, c correct) is correct."""
    if not 0 < k <= n:
        raise ValueError(f"k={k}: must be in [1, n={n}]")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# The eval figures the run summary keeps (raydc.summary reads this list).
HEADLINE = (
    "initial_pass@1",
    "pass@1",
    "pass@1_stderr",
    "prompts",
    "n_samples",
    "mean_response_tokens",
    "no_answer_share",
    "truncated_share",
    "tokens_per_second",
)


def summarize(
    correct: Sequence[Sequence[bool]],
    num_tokens: Sequence[int],
    reached_answer: Sequence[bool],
    truncated: Sequence[bool],
) -> dict:
    """Eval figures. ``correct``: per prompt, one bool per sample (all of length n); the
    other three: one value per sample, in any order."""
    if not correct:
        raise ValueError("no graded prompts")
    n = len(correct[0])
    if n == 0 or any(len(c) != n for c in correct):
        raise ValueError("every prompt needs the same, non-zero number of samples")
    shares = [sum(c) / n for c in correct]
    p = len(shares)
    mean = sum(shares) / p
    var = sum((s - mean) ** 2 for s in shares) / (p - 1) if p > 1 else float("nan")
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, n) if k <= n})
    samples = len(num_tokens)
    return {
        "pass@1": mean,
        "pass@1_stderr": math.sqrt(var / p) if p > 1 else None,
        "pass@k": {str(k): sum(pass_at_k(n, sum(c), k) for c in correct) / p for k in ks},
        "prompts": p,
        "n_samples": n,
        "samples": samples,
        "mean_response_tokens": sum(num_tokens) / samples,
        "max_response_tokens": max(num_tokens),
        "no_answer_share": 1.0 - sum(reached_answer) / samples,
        "truncated_share": sum(truncated) / samples,
    }


def run_eval(cfg, model_dir: str, out_dir: str | Path, engine: LocalEngine | None = None) -> dict:
    """Evaluate ``model_dir`` on ``cfg.eval.path``; returns the metrics (also written to
    ``out_dir/metrics.json``). ``engine``: a started LocalEngine of this model to reuse."""
    t0 = now()
    ecfg = cfg.eval
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = read_records(ecfg.path)
    if ecfg.num_prompts is not None:
        records = records[: ecfg.num_prompts]
    rows = [r for _, r in records]
    pkey = pick_key(rows, ecfg.prompt_key, PROMPT_KEYS, "prompt")
    akey = pick_key(rows, ecfg.answer_key, ANSWER_KEYS, "gold answer")

    from raydc.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    items, rejects = [], []
    for default_id, row in records:
        rid = str(row[ecfg.id_key]) if row.get(ecfg.id_key) is not None else default_id
        prompt, gold = row.get(pkey), row.get(akey)

        def reject(field: str, reason: str, rid=rid) -> None:
            rejects.append({"row_id": rid, "stage": "eval", "field": field, "reason": reason})

        if not isinstance(prompt, str) or not prompt.strip():
            reject(pkey, "missing_prompt: no prompt text")
            continue
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            gold = str(gold)
        if not isinstance(gold, str) or not gold.strip():
            reject(akey, "missing_answer: no gold answer")
            continue
        try:
            answer = gold_answer(ecfg.grader, gold)
        except GoldAnswerError as e:
            reject(akey, f"bad_gold: {e}")
            continue
        try:
            user = ecfg.prompt_template.format(prompt=prompt)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"eval.prompt_template={ecfg.prompt_template!r}: {e!r}; use {{prompt}} only"
            ) from None
        items.append(
            {"row_id": rid, "prompt": prompt, "user": user, "gold": gold, "answer": answer}
        )

    ids = render_prompts(tokenizer, [it["user"] for it in items], ecfg.system_prompt)
    room = ecfg.engine.max_model_len - ecfg.max_new_tokens
    kept = []
    for it, tok_ids in zip(items, ids):
        if len(tok_ids) > room:
            rejects.append(
                {
                    "row_id": it["row_id"],
                    "stage": "eval",
                    "field": pkey,
                    "reason": f"prompt_too_long: {len(tok_ids)} prompt tokens > "
                    f"engine.max_model_len - max_new_tokens = {room}",
                }
            )
            continue
        kept.append((it, tok_ids))
    write_rejects(out / "rejects.parquet", rejects)
    if not kept:
        reasons = sorted({r["reason"].split(":")[0] for r in rejects})
        raise ValueError(f"eval: all {len(records)} rows of {ecfg.path} rejected ({reasons})")

    n = ecfg.n_samples
    requests = [
        Request(key=i * n + k, prompt_token_ids=tok_ids, seed=ecfg.seed + i * n + k)
        for i, (_, tok_ids) in enumerate(kept)
        for k in range(n)
    ]
    sampling = Sampling(ecfg.temperature, ecfg.top_p, ecfg.max_new_tokens, logprobs=False)
    backend = resolve_backend(ecfg.engine.backend, cfg.run.ray_address)
    if backend == "ray":
        connect_ray(cfg.run.ray_address)
    t_gen = now()
    gen_rows: list[dict] = []
    for batch in iter_samples(
        str(model_dir),
        requests,
        sampling,
        ecfg.engine,
        backend,
        stop_token_ids(str(model_dir), tokenizer),
        engine=engine,
    ):
        for smp in batch:
            i, k = divmod(smp.key, n)
            it = kept[i][0]
            response = tokenizer.decode(smp.token_ids, skip_special_tokens=True)
            g = grade(ecfg.grader, response, it["answer"])
            gen_rows.append(
                {
                    "index": i,
                    "row_id": it["row_id"],
                    "sample": k,
                    "prompt": it["prompt"],
                    "response": response,
                    "gold": it["answer"],
                    "predicted": g.predicted,
                    "correct": g.correct,
                    "num_tokens": len(smp.token_ids),
                    "finish_reason": smp.finish_reason,
                }
            )
    gen_seconds = now() - t_gen
    if len(gen_rows) != len(requests):
        raise RuntimeError(f"eval: {len(requests)} samples requested, {len(gen_rows)} returned")
    gen_rows.sort(key=lambda r: (r["index"], r["sample"]))
    sink = ParquetSink(out / "generations.parquet")
    sink.write(gen_rows)
    sink.close()

    correct = [[r["correct"] for r in gen_rows[i * n : (i + 1) * n]] for i in range(len(kept))]
    metrics = summarize(
        correct,
        [r["num_tokens"] for r in gen_rows],
        [r["predicted"] is not None for r in gen_rows],
        [r["finish_reason"] == "length" for r in gen_rows],
    )
    generated = sum(r["num_tokens"] for r in gen_rows)
    metrics.update(
        {
            "rows_in": len(records),
            "rows_out": len(kept),
            "rows_rejected": len(rejects),
            "grader": ecfg.grader,
            "temperature": ecfg.temperature,
            "top_p": ecfg.top_p,
            "max_new_tokens": ecfg.max_new_tokens,
            "seed": ecfg.seed,
            "backend": backend,
            "model": str(model_dir),
            "eval_path": str(ecfg.path),
            "generated_tokens": generated,
            "generation_seconds": gen_seconds,
            "tokens_per_second": generated / gen_seconds if gen_seconds > 0 else None,
            "seconds": now() - t0,
            "paths": {
                "metrics": str(out / "metrics.json"),
                "generations": str(out / "generations.parquet"),
                "rejects": str(out / "rejects.parquet"),
            },
        }
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def run_eval_stage(cfg, model_dir: str, out_dir: str | Path, initial_dir: str | None) -> dict:
    """The pipeline's eval stage: ``model_dir`` on the held-out prompts and, with
    ``initial_dir`` (the student before training), the same prompts and settings under it
    in ``out_dir/initial/``. ``initial_pass@1`` and ``initial_pass@1_stderr`` sit beside
    ``pass@1`` in the returned metrics (a public contract: summary.json's eval_metrics)."""
    out = Path(out_dir)
    metrics = run_eval(cfg, model_dir, out)
    if initial_dir:
        base = run_eval(cfg, initial_dir, out / "initial")
        if base["rows_out"] != metrics["rows_out"]:
            raise RuntimeError(
                f"eval: the initial student kept {base['rows_out']} prompts and the trained one "
                f"{metrics['rows_out']}; their tokenizers differ, so the two are not comparable"
            )
        metrics.update(
            {
                "initial_pass@1": base["pass@1"],
                "initial_pass@1_stderr": base["pass@1_stderr"],
                "initial_model": str(initial_dir),
                "pass@1_gain": metrics["pass@1"] - base["pass@1"],
            }
        )
        metrics["paths"]["initial_metrics"] = str(out / "initial" / "metrics.json")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def format_metrics(m: dict) -> str:
    """One line for logs: pass@1 +- stderr, lengths and shares."""
    se = m.get("pass@1_stderr")
    se_txt = f" +- {se:.3f}" if se is not None else ""
    return (
        f"pass@1 {m['pass@1']:.3f}{se_txt} over {m['prompts']} prompts x {m['n_samples']} "
        f"(T={m.get('temperature')}), mean length {m['mean_response_tokens']:.1f} tokens, "
        f"no answer {m['no_answer_share']:.1%}, truncated {m['truncated_share']:.1%}"
    )
