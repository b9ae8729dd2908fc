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

Usage:
  python jobs/benchmark_quality.py --out runs/quality            # the full benchmark
  python jobs/benchmark_quality.py --out /tmp/q --quick          # a smoke run (~2 min)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import sys
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from raydc import quality as q  # noqa: E402
from raydc.config import TuneConfig  # noqa: E402
from raydc.models import offline_env  # noqa: E402
from raydc.select import divergence_scores, select_top_k  # noqa: E402
from raydc.weights import preset  # noqa: E402

ARMS = ["sft", "dft", "discord", "das_token", "iw_seq", "tis", "dasd_sft", "tune"]
PRESET_ARMS = ["sft", "dft", "discord", "das_token", "iw_seq", "tis"]

# The search space, in the library's Tune conventions (dotted config fields), around the
# discord preset: the direction (sign), the temperature and the floor.
TUNE_BASE = "discord"
TUNE_SPACE = {
    "weights.sign": [1, -1],
    "weights.tau": [0.5, 1.0, 2.0, 4.0],
    "weights.floor": [0.0, 0.1, 0.3],
}

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
TEACHER_LENGTHS = (8, 14)  # the task the teacher knows and the benchmark evaluates
STUDENT_LENGTHS = (3, 10)  # the student's prior: shorter lists, its own style


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--seeds", type=int, default=8, help="seeds per arm")
    ap.add_argument("--budgets", default="50,120", help="fine-tuning step budgets")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--traces", default="clean,noisy")
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


