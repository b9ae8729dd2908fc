"""The quality benchmark's stages, in the order jobs/benchmark_quality.py runs them: the
problem sets and evaluation data, the teacher's offline traces (sampled, scored under the
teacher and the student, DASD-selected, each row's cost in FLOPs kept), the arms' jobs
and running them on the pool."""

from __future__ import annotations

import random
import time

import torch

from bench.quality.evaluate import generate
from bench.quality.flops import sum_row_flops, trace_row_flops
from bench.quality.jobs import run_arm
from bench.quality.models import (
    count_params,
    load_model,
    load_tokenizer,
    newline_ids,
    prompt_ids,
    response_ids,
)
from bench.quality.on_policy import ON_POLICY, ROUND_STEPS
from bench.quality.run import (
    LATER_ARMS,
    OPD_BASELINE_ARMS,
    OPD_LR_SCALE,
    PRESET_ARMS,
    PROTECTIONS,
    BenchmarkRun,
    Plan,
)
from bench.quality.task import Problem, Regime, grade, make_problems, solution
from bench.quality.traces import build_trace_set, score_traces
from raydc.method.selection import divergence_scores, select_top_k
from raydc.method.weights import preset

CANDIDATE_SEED = 100  # the T = 1 traces' candidate k is sampled with seed 100 + k (t10: k = 0)


def _view(tok, problems: list[Problem], eos: int) -> dict:
    return {
        "eval": problems,
        "eval_prompts": prompt_ids(tok, [p.prompt for p in problems]),
        "eos": eos,
    }


def draw_problems(
    sizes: dict, regime: Regime
) -> tuple[list[Problem], list[Problem], list[Problem], list[Problem]]:
    """The eval, val, prior and trace-prompt problems, in this order from one fixed seed
    (each set excludes the ones before it): what ``make_data`` uses, and what
    ``bench.quality.backfill`` draws again for a folder whose data.pt predates
    ``trace_prompts``."""
    rng = random.Random(10_001)
    lengths = regime.lengths
    evals = make_problems(sizes["eval_n"], rng, lengths=lengths)
    val = make_problems(sizes["val_n"], rng, exclude=evals, lengths=lengths)
    prior = make_problems(
        sizes["prior_n"], rng, regime.prior_pool, evals + val, lengths=regime.prior_lengths
    )
    prompts = make_problems(
        sizes["trace_prompts"], rng, exclude=evals + val + prior, lengths=lengths
    )
    return evals, val, prior, prompts


def make_data(run: BenchmarkRun, sizes: dict, regime: Regime) -> dict:
    """1. The problem sets (fixed seeds, disjoint): eval and val over all 40 codes at the
    regime's lengths, the prior's lists (what the student was taught), the trace prompts.
    Saves what the workers measure with (gold ids, the teacher's T = 1 samples of the eval
    prompts, the regime's teacher and generation budget) to data.pt."""
    t0 = time.time()
    evals, val, prior, prompts = draw_problems(sizes, regime)
    n_new = regime.max_new_tokens
    tok, teacher = load_tokenizer(), load_model(regime.teacher)
    eos = tok.eos_token_id
    data = _view(tok, evals, eos)
    data["teacher"], data["max_new_tokens"] = str(regime.teacher), n_new
    data["eval_gold"] = response_ids(tok, [solution(p) for p in evals])
    data["teacher_samples"] = generate(
        teacher, data["eval_prompts"], eos, temperature=1.0, seed=7, max_new_tokens=n_new
    )
    data["prior"] = prior
    data["prior_prompts"] = prompt_ids(tok, [p.prompt for p in prior])
    data["trace_prompts"] = prompt_ids(tok, [p.prompt for p in prompts])  # the opd arms'
    data["val_view"] = _view(tok, val, eos)
    torch.save(data, run.data_path)
    run.info["data"] = {k: sizes[k] for k in ("eval_n", "val_n", "prior_n", "trace_prompts")}
    run.log(
        f"data: {len(evals)} eval, {len(val)} val, {len(prior)} prior ({time.time() - t0:.0f} s)"
    )
    return {"prompts": prompts, "tok": tok, "teacher": teacher, "regime": regime}


def _sample_set(task: dict, temperature: float, seed: int, student) -> dict:
    """Teacher samples of every trace prompt at ``temperature``, with the teacher's T = 1
    log-probs and the student's, as a TraceSet and the grades."""
    tok, teacher, problems = task["tok"], task["teacher"], task["prompts"]
    prompts = prompt_ids(tok, [p.prompt for p in problems])
    responses = generate(
        teacher,
        prompts,
        tok.eos_token_id,
        temperature=temperature,
        seed=seed,
        max_new_tokens=task["regime"].max_new_tokens,
    )
    ts = build_trace_set(
        prompts, responses, prompt_ids=range(len(problems)), newlines=task["newlines"]
    )
    ts.teacher_lp = score_traces(teacher, ts)
    ts.student_lp = score_traces(student, ts)
    correct = [
        grade(p, tok.decode(r, skip_special_tokens=True)).correct
        for p, r in zip(problems, responses)
    ]
    return {"ts": ts, "correct": correct}


