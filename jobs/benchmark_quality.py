"""The built-in quality benchmark: which weighting of the teacher's offline traces gives
the best student, in three regimes? (issues 15, 30; bench/quality/)

The task is the embedded default's (raydc/assets/sumtask): a running sum mod 10 over lists
of codes. Regimes (bench.quality.task.REGIMES; docs/results.md defines them): knowledge
(the shipped pair: the teacher knows 40 codes, the student 24), capacity (a student that
knows every code, a teacher that adds two codes a line) and long (the same student, lists
of 8-16 codes); scripts/build_regimes.py builds the last two's models. Each regime runs
into <out>/<regime>/ and is reused when its results.json exists (--force reruns it).
Steps of one regime, top to bottom (bench/quality/steps.py):
  1. the problem sets (eval, val, the prior's known-code lists, trace prompts) and the
     teacher's T = 1 samples of the eval prompts (ExAccErr's eps);
  2. offline traces: teacher samples at T = 1 (2 candidates a prompt; DASD selection picks
     one by the student's scores) and at T = 0.6, with teacher and student log-probs;
  3. the tune arm's search: Ray Tune over the weight family on the validation split;
  4. the initial student's measures (step 0) and the core arms, every seed, on 2 worker
     processes, each run measured at every eval step (with its FLOPs so far); ``opd``
     samples its own answers in rounds, scored by the teacher (bench/quality/on_policy.py);
  5. the arms that use the best and the riskiest preset (stages_best, the protections,
     offline_opd: the best preset, then on-policy rounds);
  6. the report: results.json, table.md, PNG plots (over steps and over FLOPs), load; with --docs,
     docs/results/<regime>.md, and docs/results.md and docs/results.json over the regimes.

Usage:
  python jobs/benchmark_quality.py --out runs/quality --docs docs   # every regime
  python jobs/benchmark_quality.py --regime long --out runs/quality --docs docs
  python jobs/benchmark_quality.py --out /tmp/q --quick              # a smoke run
  python jobs/benchmark_quality.py --report runs/quality --docs docs # report again
  python jobs/benchmark_quality.py --add-arms opd,offline_opd --out runs/quality --docs docs

--add-arms runs only the listed arms (their plan's seeds) on each finished regime's data.pt
and trace sets, appends their records and rewrites the regime's report (results.json keeps
the run's command, plan, timings and load, and lists the addition under ``added``). A folder
written before FLOPs were counted is first brought up to the current format
(bench/quality/backfill.py): the trace prompts drawn again and checked, the trace sets'
per-row costs, the earlier arms' FLOPs replayed from their seeds into records.jsonl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ and this checkout's raydc

import torch  # noqa: E402

from bench.machine import LoadMonitor  # noqa: E402
from bench.quality import backfill, report, steps  # noqa: E402
from bench.quality.jobs import worker_init  # noqa: E402
from bench.quality.run import ARMS, LATER_ARMS, BenchmarkRun, Plan  # noqa: E402
from bench.quality.task import REGIMES, Regime  # noqa: E402
from raydc.infra.models import offline_env  # noqa: E402

FULL = dict(
    eval_n=200,
    val_n=300,
    prior_n=100,
    trace_prompts=1000,
    candidates=2,
    lr=1e-3,
    batch_size=32,
    warmup_steps=10,
)
QUICK = dict(FULL, eval_n=24, val_n=12, prior_n=12, trace_prompts=40)
QUICK_STEPS = 4  # a smoke run's steps in every regime


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--regime", default="all", choices=["all", *REGIMES])
    ap.add_argument("--force", action="store_true", help="rerun a regime already run")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per core arm")
    ap.add_argument("--later-seeds", type=int, default=5, help=f"seeds of {LATER_ARMS} and tune")
    ap.add_argument(
        "--evals",
        default=None,
        help="eval steps, the last ends a run (default: 1/10, 1/4, 1/2 and all of the regime's)",
    )
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--tune-trials", type=int, default=8)
    ap.add_argument("--tune-seeds", type=int, default=2, help="training seeds of a tune trial")
    ap.add_argument("--workers", type=int, default=2, help="training processes")
    ap.add_argument(
        "--minutes",
        type=float,
        default=40.0,
        help="a regime's deadline: no fine-tuning job starts that would end later",
    )
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--docs", default=None, help="write results.md and its plots here too")
    ap.add_argument("--report", default=None, help="only rewrite the report of this run folder")
    ap.add_argument(
        "--add-arms",
        default=None,
        help="run only these arms (comma-separated, their plan's seeds) on each finished "
        "regime of --out (its data and traces) and add them to its report; --minutes is "
        "the addition's deadline",
    )
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace, regime: Regime) -> Plan:
    sizes = dict(QUICK if args.quick else FULL, batch_size=regime.batch_size)
    steps = QUICK_STEPS if args.quick else regime.steps
    evals = (
        [int(b) for b in args.evals.split(",")]
        if args.evals
        else [steps // 10, steps // 4, steps // 2, steps]
    )
    plan = Plan(
        regime=regime,
        sizes=sizes,
        evals=sorted({e for e in evals if e > 0}),
        arms=[a for a in args.arms.split(",") if a],
        seeds=args.seeds,
        later_seeds=min(args.later_seeds, args.seeds),
        tune_trials=args.tune_trials,
        tune_seeds=args.tune_seeds,
        deadline_s=60.0 * args.minutes,
    )
    unknown = sorted(set(plan.arms) - set(ARMS))
    if unknown:
        sys.exit(f"unknown arms {unknown}; arms: {ARMS}")
    return plan


def run_benchmark(args: argparse.Namespace, plan: Plan, run: BenchmarkRun) -> dict:
    """Stages 1-5; returns the timings and the choices later arms used."""
    t = {"start": time.time()}
    task = steps.make_data(run, plan.sizes, plan.regime)
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

    return tune_weights(base, plan.tune_trials, plan.tune_seeds, plan.sizes["val_n"], run.out)


def add_arms(args: argparse.Namespace, name: str, arms: list[str], command: str) -> None:
    """The arms ``arms`` added to regime ``name``'s finished run in <out>/<name>: the folder
    brought up to the current format (``backfill.upgrade``), each (arm, seed) of the plan's
    seeds not in its records run on the pool (records appended), the report rewritten
    (``report.write_added``)."""
    out = Path(args.out) / name
    res = json.loads((out / "results.json").read_text())
    plan = backfill.plan_of(res, REGIMES[name])
    chosen = backfill.chosen_of(res)
    need = {"tune": "tune", **dict.fromkeys(LATER_ARMS, "best")}
    for arm in arms:
        if arm in need and need[arm] not in chosen:
            sys.exit(f"{name}: arm {arm} needs the run's {need[arm]!r} choice, not in results.json")
    run = BenchmarkRun(out, resume=True)
    monitor = LoadMonitor().start()
    t0 = time.time()
    run.log(f"regime {name}: adding arms {arms} to the run finished {res['finished']}")
    upgrade = backfill.upgrade(run, plan, res, chosen)
    for key, what in upgrade["backfill"].items():
        if key not in ("when", "wall_s"):
            run.log(f"  backfill {key}: {what}")
    done = {(r["arm"], r["seed"]) for r in run.records()}
    seeds = max(plan.seeds_of(a) for a in arms)
    jobs = [
        steps.arm_job(run, plan, a, s, chosen)
        for s in range(seeds)
        for a in arms
        if s < plan.seeds_of(a) and (a, s) not in done
    ]
    run.log(f"running {len(jobs)} jobs on {args.workers} workers ({len(done)} runs recorded)")
    workers = mp.get_context("spawn").Pool(args.workers, worker_init, (1,))
    steps.run_jobs(run, workers, args.workers, jobs, t0 + 60.0 * args.minutes)
    workers.close()
    workers.join()
    load = monitor.stop()
    added = {
        "arms": arms,
        "jobs": [{"arm": j["tags"]["arm"], "seed": j["seed"]} for j in jobs],
        "skipped": run.info.get("skipped", []),
        "chosen": {k: chosen[k] for k in ("best", "risky") if k in chosen},
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": time.time() - t0,
        "load": load,
    }
    report.write_added(run, res, upgrade, added, args.docs)


def main(argv=None) -> None:
    args = parse_args(argv)
    offline_env()
    if args.report:
        report.rewrite(Path(args.report), args.docs)
        return
    torch.set_num_threads(2)
    command = "python jobs/benchmark_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    names = list(REGIMES) if args.regime == "all" else [args.regime]
    if args.add_arms:
        arms = [a for a in args.add_arms.split(",") if a]
        unknown = sorted(set(arms) - set(ARMS))
        if unknown or not arms:
            sys.exit(f"--add-arms: unknown arms {unknown}; arms: {ARMS}")
        for name in names:
            if not (Path(args.out) / name / "results.json").is_file():
                print(f"{name}: no finished run in {Path(args.out) / name}: nothing to add to")
                continue
            add_arms(args, name, arms, command)
        if args.docs:
            report.write_overview(Path(args.out), Path(args.docs))
        return
    for name in names:
        regime, out = REGIMES[name], Path(args.out) / name
        if (out / "results.json").is_file() and not args.force:
            print(f"{name}: reusing {out / 'results.json'} (--force reruns it)", flush=True)
            continue
        if not regime.models_present:
            sys.exit(
                f"{name}: no models at {regime.student} / {regime.teacher}: run "
                "python scripts/build_regimes.py"
            )
        plan = make_plan(args, regime)
        run = BenchmarkRun(out)
        monitor = LoadMonitor().start()
        run.log(f"regime {name}: {regime.summary}; plan {plan}")
        timings = run_benchmark(args, plan, run)
        report.write_report(run, plan, monitor, timings, command, args.docs)
    if args.docs:
        report.write_overview(Path(args.out), Path(args.docs))


if __name__ == "__main__":
    main()