def main() -> None:
    args = parse_args()
    offline_env()
    torch.set_num_threads(args.threads)
    P = dict(QUICK if args.quick else FULL)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    arms = [a for a in args.arms.split(",") if a]
    trace_names = [t for t in args.traces.split(",") if t]
    unknown = sorted(set(arms) - set(ARMS)) + sorted(set(trace_names) - {"clean", "noisy"})
    if unknown:
        sys.exit(f"unknown arms/traces {unknown}; arms: {ARMS}; traces: clean, noisy")
    out = q.ensure_dir(args.out)
    logf = open(out / "log.txt", "w")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    # Finished stages are recorded in state.json and each fine-tuning run's records in
    # records.jsonl as it completes, so --resume continues an interrupted run and a report
    # can always be written from what finished.
    state_path, records_path = out / "state.json", out / "records.jsonl"
    state = json.loads(state_path.read_text()) if args.resume and state_path.exists() else {}
    if not args.resume and records_path.exists():
        records_path.unlink()

    def save_state(**kv) -> None:
        state.update(kv)
        state_path.write_text(json.dumps(q.write_json_safe(state), indent=1))

    monitor = q.LoadMonitor().start()
    t_start = time.time()
    timings: dict[str, float] = {}
    rng = random.Random(args.seed)
    log(f"params {P}; budgets {budgets}; seeds {args.seeds}; arms {arms}; traces {trace_names}")

    # 1. The task --------------------------------------------------------------------------
    eval_problems = q.make_problems(P["eval_n"], random.Random(10_001), TEACHER_LENGTHS)
    val_problems = q.make_problems(P["val_n"], random.Random(10_002), TEACHER_LENGTHS)
    side_problems = q.make_problems(P["side_n"], random.Random(10_003), STUDENT_LENGTHS, "D")
    trace_problems = q.make_problems(P["trace_prompts"], random.Random(10_004), TEACHER_LENGTHS)
    problems_path = out / "problems.pt"
    torch.save({"eval": eval_problems, "val": val_problems, "side": side_problems}, problems_path)
    max_digits = TEACHER_LENGTHS[1]

    # 2-3. The teacher (here) and the student's own prior (in a worker) train side by side,
    # one core each. A student pre-trained by an earlier invocation (student_state.json,
    # written by pretrain_student_job) is reused.
    ctx = mp.get_context("spawn")
    workers = ctx.Pool(args.workers, initializer=q.worker_init, initargs=(1,))
    student_dir = str(out / "models" / "student_init")
    student_file = out / "student_state.json"
    if "student" not in state and student_file.exists():
        save_state(student=json.loads(student_file.read_text()))
    student_async = None
    if "student" not in state:
        student_async = workers.apply_async(
            q.pretrain_student_job,
            (
                dict(
                    dir=student_dir,
                    seed=args.seed,
                    pool=P["student_pool"],
                    lengths=list(STUDENT_LENGTHS),
                    side_share=P["side_share"],
                    steps=P["student_steps"],
                    batch_size=P["student_batch"],
                    lr=P["student_lr"],
                    problems=str(problems_path),
                    eval_lengths_max=max_digits,
                ),
            ),
        )
    teacher_dir = str(out / "models" / "teacher")
    if "teacher" not in state:
        t0 = time.time()
        # One thread while the student trains on the other core: two threads here would
        # oversubscribe the two cores and slow both.
        torch.set_num_threads(1 if student_async is not None else args.threads)
        pool = q.make_problems(P["teacher_pool"], rng, TEACHER_LENGTHS)
        styles = [
            "backward" if rng.random() < P["teacher_backward_share"] else "forward" for _ in pool
        ]
        teacher = q.build_model(q.TEACHER_SIZE, seed=args.seed)
        spec = q.TrainSpec(
            P["teacher_steps"], P["pretrain_batch"], P["pretrain_lr"], seed=args.seed, decay=True
        )
        info = q.train(teacher, q.examples_to_trace_set(pool, styles), spec, log=log)
        q.save_model(teacher, teacher_dir)
        ev = q.evaluate(teacher, eval_problems, side_problems, args.seed, max_digits)
        save_state(teacher={"train": info, "eval": ev, "wall_s": time.time() - t0})
    teacher = q.load_model(teacher_dir)
    ev = state["teacher"]["eval"]
    log(
        f"teacher: {q.count_params(teacher)} params, {state['teacher']['wall_s']:.0f} s; "
        f"greedy {ev['greedy']['accuracy']:.3f}, sampled {ev['sampled']['accuracy']:.3f}, "
        f"backward share (sampled) {ev['sampled']['backward_share']:.2f}"
    )

    if student_async is not None:
        save_state(student=student_async.get())
    torch.set_num_threads(args.threads)
    student = q.load_model(student_dir)
    st = state["student"]
    log(
        f"student: {q.count_params(student)} params, {st['wall_s']:.0f} s; own lengths greedy "
        f"{st['own_lengths']['greedy']['accuracy']:.3f}; eval task greedy "
        f"{st['eval']['greedy']['accuracy']:.3f}; side task {st['eval']['side_accuracy']:.3f}"
    )

    # 4. Offline teacher traces with vLLM; 5. scores under the initial student, DASD ------
    if "traces" not in state:
        t0 = time.time()
        prompts = [q.encode(p.prompt) for p in trace_problems]
        samples = q.sample_with_vllm(
            teacher_dir,
            prompts,
            n=P["candidates"],
            temperatures=P["temperatures"],
            max_tokens=q.max_new_tokens_for(max_digits),
            seed=args.seed,
        )
        sampling_s = time.time() - t0
        # The stored log-probs must be the teacher's: re-score some with transformers.
        lp_check = {str(t): q.check_vllm_logprobs(teacher, prompts, samples[t]) for t in samples}
        paths, stats = {}, {}
        for name, temp in (("clean", P["temperatures"][0]), ("noisy", P["temperatures"][1])):
            rows_p, rows_r, rows_lp, pids, grades = [], [], [], [], []
            for i, cands in enumerate(samples[temp]):
                for ids, lps in cands:
                    rows_p.append(prompts[i])
                    rows_r.append(ids)
                    rows_lp.append(lps)
                    pids.append(i)
                    grades.append(q.grade(trace_problems[i], q.decode(ids)))
            ts = q.build_trace_set(rows_p, rows_r, rows_lp, pids)
            ts.student_lp = q.score_traces(student, ts)
            scores = divergence_scores(ts.student_lp, ts.teacher_lp, ts.sentence_ids, ts.loss_mask)
            # "first": one candidate per prompt, as sampled (what every non-DASD arm trains
            # on); "dasd": the candidate with the best divergence score of each prompt.
            first = [i for i, p in enumerate(pids) if i == 0 or pids[i - 1] != p]
            chosen = select_top_k(pids, scores.tolist(), k=1)
            for kind, idx in (("first", first), ("dasd", chosen)):
                path = out / "traces" / f"{name}_{kind}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                ts.subset(idx).save(path)
                paths[f"{name}_{kind}"] = str(path)
                g = [grades[i] for i in idx]
                m = ts.loss_mask[idx]
                stats[f"{name}_{kind}"] = {
                    "temperature": temp,
                    "rows": len(idx),
                    "valid": sum(x.valid for x in g) / len(g),
                    "backward_share": sum(x.style == "backward" for x in g) / len(g),
                    "forward_share": sum(x.style == "forward" for x in g) / len(g),
                    "student_logprob_mean": float(ts.student_lp[idx][m].mean()),
                    "teacher_logprob_mean": float(ts.teacher_lp[idx][m].mean()),
                }
        save_state(
            traces={
                "paths": paths,
                "stats": stats,
                "vllm_logprob_check_max_abs": lp_check,
                "sampling_s": sampling_s,
                "wall_s": time.time() - t0,
            }
        )
    tr = state["traces"]
    log(
        f"vLLM sampled {P['trace_prompts']} prompts x {P['candidates']} x "
        f"{len(P['temperatures'])} temperatures in {tr['sampling_s']:.0f} s; max |vLLM - "
        f"transformers| log-prob {tr['vllm_logprob_check_max_abs']}"
    )
    for k, v in tr["stats"].items():
        log(f"traces {k}: {v}")
    del teacher, student

    base_job = dict(
        student_dir=student_dir,
        problems=str(problems_path),
        lr=P["lr"],
        batch_size=P["batch_size"],
        warmup_steps=P["warmup_steps"],
        student_ref=args.student_ref,
        max_digits=max_digits,
    )

    # 6. The tune arm: a small search on the validation split --------------------------------
    # In-process random search over TUNE_SPACE (validated as a raydc TuneConfig), one seed
    # per trial at the smallest budget (a third of the cost of the largest: on 2 cores the
    # arms' seeds matter more), ranked by greedy accuracy on the validation
    # problems (disjoint from the eval problems). Trial seeds are disjoint from the arms'.
    tune_cfg = TuneConfig(
        enabled=True,
        num_samples=P["tune_trials"],
        metric="val_accuracy",
        search_alg="random",
        scheduler="none",
        space=TUNE_SPACE,
    )
    tune_cfg.validate("tune")
    if "tune" in arms and "tune" not in state:
        t0 = time.time()
        trng = random.Random(args.seed + 77)
        trials: list[dict] = []
        while len(trials) < min(tune_cfg.num_samples, 24):
            t = {k.split(".", 1)[1]: trng.choice(v) for k, v in TUNE_SPACE.items()}
            if t not in trials:
                trials.append(t)
        jobs = [
            dict(
                base_job,
                tags={"traces": name, "trial": i},
                traces=state["traces"]["paths"][f"{name}_first"],
                weights=preset(TUNE_BASE, **t).to_dict(),
                seed=100_000 + i,
                budgets=[budgets[0]],
                eval_set="val",
                full_eval=False,
            )
            for name in trace_names
            for i, t in enumerate(trials)
        ]
        res = [r for rs in workers.map(q.run_job, jobs) for r in rs]
        tuned, tune_log = {}, {}
        for name in trace_names:
            rs = [r for r in res if r["traces"] == name]
            best = max(rs, key=lambda r: (r["greedy"]["accuracy"], -r["trial"]))
            tuned[name] = trials[best["trial"]]
            tune_log[name] = [
                {**trials[r["trial"]], "val_accuracy": r["greedy"]["accuracy"]} for r in rs
            ]
        save_state(tune={"chosen": tuned, "trials": tune_log, "wall_s": time.time() - t0})
    if "tune" in arms:
        for name in trace_names:
            log(
                f"tune[{name}]: chose {state['tune']['chosen'][name]} from "
                f"{state['tune']['trials'][name]}"
            )

    # 7. The arms ---------------------------------------------------------------------------
    t0 = time.time()
    done = set()
    if records_path.exists():
        for line in records_path.read_text().splitlines():
            r = json.loads(line)
            if r["budget"] == budgets[-1]:
                done.add((r["traces"], r["arm"], r["seed"]))
    jobs = []
    # Seed-major order: an interrupted run has the same seeds done for every arm.
    for seed in range(args.seeds):
        for name in trace_names:
            for arm in arms:
                if (name, arm, seed) in done:
                    continue
                if arm in PRESET_ARMS:
                    weights, kind = preset(arm).to_dict(), "first"
                elif arm == "dasd_sft":
                    weights, kind = preset("sft").to_dict(), "dasd"
                else:
                    weights = preset(TUNE_BASE, **state["tune"]["chosen"][name]).to_dict()
                    kind = "first"
                jobs.append(
                    dict(
                        base_job,
                        tags={"traces": name, "arm": arm},
                        traces=state["traces"]["paths"][f"{name}_{kind}"],
                        weights=weights,
                        seed=seed,
                        budgets=budgets,
                    )
                )
    log(f"running {len(jobs)} fine-tuning runs on {args.workers} workers ({len(done)} done)")
    with open(records_path, "a") as fh:
        for k, rs in enumerate(workers.imap_unordered(q.run_job, jobs)):
            for r in rs:
                fh.write(json.dumps(q.write_json_safe(r)) + "\n")
            fh.flush()
            r = rs[-1]
            log(
                f"  [{k + 1}/{len(jobs)}] {r['traces']}/{r['arm']}/seed {r['seed']}: greedy "
                f"{r['greedy']['accuracy']:.3f}, sampled {r['sampled']['accuracy']:.3f} at "
                f"{r['budget']} steps ({r['job_wall_s']:.0f} s)"
            )
    workers.close()
    workers.join()
    timings["arms_s"] = time.time() - t0
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    # Only the requested seeds, arms and budgets (a resumed run may hold more).
    records = [
        r
        for r in records
        if r["budget"] in budgets
        and r["arm"] in arms
        and r["traces"] in trace_names
        and r["seed"] < args.seeds
    ]

    # 8. The report -------------------------------------------------------------------------
    timings["total_s"] = time.time() - t_start
    load = monitor.stop()
    # One entry per invocation: a resumed run reports the load of every part it ran in.
    sessions = state.get("sessions", []) + [
        {
            "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_start)),
            "timings_s": timings,
            "load": load,
            "fine_tuning_runs": len(jobs),
        }
    ]
    save_state(sessions=sessions)
    contended = any(s_["load"].get("contended") for s_ in sessions)
    rows = q.aggregate(records)
    table = q.markdown_table(rows, arms)
    q.plot(rows, arms, out / "results.png")
    (out / "table.md").write_text(table)
    (out / "load.json").write_text(
        json.dumps(q.write_json_safe({"summary": load, "samples": monitor.samples}), indent=1)
    )
    results = {
        "command": " ".join(["python", *sys.argv]),
        "params": P,
        "budgets": budgets,
        "seeds": args.seeds,
        "arms": arms,
        "student_ref": args.student_ref,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "contended": contended,
        "sessions": sessions,
        "models": {
            "teacher_params": q.count_params(q.load_model(teacher_dir)),
            "student_params": q.count_params(q.load_model(student_dir)),
        },
        "teacher": state["teacher"],
        "student_init": state["student"],
        "traces": state["traces"],
        "tune": {"space": TUNE_SPACE, "base": TUNE_BASE, **state.get("tune", {})},
        "rows": rows,
        "records": records,
    }
    (out / "results.json").write_text(json.dumps(q.write_json_safe(results), indent=1))
    label = "CONTENDED" if contended else "uncontended"
    log(
        f"done in {timings['total_s']:.0f} s ({label}: foreign CPU "
        f"{load.get('foreign_cores_mean', float('nan')):.2f} cores, load1 mean "
        f"{load.get('load1_mean', float('nan')):.1f})\n{table}"
    )


if __name__ == "__main__":
    main()