def make_traces(run: BenchmarkRun, sizes: dict, task: dict) -> None:
    """2. The offline traces: ``candidates`` teacher samples per prompt at T = 1 (``t10``:
    the first; ``dasd``: the one DASD selection picks by divergence_scores under the
    student) and one at T = 0.6 (``t06``, the stages' first phase). Each set's
    ``meta["row_flops"]`` is what each row cost to make (``bench.quality.flops``; a DASD
    pick carries its prompt's every candidate)."""
    t0 = time.time()
    task["newlines"] = newline_ids(task["tok"])
    student = load_model(task["regime"].student)
    params = {"student": count_params(student), "teacher": count_params(task["teacher"])}
    sets = [_sample_set(task, 1.0, CANDIDATE_SEED + k, student) for k in range(sizes["candidates"])]
    cold = _sample_set(task, 0.6, 99, student)
    for s in [*sets, cold]:
        ts = s["ts"]
        ts.meta["row_flops"] = trace_row_flops(ts.lengths.tolist(), **_params(params))
    n = len(task["prompts"])
    # Candidates of prompt i are rows i, n + i, 2n + i, ... of the concatenation.
    both = [s["ts"] for s in sets]
    scores = torch.cat(
        [divergence_scores(t.student_lp, t.teacher_lp, t.sentence_ids, t.loss_mask) for t in both]
    ).tolist()
    pids = [i for _ in both for i in range(n)]
    chosen = select_top_k(pids, scores, k=1)
    stats = {}
    for name, s in (("t10", sets[0]), ("t06", cold)):
        s["ts"].save(run.trace_path(name))
        stats[name] = {"rows": n, "teacher_correct": sum(s["correct"]) / n}
    picked_rows = [(k // n, k % n) for k in chosen]
    dasd = _concat_rows([sets[c]["ts"] for c in range(len(sets))], picked_rows)
    every = sum_row_flops([s["ts"].meta["row_flops"] for s in sets])  # per prompt
    dasd.meta["row_flops"] = {k: [v[i] for _, i in picked_rows] for k, v in every.items()}
    dasd.save(run.trace_path("dasd"))
    correct = [sets[c]["correct"][i] for c, i in picked_rows]
    stats["dasd"] = {"rows": len(correct), "teacher_correct": sum(correct) / len(correct)}
    stats["dasd"]["picked_not_first"] = sum(c > 0 for c, _ in picked_rows) / len(picked_rows)
    run.info["traces"] = {
        "stats": stats,
        "wall_s": time.time() - t0,
        "candidates": sizes["candidates"],
    }
    run.info["params"] = params
    run.log(f"traces: {stats} ({time.time() - t0:.0f} s)")


def _params(params: dict) -> dict:
    return {"student_params": params["student"], "teacher_params": params["teacher"]}


def _concat_rows(sets: list, picked: list[tuple[int, int]]):
    """One TraceSet of row i of set c for each (c, i) in ``picked`` (padded to one width)."""
    width = max(int(s.ids_BL.shape[1]) for s in sets)
    parts = []
    for c, i in picked:
        row = sets[c].subset([i])
        pad = width - int(row.ids_BL.shape[1])
        if pad:
            for name in ("ids_BL", "loss_mask", "teacher_lp", "student_lp", "sentence_ids"):
                x = getattr(row, name)
                fill = torch.zeros(x.shape[0], pad, dtype=x.dtype)
                setattr(row, name, torch.cat([x, fill], dim=1))
        parts.append(row)
    out = parts[0]
    for name in (
        "ids_BL",
        "loss_mask",
        "teacher_lp",
        "student_lp",
        "sentence_ids",
        "prompt_id",
        "lengths",
    ):
        setattr(out, name, torch.cat([getattr(p, name) for p in parts]))
    return out


def base_job(run: BenchmarkRun, plan: Plan) -> dict:
    """The keys every fine-tuning job shares (``bench.quality.jobs.run_arm``)."""
    S = plan.sizes
    return dict(
        data=run.data_path,
        student=str(plan.regime.student),
        lr=S["lr"],
        batch_size=S["batch_size"],
        warmup_steps=S["warmup_steps"],
        student_ref="current",
        evals=plan.evals,
        round_steps=ROUND_STEPS,
    )


OFFLINE_THEN_OPD = (
    "offline_opd",
    "offline_opd_low_lr",
    "offline_opd_baseline",
    "offline_opd_baseline_full_lr",
)


def arm_job(run: BenchmarkRun, plan: Plan, arm: str, seed: int, chosen: dict) -> dict:
    """One arm's job. ``chosen``: best / risky (preset names), tune (WeightConfig dict).
    The on-policy arms: ``opd`` rounds of the student's own samples from the start;
    ``offline_opd`` the best preset on the T = 1 traces for half the steps, then rounds
    (the ``opd`` preset, the job's ``on_policy_weights`` default)."""
    steps, half = plan.steps, plan.steps // 2
    phases = [(run.trace_path("t10"), steps)]
    extra: dict = {}
    if arm in PRESET_ARMS:
        weights = preset(arm).to_dict()
    elif arm == "dasd_sft":
        weights, phases = None, [(run.trace_path("dasd"), steps)]
    elif arm in ("stages_sft", "stages_best"):
        name = "sft" if arm == "stages_sft" else chosen["best"]
        weights = preset(name).to_dict()
        phases = [(run.trace_path("t06"), half), (run.trace_path("t10"), steps - half)]
    elif arm in PROTECTIONS:
        fields = dict(PROTECTIONS[arm])
        extra["weight_warmup_steps"] = fields.pop("weight_warmup_steps", 0)
        weights = preset(chosen["risky"], **fields).to_dict()
    elif arm == "tune":
        weights = chosen["tune"]
    elif arm in ("opd", "opd_low_lr", "opd_baseline"):
        weights, phases = preset("opd").to_dict(), [(ON_POLICY, steps)]
    elif arm in OFFLINE_THEN_OPD:
        weights = preset(chosen["best"]).to_dict()
        phases = [(run.trace_path("t10"), half), (ON_POLICY, steps - half)]
    else:
        raise ValueError(f"unknown arm {arm!r}")
    if arm in ("opd_low_lr", "offline_opd_low_lr", "opd_baseline", "offline_opd_baseline"):
        extra["on_policy_lr_scale"] = OPD_LR_SCALE
    if arm in OPD_BASELINE_ARMS:
        extra["on_policy_weights"] = preset("opd_baseline").to_dict()
        if arm == "opd_baseline":
            weights = extra["on_policy_weights"]
    return {
        **base_job(run, plan),
        **extra,
        "tags": {"arm": arm},
        "phases": phases,
        "weights": weights,
        "seed": seed,
    }


def _log_done(run: BenchmarkRun, k: int, n: int, rs: list[dict]) -> None:
    last = rs[-1]
    run.log(
        f"  [{k}/{n}] {last['arm']} seed {last['seed']}: greedy {last['greedy']['accuracy']:.3f}, "
        f"sampled {last['sampled']['accuracy']:.3f} at step {last['step']} "
        f"({last['train']['wall_s']:.0f} s, eval {last['train']['eval_s']:.0f} s)"
    )


def run_jobs(
    run: BenchmarkRun,
    workers,
    n_workers: int,
    jobs: list[dict],
    deadline: float,
    reserve: int = 0,
) -> list[dict]:
    """The jobs on the worker pool in order, ``n_workers`` at a time, each one's records
    appended as it completes. A job is not started when, at the median time of the finished
    training jobs, it would end after ``deadline`` (epoch seconds) less the time of
    ``reserve`` more jobs (kept for a later call): it is listed in ``run.info["skipped"]``."""
    out: list[dict] = []
    queue, inflight, took = list(jobs), [], []
    done = 0
    while queue or inflight:
        while queue and len(inflight) < n_workers:
            est = sorted(took)[len(took) // 2] if took else 0.0
            if queue[0]["phases"] and time.time() + est * (1 + reserve / n_workers) > deadline:
                skipped = run.info.setdefault("skipped", [])
                skipped += [{"arm": j["tags"]["arm"], "seed": j["seed"]} for j in queue]
                run.log(f"  deadline: {len(queue)} jobs not started")
                queue = []
                break
            job = queue.pop(0)
            inflight.append(
                (workers.apply_async(run_arm, (job,)), time.time(), bool(job["phases"]))
            )
        time.sleep(0.5)
        for item in [x for x in inflight if x[0].ready()]:
            inflight.remove(item)
            rs = item[0].get()
            if item[2]:
                took.append(time.time() - item[1])
            run.append(rs)
            out.extend(rs)
            done += 1
            _log_done(run, done, len(jobs), rs)
    return out


def choose_best_and_risky(records: list[dict], steps: int) -> dict:
    """From the weighted presets' records at the last step: the best (highest mean greedy
    accuracy) and the riskiest (lowest)."""
    means = {}
    for arm in PRESET_ARMS[1:]:
        xs = [r["greedy"]["accuracy"] for r in records if r["arm"] == arm and r["step"] == steps]
        if xs:
            means[arm] = sum(xs) / len(xs)
    return {"best": max(means, key=means.get), "risky": min(means, key=means.get), "means": means}


def later_arms(plan: Plan) -> list[str]:
    return [a for a in plan.arms if a in LATER_ARMS]
