"""The benchmark's jobs as they run in worker processes: one arm, the student's prior."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch

from raydc.quality.evaluate import evaluate, free_generation_metrics, generate, max_new_tokens_for
from raydc.quality.finetune import TrainSpec, train
from raydc.quality.models import STUDENT_SIZE, build_model, load_model, save_model
from raydc.quality.task import Problem, encode, make_problems
from raydc.quality.traces import TraceSet, examples_to_trace_set
from raydc.weights import WeightConfig

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
