"""The eval stage: generate on held-out prompts, grade, and report pass@1 with its error.

``run_eval(cfg, model_dir, out_dir)`` reads ``cfg.eval.path`` (JSONL / Parquet; GSM8K's
``{"question", "answer"}`` and MATH's ``{"problem", "solution"|"answer"}`` directly), renders
each prompt with the model's chat template, samples ``n_samples`` responses per prompt with
vLLM (Ray Data actors or an in-process engine, see ``raydc.engines.sampler``), grades the
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

import dataclasses
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from raydc.config import ConfigError, roles
from raydc.config.engines import fill_prompt_template
from raydc.engines.sampler import (
    Sampling,
    fit_prompts,
    pick_key,
    read_prompts,
    sample_requests,
    sampling_figures,
)
from raydc.eval.graders import GoldAnswerError, gold_answer, grade
from raydc.infra.artifacts import fingerprint_paths, write_json
from raydc.infra.models import check_context, check_input, check_vocab
from raydc.infra.stage import Stage, TrainedModel, Upstream

if TYPE_CHECKING:
    from raydc.engines.sampler import LocalEngine, Sample

ANSWER_KEYS = ("answer", "solution")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased probability that at least one of k samples (of n, c correct) is correct."""
    if not 0 < k <= n:
        raise ValueError(f"k={k}: must be in [1, n={n}]")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# The eval figures the run summary keeps (raydc.pipeline.summary reads this list).
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
    from raydc.infra.models import load_tokenizer

    t0 = time.perf_counter()
    ecfg = cfg.eval
    check_context("eval.engine.max_model_len", ecfg.engine.max_model_len, "model", str(model_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, pkey = read_prompts(ecfg.path, ecfg)
    akey = pick_key([r for _, r in records], ecfg.answer_key, ANSWER_KEYS, "gold answer")
    items, rejects = _check_rows(records, ecfg, pkey, akey)
    tokenizer = load_tokenizer(model_dir)
    kept, prompt_ids, rejects = fit_prompts(
        tokenizer, items, rejects, ecfg, "eval", pkey, out / "rejects.parquet"
    )
    if not kept:
        reasons = sorted({r["reason"].split(":")[0] for r in rejects})
        raise ValueError(f"eval: all {len(records)} rows of {ecfg.path} rejected ({reasons})")

    sampling = Sampling.from_config(ecfg, logprobs=False)
    backend, batches = sample_requests(
        str(model_dir),
        tokenizer,
        prompt_ids,
        sampling,
        ecfg.engine,
        cfg.run.ray_address,
        engine,
        log_dir=out,  # an engine that dies is reported with its own error
    )
    t_gen = time.perf_counter()
    gen_rows = _graded_rows(batches, kept, tokenizer, ecfg)
    gen_seconds = time.perf_counter() - t_gen
    pq.write_table(pa.Table.from_pylist(gen_rows), out / "generations.parquet")

    metrics = _metrics(gen_rows, len(kept), ecfg.n_samples)
    metrics.update(
        {
            "rows_in": len(records),
            "rows_out": len(kept),
            "rows_rejected": len(rejects),
            "grader": ecfg.grader,
            "model": str(model_dir),
            "eval_path": str(ecfg.path),
            "paths": {
                "metrics": str(out / "metrics.json"),
                "generations": str(out / "generations.parquet"),
                "rejects": str(out / "rejects.parquet"),
            },
            **sampling_figures(ecfg, backend, sum(r["num_tokens"] for r in gen_rows), gen_seconds),
            "seconds": time.perf_counter() - t0,
        }
    )
    write_json(out / "metrics.json", metrics)
    return metrics


def user_message(ecfg, prompt: str) -> str:
    """``prompt`` as the user turn: ``eval.prompt_template`` filled in (the config checked
    at load that it can be, ``EvalConfig.validate``)."""
    return fill_prompt_template(ecfg.prompt_template, prompt)


def _check_rows(
    records: list[tuple[str, dict]], ecfg, pkey: str, akey: str
) -> tuple[list[dict], list[dict]]:
    """The rows with prompt text and a gold final answer, as items for ``fit_prompts``
    (``row_id``, ``message``, ``prompt``, ``gold``, ``answer``); a reject row for each other."""
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
        message = user_message(ecfg, prompt)
        items.append(
            {"row_id": rid, "message": message, "prompt": prompt, "gold": gold, "answer": answer}
        )
    return items, rejects


def _graded_rows(batches: Iterable[list[Sample]], items: list[dict], tokenizer, ecfg) -> list[dict]:
    """One row per sample, decoded and graded against its prompt's answer (``items[i]``),
    in prompt then sample order."""
    rows = []
    for batch in batches:
        for smp in batch:
            i, k = divmod(smp.key, ecfg.n_samples)
            it = items[i]
            response = tokenizer.decode(smp.token_ids, skip_special_tokens=True)
            g = grade(ecfg.grader, response, it["answer"])
            rows.append(
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
    rows.sort(key=lambda r: (r["index"], r["sample"]))
    return rows


def _metrics(rows: list[dict], prompts: int, n: int) -> dict:
    """:func:`summarize` over the graded rows (``n`` per prompt, in order)."""
    return summarize(
        [[r["correct"] for r in rows[i * n : (i + 1) * n]] for i in range(prompts)],
        [r["num_tokens"] for r in rows],
        [r["predicted"] is not None for r in rows],
        [r["finish_reason"] == "length" for r in rows],
    )


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
        write_json(out / "metrics.json", metrics)
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


# ----------------------------------------------------------------------------- the stage


def model_stage(cfg) -> str:
    """The stage whose model eval grades: the on-policy rounds' when they are on, else tune
    when it is on, else train (in a run with DASD phases, the pipeline gives the last
    phase's model under that name)."""
    if cfg.on_policy.enabled:
        return "on_policy"
    return "tune" if cfg.tune.enabled else "train"


def _check(cfg) -> None:
    if not cfg.eval.enabled:
        return
    if not cfg.eval.path:
        raise ConfigError("eval.path: not set; name the held-out prompts to evaluate on")
    check_input("eval.path", cfg.eval.path)
    # The trained model is the student's architecture and tokenizer; the student itself is
    # evaluated first with eval.baseline. Checked now, not after training.
    student = roles(cfg).student
    if student and Path(student).expanduser().is_dir():
        field = "train.student" if cfg.train.student else "score.student"
        check_context("eval.engine.max_model_len", cfg.eval.engine.max_model_len, field, student)
        if cfg.eval.baseline:
            check_vocab(field, student)


def _run(cfg, up: Upstream, out: Path) -> dict:
    model = TrainedModel.of(up[model_stage(cfg)])
    initial = roles(cfg).student if cfg.eval.baseline else None  # the student before training
    return run_eval_stage(cfg, model.model_dir, out, initial)


EVAL = Stage(
    "eval",
    help="generate on held-out prompts and grade (after train or tune)",
    needs=lambda cfg: (model_stage(cfg),),
    enabled=lambda cfg: cfg.eval.enabled,
    check=_check,
    reads=lambda cfg, up: {
        "eval": dataclasses.asdict(cfg.eval),
        "model": up[model_stage(cfg)].fingerprint,
        "eval_data": fingerprint_paths(cfg.eval.path),
        "teacher": fingerprint_paths(cfg.score.teacher),
    },
    run=_run,
)
