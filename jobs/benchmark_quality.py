"""The built-in quality benchmark: which weighting of the teacher's offline traces gives
the best student, in a regime where distillation helps? (issue 15; bench/quality/)

The task and models are the embedded default's (raydc/assets/sumtask): a running sum mod
10 over lists of codes; the shipped teacher knows all 40 codes, the shipped student 24.
Steps, top to bottom (bench/quality/steps.py):
  1. the problem sets (eval, val, the prior's known-code lists, trace prompts) and the
     teacher's T = 1 samples of the eval prompts (ExAccErr's eps);
  2. offline traces: teacher samples at T = 1 (2 candidates a prompt; DASD selection picks
     one by the student's scores) and at T = 0.6, with teacher and student log-probs;
  3. the tune arm's search: Ray Tune over the weight family on the validation split;
  4. the initial student's measures (step 0) and the core arms, every seed, on 2 worker
     processes, each run measured at every eval step;
  5. the arms that use the best and the riskiest preset (stages_best, the protections);
  6. the report: results.json, table.md, PNG plots, load; with --docs, docs/results.md.

Usage:
  python jobs/benchmark_quality.py --out runs/quality --docs docs   # the full benchmark
  python jobs/benchmark_quality.py --out /tmp/q --quick              # a smoke run
  python jobs/benchmark_quality.py --report runs/quality --docs docs # report again
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ and this checkout's raydc

import torch  # noqa: E402

from bench.machine import LoadMonitor  # noqa: E402
from bench.quality import report, steps  # noqa: E402
from bench.quality.jobs import worker_init  # noqa: E402
from bench.quality.run import ARMS, LATER_ARMS, BenchmarkRun, Plan  # noqa: E402
from raydc.infra.models import offline_env  # noqa: E402

FULL = dict(
    eval_n=200,
    val_n=100,
    prior_n=100,
    trace_prompts=1000,
    candidates=2,
    lr=1e-3,
    batch_size=32,
    warmup_steps=10,
)
QUICK = dict(FULL, eval_n=24, val_n=12, prior_n=12, trace_prompts=40)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per core arm")
    ap.add_argument("--later-seeds", type=int, default=8, help=f"seeds of {LATER_ARMS} and tune")
    ap.add_argument(
        "--evals", default="10,20,40,80,120,200", help="eval steps; the last ends a run"
    )
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--tune-trials", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="training processes")
    ap.add_argument(
        "--minutes", type=float, default=55.0, help="no fine-tuning job starts that would end later"
    )
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--docs", default=None, help="write results.md and its plots here too")
    ap.add_argument("--report", default=None, help="only rewrite the report of this run folder")
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan(
        sizes=dict(QUICK if args.quick else FULL),
        evals=sorted(int(b) for b in args.evals.split(",")),
        arms=[a for a in args.arms.split(",") if a],
        seeds=args.seeds,
        later_seeds=min(args.later_seeds, args.seeds),
        tune_trials=args.tune_trials,
        deadline_s=60.0 * args.minutes,
    )
    unknown = sorted(set(plan.arms) - set(ARMS))
    if unknown:
        sys.exit(f"unknown arms {unknown}; arms: {ARMS}")
    return plan


def run_benchmark(args: argparse.Namespace, plan: Plan, run: BenchmarkRun) -> dict:
    """Stages 1-5; returns the timings and the choices later arms used."""
    t = {"start": time.time()}
    task = steps.make_data(run, plan.sizes)
    steps.make_traces(run, plan.sizes, task)
    del task
    t["setup_s"] = time.time() - t["start"]
    chosen: dict = {}
    if "tune" in plan.arms:
        t0 = time.time()
        base = dict(steps.base_job(run, plan), phases=[(run.trace_path("t10"), plan.steps)])
        tuned = tune_search(base, plan, run)
        chosen["tune"] = tuned["chosen"]
        run.info["tune"] = tuned
        run.log(
            f"tune: chose {tuned['chosen_fields']} ({time.time() - t0:.0f} s): {tuned['trials']}"
        )
    workers = mp.get_context("spawn").Pool(args.workers, worker_init, (1,))
    t0 = time.time()
    base = {**steps.base_job(run, plan), "phases": [], "evals": [0], "tags": {"arm": "initial"}}
    first = [a for a in plan.arms if a not in LATER_ARMS]
    later = steps.later_arms(plan)
    jobs = [dict(base, seed=s) for s in range(plan.seeds)]
    jobs += [
        steps.arm_job(run, plan, a, s, chosen)
        for s in range(plan.seeds)
        for a in first
        if s < plan.seeds_of(a)
    ]
    run.log(f"running {len(jobs)} jobs on {args.workers} workers")
    deadline = t["start"] + plan.deadline_s
    # Time kept for the later arms: half their planned seeds at least.
    reserve = len(later) * max(1, plan.later_seeds // 2)
    records = steps.run_jobs(run, workers, args.workers, jobs, deadline, reserve)
    if later:
        chosen.update(steps.choose_best_and_risky(records, plan.steps))
        run.info["chosen"] = {k: chosen[k] for k in ("best", "risky", "means")}
        run.log(f"best preset {chosen['best']}, riskiest {chosen['risky']}: {chosen['means']}")
        jobs = [
            steps.arm_job(run, plan, a, s, chosen) for s in range(plan.later_seeds) for a in later
        ]
        steps.run_jobs(run, workers, args.workers, jobs, deadline)
    workers.close()
    workers.join()
    t["arms_s"] = time.time() - t0
    return t


def tune_search(base: dict, plan: Plan, run: BenchmarkRun) -> dict:
    from bench.quality.tuning import tune_weights

    return tune_weights(base, plan.tune_trials, run.out)


def main(argv=None) -> None:
    args = parse_args(argv)
    offline_env()
    if args.report:
        report.rewrite(Path(args.report), args.docs)
        return
    torch.set_num_threads(2)
    plan = make_plan(args)
    run = BenchmarkRun(args.out)
    monitor = LoadMonitor().start()
    run.log(f"plan {plan}")
    timings = run_benchmark(args, plan, run)
    command = "python jobs/benchmark_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report.write_report(run, plan, monitor, timings, command, args.docs)


if __name__ == "__main__":
    main()
