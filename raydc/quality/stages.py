"""The quality benchmark's stages, in the order jobs/benchmark_quality.py runs them.

Each stage records what it finished in the run's state (``BenchmarkRun``), so a resumed
run skips it: the task, the teacher, the student's prior, the offline traces (sampled,
scored, selected), the ``tune`` arm's search, and the arms' fine-tuning runs (their
records appended as each completes). ``raydc.quality.report.write_report`` writes the
results from what finished; the arms and the search space are in ``raydc.quality.run``.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from raydc.config import TuneConfig
from raydc.quality.evaluate import evaluate, max_new_tokens_for
from raydc.quality.finetune import TrainSpec, train
from raydc.quality.jobs import pretrain_student_job, run_job
from raydc.quality.models import TEACHER_SIZE, build_model, count_params, load_model, save_model
from raydc.quality.run import (
    PRESET_ARMS,
    STUDENT_LENGTHS,
    TEACHER_LENGTHS,
    TRACE_SETS,
    TUNE_BASE,
    TUNE_SPACE,
    BenchmarkRun,
    Plan,
    write_json_safe,
)
from raydc.quality.sampling import check_vllm_logprobs, sample_with_vllm
from raydc.quality.task import Problem, decode, encode, grade, make_problems
from raydc.quality.traces import build_trace_set, examples_to_trace_set, score_traces
from raydc.select import divergence_scores, select_top_k
from raydc.weights import preset


@dataclass
class TaskSets:
    """The problems: evaluation, validation (the tune arm's), side task, trace prompts."""

    eval: list[Problem]
    val: list[Problem]
    side: list[Problem]
    traces: list[Problem]
    max_digits: int = TEACHER_LENGTHS[1]


def make_task(run: BenchmarkRun, params: dict) -> TaskSets:
    """1. The problem sets (fixed seeds); the evaluation sets saved for the workers."""
    task = TaskSets(
        eval=make_problems(params["eval_n"], random.Random(10_001), TEACHER_LENGTHS),
        val=make_problems(params["val_n"], random.Random(10_002), TEACHER_LENGTHS),
        side=make_problems(params["side_n"], random.Random(10_003), STUDENT_LENGTHS, "D"),
        traces=make_problems(params["trace_prompts"], random.Random(10_004), TEACHER_LENGTHS),
    )
    torch.save({"eval": task.eval, "val": task.val, "side": task.side}, run.problems_path)
    return task


def start_student(run: BenchmarkRun, plan: Plan, workers):
    """3. The student's own prior, pre-trained in a worker while the teacher trains here
    (one core each); None when the state already has it. A student_state.json found in
    the folder (an earlier invocation's result of ``pretrain_student_job``) is reused."""
    student_file = run.out / "student_state.json"
    if "student" not in run.state and student_file.exists():
        run.save_state(student=json.loads(student_file.read_text()))
    if "student" in run.state:
        return None
    P = plan.params
    job = dict(
        dir=run.student_dir,
        seed=plan.seed,
        pool=P["student_pool"],
        lengths=list(STUDENT_LENGTHS),
        side_share=P["side_share"],
        steps=P["student_steps"],
        batch_size=P["student_batch"],
        lr=P["student_lr"],
        problems=str(run.problems_path),
        eval_lengths_max=TEACHER_LENGTHS[1],
    )
    return workers.apply_async(pretrain_student_job, (job,))


def train_teacher(run: BenchmarkRun, plan: Plan, task: TaskSets) -> None:
    """2. The teacher: trained with raydc's loss (``sft``) on a mixture of styles, mostly
    ``backward``; saved with save_pretrained and evaluated."""
    if "teacher" not in run.state:
        t0, P = time.time(), plan.params
        rng = random.Random(plan.seed)
        pool = make_problems(P["teacher_pool"], rng, TEACHER_LENGTHS)
        styles = [
            "backward" if rng.random() < P["teacher_backward_share"] else "forward" for _ in pool
        ]
        teacher = build_model(TEACHER_SIZE, seed=plan.seed)
        spec = TrainSpec(
            P["teacher_steps"], P["pretrain_batch"], P["pretrain_lr"], seed=plan.seed, decay=True
        )
        info = train(teacher, examples_to_trace_set(pool, styles), spec, log=run.log)
        save_model(teacher, run.teacher_dir)
        ev = evaluate(teacher, task.eval, task.side, plan.seed, task.max_digits)
        run.save_state(teacher={"train": info, "eval": ev, "wall_s": time.time() - t0})
    ev = run.state["teacher"]["eval"]
    run.log(
        f"teacher: {count_params(load_model(run.teacher_dir))} params, "
        f"{run.state['teacher']['wall_s']:.0f} s; "
        f"greedy {ev['greedy']['accuracy']:.3f}, sampled {ev['sampled']['accuracy']:.3f}, "
        f"backward share (sampled) {ev['sampled']['backward_share']:.2f}"
    )


def finish_student(run: BenchmarkRun, pending) -> None:
    """3 (end). Wait for the student's pre-training (``start_student``) and log its prior."""
    if pending is not None:
        run.save_state(student=pending.get())
    st = run.state["student"]
    run.log(
        f"student: {count_params(load_model(run.student_dir))} params, {st['wall_s']:.0f} s; "
        f"own lengths greedy {st['own_lengths']['greedy']['accuracy']:.3f}; eval task greedy "
        f"{st['eval']['greedy']['accuracy']:.3f}; side task {st['eval']['side_accuracy']:.3f}"
    )


def make_traces(run: BenchmarkRun, plan: Plan, task: TaskSets) -> None:
    """4-5. Offline teacher traces with vLLM at the two temperatures, the teacher's
    log-probs checked against transformers, every trace scored under the initial student,
    and two selections per temperature: ``first`` (one candidate per prompt, as sampled:
    what every non-DASD arm trains on) and ``dasd`` (each prompt's best divergence
    score). Saved as TraceSets under traces/."""
    if "traces" not in run.state:
        t0, P = time.time(), plan.params
        teacher, student = load_model(run.teacher_dir), load_model(run.student_dir)
        prompts = [encode(p.prompt) for p in task.traces]
        samples = sample_with_vllm(
            run.teacher_dir,
            prompts,
            n=P["candidates"],
            temperatures=P["temperatures"],
            max_tokens=max_new_tokens_for(task.max_digits),
            seed=plan.seed,
        )
        sampling_s = time.time() - t0
        # The stored log-probs must be the teacher's: re-score some with transformers.
        lp_check = {str(t): check_vllm_logprobs(teacher, prompts, samples[t]) for t in samples}
        paths, stats = {}, {}
        for name, temp in zip(TRACE_SETS, P["temperatures"]):
            selections = _score_and_select(run.out, name, samples[temp], prompts, task, student)
            for key, (path, st) in selections.items():
                paths[key], stats[key] = path, {"temperature": temp, **st}
        run.save_state(
            traces={
                "paths": paths,
                "stats": stats,
                "vllm_logprob_check_max_abs": lp_check,
                "sampling_s": sampling_s,
                "wall_s": time.time() - t0,
            }
        )
    tr = run.state["traces"]
    P = plan.params
    run.log(
        f"vLLM sampled {P['trace_prompts']} prompts x {P['candidates']} x "
        f"{len(P['temperatures'])} temperatures in {tr['sampling_s']:.0f} s; max |vLLM - "
        f"transformers| log-prob {tr['vllm_logprob_check_max_abs']}"
    )
    for k, v in tr["stats"].items():
        run.log(f"traces {k}: {v}")


def _score_and_select(
    out: Path, name: str, candidates: list, prompts: list, task: TaskSets, student
) -> dict[str, tuple[str, dict]]:
    """One temperature's candidates as a TraceSet scored under ``student``; its ``first``
    and ``dasd`` selections saved. Returns {"<name>_<kind>": (path, stats)}."""
    rows_p, rows_r, rows_lp, pids, grades = [], [], [], [], []
    for i, cands in enumerate(candidates):
        for ids, lps in cands:
            rows_p.append(prompts[i])
            rows_r.append(ids)
            rows_lp.append(lps)
            pids.append(i)
            grades.append(grade(task.traces[i], decode(ids)))
    ts = build_trace_set(rows_p, rows_r, rows_lp, pids)
    ts.student_lp = score_traces(student, ts)
    scores = divergence_scores(ts.student_lp, ts.teacher_lp, ts.sentence_ids, ts.loss_mask)
    first = [i for i, p in enumerate(pids) if i == 0 or pids[i - 1] != p]
    chosen = select_top_k(pids, scores.tolist(), k=1)
    out_sets = {}
    for kind, idx in (("first", first), ("dasd", chosen)):
        path = out / "traces" / f"{name}_{kind}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        ts.subset(idx).save(path)
        g = [grades[i] for i in idx]
        m = ts.loss_mask[idx]
        out_sets[f"{name}_{kind}"] = (
            str(path),
            {
                "rows": len(idx),
                "valid": sum(x.valid for x in g) / len(g),
                "backward_share": sum(x.style == "backward" for x in g) / len(g),
                "forward_share": sum(x.style == "forward" for x in g) / len(g),
                "student_logprob_mean": float(ts.student_lp[idx][m].mean()),
                "teacher_logprob_mean": float(ts.teacher_lp[idx][m].mean()),
            },
        )
    return out_sets


def base_job(run: BenchmarkRun, plan: Plan, task: TaskSets) -> dict:
    """The keys every fine-tuning job shares (``raydc.quality.jobs.run_job``)."""
    P = plan.params
    return dict(
        student_dir=run.student_dir,
        problems=str(run.problems_path),
        lr=P["lr"],
        batch_size=P["batch_size"],
        warmup_steps=P["warmup_steps"],
        student_ref=plan.student_ref,
        max_digits=task.max_digits,
    )


def tune_weights(run: BenchmarkRun, plan: Plan, workers, base: dict) -> None:
    """6. The tune arm: in-process random search over TUNE_SPACE (validated as a raydc
    TuneConfig), one seed per trial at the smallest budget (a third of the cost of the
    largest: on 2 cores the arms' seeds matter more), ranked by greedy accuracy on the
    validation problems (disjoint from the eval problems). Trial seeds are disjoint from
    the arms'."""
    cfg = TuneConfig(
        enabled=True,
        num_samples=plan.params["tune_trials"],
        metric="val_accuracy",
        search_alg="random",
        scheduler="none",
        space=TUNE_SPACE,
    )
    cfg.validate("tune")
    if "tune" not in run.state:
        t0 = time.time()
        trng = random.Random(plan.seed + 77)
        trials: list[dict] = []
        while len(trials) < min(cfg.num_samples, 24):
            t = {k.split(".", 1)[1]: trng.choice(v) for k, v in TUNE_SPACE.items()}
            if t not in trials:
                trials.append(t)
        jobs = [
            dict(
                base,
                tags={"traces": name, "trial": i},
                traces=run.state["traces"]["paths"][f"{name}_first"],
                weights=preset(TUNE_BASE, **t).to_dict(),
                seed=100_000 + i,
                budgets=[plan.budgets[0]],
                eval_set="val",
                full_eval=False,
            )
            for name in plan.traces
            for i, t in enumerate(trials)
        ]
        res = [r for rs in workers.map(run_job, jobs) for r in rs]
        tuned, tune_log = {}, {}
        for name in plan.traces:
            rs = [r for r in res if r["traces"] == name]
            best = max(rs, key=lambda r: (r["greedy"]["accuracy"], -r["trial"]))
            tuned[name] = trials[best["trial"]]
            tune_log[name] = [
                {**trials[r["trial"]], "val_accuracy": r["greedy"]["accuracy"]} for r in rs
            ]
        run.save_state(tune={"chosen": tuned, "trials": tune_log, "wall_s": time.time() - t0})
    for name in plan.traces:
        run.log(
            f"tune[{name}]: chose {run.state['tune']['chosen'][name]} from "
            f"{run.state['tune']['trials'][name]}"
        )


def arm_jobs(run: BenchmarkRun, plan: Plan, base: dict) -> tuple[list[dict], int]:
    """7. The arms' fine-tuning jobs not yet in records.jsonl, seed-major (an interrupted
    run has the same seeds done for every arm), and how many were already done."""
    done = set()
    if run.records_path.exists():
        for line in run.records_path.read_text().splitlines():
            r = json.loads(line)
            if r["budget"] == plan.budgets[-1]:
                done.add((r["traces"], r["arm"], r["seed"]))
    jobs = []
    for seed in range(plan.seeds):
        for name in plan.traces:
            for arm in plan.arms:
                if (name, arm, seed) in done:
                    continue
                if arm in PRESET_ARMS:
                    weights, kind = preset(arm).to_dict(), "first"
                elif arm == "dasd_sft":
                    weights, kind = preset("sft").to_dict(), "dasd"
                else:
                    weights = preset(TUNE_BASE, **run.state["tune"]["chosen"][name]).to_dict()
                    kind = "first"
                jobs.append(
                    dict(
                        base,
                        tags={"traces": name, "arm": arm},
                        traces=run.state["traces"]["paths"][f"{name}_{kind}"],
                        weights=weights,
                        seed=seed,
                        budgets=plan.budgets,
                    )
                )
    return jobs, len(done)


def run_arms(run: BenchmarkRun, workers, jobs: list[dict]) -> None:
    """7. The jobs on the worker pool, each one's records appended as it completes."""
    with open(run.records_path, "a") as fh:
        for k, rs in enumerate(workers.imap_unordered(run_job, jobs)):
            for r in rs:
                fh.write(json.dumps(write_json_safe(r)) + "\n")
            fh.flush()
            r = rs[-1]
            run.log(
                f"  [{k + 1}/{len(jobs)}] {r['traces']}/{r['arm']}/seed {r['seed']}: greedy "
                f"{r['greedy']['accuracy']:.3f}, sampled {r['sampled']['accuracy']:.3f} at "
                f"{r['budget']} steps ({r['job_wall_s']:.0f} s)"
            )


def finished_records(run: BenchmarkRun, plan: Plan) -> list[dict]:
    """The records of the plan's seeds, arms, trace sets and budgets (a resumed run's
    records.jsonl may hold more)."""
    records = [json.loads(line) for line in run.records_path.read_text().splitlines()]
    return [
        r
        for r in records
        if r["budget"] in plan.budgets
        and r["arm"] in plan.arms
        and r["traces"] in plan.traces
        and r["seed"] < plan.seeds
    ]
