"""The built-in quality benchmark: does distribution-corrected weighting give a better
student than SFT on the same offline teacher traces? (issue 7; task in raydc/quality/)

Stages, top to bottom:
  1. the task: problems for the teacher, the student's prior, the traces, eval/val/side sets;
  2. the teacher: a Qwen2 model trained with raydc's loss (``sft`` preset) on a mixture of
     trace styles (mostly ``backward``), saved with save_pretrained;
  3. the student's prior: a smaller Qwen2 model pre-trained on its own style (``forward``,
     shorter lists) and a side task the teacher never shows;
  4. offline traces: vLLM samples several candidates per prompt from the teacher at T = 1.0
     (clean) and T = 1.5 (noisy), with the teacher's T = 1 log-probs of each token;
  5. scoring: every trace under the initial student once; DASD selection picks one
     candidate per prompt from those scores;
  6. a small in-process search over the weight family on a validation split (the
     ``tune`` arm);
  7. the arms: every weighting on the same traces, step budgets and seeds;
  8. the report: results.json, table.md, results.png, load.json.
Each stage is a function of ``raydc.quality.stages`` (the report: ``raydc.quality.report``),
recorded in the run's state so ``--resume`` skips what finished.

Usage:
  python jobs/benchmark_quality.py --out runs/quality            # the full benchmark
  python jobs/benchmark_quality.py --out /tmp/q --quick          # a smoke run (~2 min)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from raydc import quality as q  # noqa: E402
from raydc.models import offline_env  # noqa: E402
from raydc.quality import stages  # noqa: E402
from raydc.quality.run import ARMS, TRACE_SETS, BenchmarkRun, Plan  # noqa: E402

FULL = dict(
    teacher_pool=20000,
    teacher_steps=1800,
    teacher_backward_share=0.7,
    student_pool=20000,
    student_steps=3000,
    # The student's pre-training: at lr 2e-3 and batch 32 it sat on a loss plateau for
    # 4,000 steps (11% greedy on its own task); at 3e-3 and 64 it leaves the plateau within
    # about 1,000 steps (probes: 98-99% on its own task), the side task at its own pace.
    student_lr=3e-3,
    student_batch=64,
    pretrain_lr=2e-3,
    pretrain_batch=32,
    side_share=0.3,
    trace_prompts=1000,
    candidates=4,
    temperatures=(1.0, 1.5),
    eval_n=200,
    side_n=100,
    val_n=200,
    tune_trials=6,
    lr=1e-3,
    batch_size=32,
    warmup_steps=10,
)
QUICK = dict(
    FULL,
    teacher_pool=512,
    teacher_steps=30,
    student_pool=512,
    student_steps=30,
    trace_prompts=24,
    candidates=2,
    eval_n=24,
    side_n=8,
    val_n=12,
    tune_trials=2,
)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per arm")
    ap.add_argument("--budgets", default="50,120", help="fine-tuning step budgets")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--traces", default=",".join(TRACE_SETS))
    ap.add_argument("--workers", type=int, default=2, help="training processes")
    ap.add_argument(
        "--threads", type=int, default=2, help="torch threads of the main process (stages 2-5)"
    )
    ap.add_argument("--student-ref", default="current", choices=["current", "init"])
    ap.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    ap.add_argument("--seed", type=int, default=0, help="task, teacher and student seed")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished stages and fine-tuning runs found in --out",
    )
    return ap.parse_args()


def make_plan(args: argparse.Namespace) -> Plan:
    plan = Plan(
        params=dict(QUICK if args.quick else FULL),
        budgets=sorted(int(b) for b in args.budgets.split(",")),
        arms=[a for a in args.arms.split(",") if a],
        traces=[t for t in args.traces.split(",") if t],
        seeds=args.seeds,
        seed=args.seed,
        student_ref=args.student_ref,
    )
    unknown = sorted(set(plan.arms) - set(ARMS)) + sorted(set(plan.traces) - set(TRACE_SETS))
    if unknown:
        sys.exit(f"unknown arms/traces {unknown}; arms: {ARMS}; traces: clean, noisy")
    return plan


def main() -> None:
    """Arguments -> the task -> the teacher and the student's prior -> offline traces ->
    the tune arm's search -> the arms -> the report."""
    args = parse_args()
    offline_env()
    torch.set_num_threads(args.threads)
    plan = make_plan(args)
    run = BenchmarkRun(args.out, args.resume)
    monitor = q.LoadMonitor().start()
    t_start = time.time()
    run.log(
        f"params {plan.params}; budgets {plan.budgets}; seeds {plan.seeds}; arms {plan.arms}; "
        f"traces {plan.traces}"
    )
    task = stages.make_task(run, plan.params)
    workers = mp.get_context("spawn").Pool(args.workers, q.worker_init, (1,))
    # The teacher trains here while the student's prior trains in a worker, one core each:
    # two threads here would oversubscribe the two cores and slow both.
    student = stages.start_student(run, plan, workers)
    torch.set_num_threads(1 if student is not None else args.threads)
    stages.train_teacher(run, plan, task)
    stages.finish_student(run, student)
    torch.set_num_threads(args.threads)
    stages.make_traces(run, plan, task)
    base = stages.base_job(run, plan, task)
    if "tune" in plan.arms:
        stages.tune_weights(run, plan, workers, base)
    t0 = time.time()
    jobs, done = stages.arm_jobs(run, plan, base)
    run.log(f"running {len(jobs)} fine-tuning runs on {args.workers} workers ({done} done)")
    stages.run_arms(run, workers, jobs)
    workers.close()
    workers.join()
    timings = {"arms_s": time.time() - t0}
    q.write_report(
        run, plan, stages.finished_records(run, plan), monitor, timings, t_start, len(jobs)
    )


if __name__ == "__main__":
    main()
