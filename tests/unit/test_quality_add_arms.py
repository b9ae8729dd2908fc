"""Arms added to a finished quality-benchmark run (jobs/benchmark_quality.py --add-arms,
bench/quality/backfill.py): an offline job's FLOPs replayed from its seed are the ones a
real job counted, records without FLOPs get exactly those, the trace prompts and the
trace sets' per-row costs recomputed for a folder that lacks them are what the current
code stores, and the report keeps the run's figures beside the addition's."""

from __future__ import annotations

import json

import pytest
import torch

from bench.quality import backfill, jobs, steps
from bench.quality.flops import trace_row_flops
from bench.quality.models import count_params, load_model, load_tokenizer
from bench.quality.on_policy import ON_POLICY
from bench.quality.run import BenchmarkRun, Plan
from bench.quality.task import MODELS, REGIMES
from bench.quality.traces import TraceSet, build_trace_set

TEACHER_PARAMS = 3_000_000  # any count: a trace's cost is linear in it


def _trace_set(path, lengths: list[int], student_params: int) -> TraceSet:
    """Rows of a 2-token prompt and a response making each row ``lengths[i]`` tokens,
    with their costs as make_traces stores them."""
    prompts = [[5, 6]] * len(lengths)
    responses = [[7 + i] * (n - 2) for i, n in enumerate(lengths)]
    ts = build_trace_set(prompts, responses)
    ts.meta["row_flops"] = trace_row_flops(ts.lengths.tolist(), student_params, TEACHER_PARAMS)
    ts.save(path)
    return ts


def _job(phases, seed: int, evals: list[int]) -> dict:
    return dict(
        data="data.pt",
        student=str(MODELS / "student"),
        tags={"arm": "sft"},
        phases=phases,
        weights=None,
        batch_size=3,
        lr=1e-3,
        warmup_steps=1,
        student_ref="current",
        evals=evals,
        seed=seed,
    )


def test_replayed_draws_and_flops_are_a_real_jobs(tmp_path, monkeypatch):
    student = load_model(MODELS / "student")
    Ps = count_params(student)
    a = _trace_set(tmp_path / "a.pt", [4, 6, 9, 5, 7], Ps)
    b = _trace_set(tmp_path / "b.pt", [8, 3, 10], Ps)
    job = _job([(str(tmp_path / "a.pt"), 3), (str(tmp_path / "b.pt"), 2)], seed=7, evals=[1, 3, 5])
    drawn: list[list[int]] = []
    collate = jobs.collate

    def spy(block, rows, **kw):
        drawn.append(list(rows))
        return collate(block, rows, **kw)

    monkeypatch.setattr(jobs, "collate", spy)
    monkeypatch.setattr(jobs, "load_model", lambda path: student)
    monkeypatch.setattr(
        jobs,
        "measure",
        lambda model, job, step: {**job["tags"], "seed": job["seed"], "step": step, "eval_s": 0.0},
    )
    records = jobs.run_arm(job)
    real_draws, drawn[:] = list(drawn), []

    # The draws: one generator seeded with the job's seed, one randint per step.
    g = torch.Generator().manual_seed(7)
    sizes = [5, 5, 5, 3, 3]
    expected = [torch.randint(0, n, (3,), generator=g).tolist() for n in sizes]
    assert real_draws == expected

    # The FLOPs by hand: training 6 x Ps per token of every drawn row; a trace's cost
    # (teacher generation and scoring 2 x Pt per token each, student scoring 2 x Ps) the
    # first time its set's draws reach it. Measured before step k + 1's draw.
    def by_hand(k: int) -> dict:
        parts = dict.fromkeys(("generation", "student_scoring", "teacher_scoring", "training"), 0)
        seen: dict[int, set] = {0: set(), 1: set()}
        for i, rows in enumerate(expected[:k]):
            which, ts = (0, a) if i < 3 else (1, b)
            lens = ts.lengths.tolist()
            parts["training"] += 6 * Ps * sum(lens[r] for r in rows)
            for r in set(rows) - seen[which]:
                parts["generation"] += 2 * TEACHER_PARAMS * lens[r]
                parts["teacher_scoring"] += 2 * TEACHER_PARAMS * lens[r]
                parts["student_scoring"] += 2 * Ps * lens[r]
            seen[which] |= set(rows)
        return {"flops": sum(parts.values()), "flops_parts": parts}

    assert [r["step"] for r in records] == [1, 3, 5]
    for r in records:
        assert {k: r[k] for k in ("flops", "flops_parts")} == by_hand(r["step"])

    # The replay: the same draws, the same FLOPs, no training.
    replay = jobs.replay_flops(job, Ps)
    assert drawn == expected
    assert replay == {r["step"]: {k: r[k] for k in ("flops", "flops_parts")} for r in records}

    # Records without FLOPs (a run from before they were counted) get exactly those; the
    # initial student's get 0; records that have them, and on-policy jobs, are left.
    def job_of(arm, seed):
        if arm == "initial":
            return {**job, "phases": [], "evals": [0], "seed": seed}
        if arm == "opd":
            return {**job, "phases": [(ON_POLICY, 5)], "seed": seed}
        return job

    stripped = [{k: v for k, v in r.items() if k not in ("flops", "flops_parts")} for r in records]
    init = {"arm": "initial", "seed": 7, "step": 0}
    opd_new = {"arm": "opd", "seed": 7, "step": 5, "flops": 9, "flops_parts": {}}
    opd_old = {"arm": "opd", "seed": 8, "step": 5}
    filled, summary = backfill.backfill_records([init, *stripped, opd_new, opd_old], job_of, Ps)
    assert filled[1:4] == records and filled[4] is opd_new and filled[5] is opd_old
    zero = dict.fromkeys(("generation", "student_scoring", "teacher_scoring", "training"), 0)
    assert filled[0] == {**init, "flops": 0, "flops_parts": zero}
    assert summary["per_arm"] == {"initial": 1, "sft": 3} and summary["left_without"] == {"opd": 1}

    # A job drawing from a set whose per-row costs are unknown is left without FLOPs.
    unpriced = {str(tmp_path / "b.pt")}
    kept, summary = backfill.backfill_records(stripped, job_of, Ps, unpriced)
    assert kept == stripped and summary["left_without"] == {"sft": 3}

    with pytest.raises(ValueError, match="ON_POLICY"):
        jobs.replay_flops({**job, "phases": [(ON_POLICY, 2)]}, Ps)
    with pytest.raises(ValueError, match="measures at"):
        backfill.backfill_records([{"arm": "sft", "seed": 7, "step": 2}], job_of, Ps)


TINY = dict(
    eval_n=3,
    val_n=2,
    prior_n=2,
    trace_prompts=6,
    candidates=2,
    lr=1e-3,
    batch_size=4,
    warmup_steps=1,
)


@pytest.fixture(scope="module")
def new_folder(tmp_path_factory):
    """make_data and make_traces of the current code on a few prompts (the shipped pair)."""
    run = BenchmarkRun(tmp_path_factory.mktemp("run"))
    task = steps.make_data(run, TINY, REGIMES["knowledge"])
    steps.make_traces(run, TINY, task)
    return run, task


def test_trace_costs_and_prompts_recomputed_are_what_the_current_code_stores(new_folder):
    run, task = new_folder
    data = torch.load(run.data_path, weights_only=False)
    sets = {n: TraceSet.load(run.trace_path(n)) for n in backfill.TRACE_SETS}
    Ps = count_params(load_model(MODELS / "student"))
    Pt = count_params(task["teacher"])

    # The trace prompts drawn again, checked against data.pt and every trace row.
    tok = load_tokenizer()
    regime = REGIMES["knowledge"]
    assert backfill.recover_trace_prompts(data, TINY, regime, tok, sets) == data["trace_prompts"]
    with pytest.raises(ValueError, match="val_view.eval_prompts"):
        backfill.recover_trace_prompts(data, {**TINY, "val_n": 3}, regime, tok, sets)
    other = [list(p) for p in data["trace_prompts"]]
    other[2] = other[2][:-1] + [other[2][-1] + 1]
    with pytest.raises(ValueError, match="row 2"):
        backfill.check_trace_prompts(other, {"t10": sets["t10"]})

    # Per-row costs: t10's and t06's from the rows' lengths, dasd's from the candidates
    # sampled again; each the list make_traces stored.
    for name in ("t10", "t06"):
        ts = sets[name]
        assert trace_row_flops(ts.lengths.tolist(), Ps, Pt) == ts.meta["row_flops"]
    cands = backfill.sample_candidates(
        task["teacher"], data["trace_prompts"], data["eos"], regime.max_new_tokens, 2
    )
    checked = backfill.check_candidates(cands, sets["t10"], sets["dasd"])
    assert checked["t10_rows"] == TINY["trace_prompts"]
    dasd = sets["dasd"]
    costs = backfill.dasd_row_flops(dasd, data["trace_prompts"], cands, Ps, Pt)
    assert costs == dasd.meta["row_flops"]
    # Candidates that are not the run's are refused.
    with pytest.raises(ValueError, match="t10 row"):
        backfill.check_candidates([cands[1], cands[0]], sets["t10"], dasd)


def test_a_folder_without_prompts_costs_and_flops_is_brought_up_to_date(new_folder, tmp_path):
    """upgrade() on a copy of a new folder stripped to the old format restores it."""
    import shutil

    run0, _ = new_folder
    shutil.copytree(run0.out, tmp_path / "r", dirs_exist_ok=True)
    run = BenchmarkRun(tmp_path / "r", resume=True)
    regime = REGIMES["knowledge"]
    plan = Plan(regime, TINY, [1, 2], ["sft", "dasd_sft", "stages_sft"], 1, 1, 60.0, 0)
    Ps = count_params(load_model(regime.student))
    job = backfill.job_of(run, plan, {})
    zero = dict.fromkeys(("generation", "student_scoring", "teacher_scoring", "training"), 0)
    records = [{"arm": "initial", "seed": 0, "step": 0, "flops": 0, "flops_parts": zero}]
    for arm in plan.arms:
        replay = jobs.replay_flops(job(arm, 0), Ps)
        records += [{"arm": arm, "seed": 0, "step": s, **f} for s, f in replay.items()]
    full = {n: TraceSet.load(run.trace_path(n)) for n in backfill.TRACE_SETS}
    data = torch.load(run.data_path, weights_only=False)
    # The old format: no trace prompts, no per-row costs, no FLOPs.
    del data["trace_prompts"]
    torch.save(data, run.data_path)
    for name, ts in full.items():
        old = TraceSet(**{**ts.__dict__, "meta": {}})
        old.save(run.trace_path(name))
    run.rewrite_records(
        [{k: v for k, v in r.items() if k not in ("flops", "flops_parts")} for r in records]
    )
    up = backfill.upgrade(run, plan, {}, {})
    again = torch.load(run.data_path, weights_only=False)
    assert again["trace_prompts"] == torch.load(run0.data_path, weights_only=False)["trace_prompts"]
    for name, ts in full.items():
        assert TraceSet.load(run.trace_path(name)).meta["row_flops"] == ts.meta["row_flops"]
    assert run.records() == json.loads(json.dumps(records))
    assert up["params"]["student"] == Ps
    assert set(up["backfill"]) >= {"trace_prompts", "trace_costs", "records"}
    assert (run.out / "records.before_backfill.jsonl").is_file()
    # A second upgrade has nothing left to do.
    assert backfill.upgrade(run, plan, {"params": up["params"]}, {})["backfill"] == {}


def _record(arm: str, seed: int, step: int, acc: float, flops: int | None) -> dict:
    gen = {"accuracy": acc, "derailed": 0.0, "lines_error_sd": 0.0}
    r = {
        "arm": arm,
        "seed": seed,
        "step": step,
        "greedy": gen,
        "sampled": gen,
        "prior_accuracy": 1.0,
        "teacher_forced": {"predicted_accuracy": acc},
        "exposure_gap": 0.0,
        "exacc_err": {"16": 1.0, "32": None},
        "length_mean": 20.0,
        "train": {"weight_hist": [1] * 40, "wall_s": 1.0, "eval_s": 0.5, "loss": [1.0]},
    }
    return r if flops is None else {**r, "flops": flops, "flops_parts": {"training": flops}}


def test_the_report_keeps_the_run_and_lists_the_addition(tmp_path):
    from bench.quality import report

    regime = REGIMES["knowledge"]
    plan = Plan(regime, TINY, [2, 4], ["sft", "dft"], 2, 2, 60.0, 0)
    run = BenchmarkRun(tmp_path)
    run.append([_record("initial", s, 0, 0.2, None) for s in (0, 1)])
    for arm, acc in (("sft", 0.8), ("dft", 0.4)):
        run.append([_record(arm, s, k, acc, None) for s in (0, 1) for k in (2, 4)])
    load = {"samples": 3, "contended": False, "load1_mean": 1.0}
    res = report.build_results(run, plan, load, {"start": 0.0, "setup_s": 5.0}, "python x")
    res["chosen"] = {"best": "dft", "risky": "dft", "means": {"dft": 0.4}}
    (tmp_path / "results.json").write_text(json.dumps(res))
    assert backfill.plan_of(json.loads(json.dumps(res)), regime) == plan
    assert backfill.chosen_of(res) == {"best": "dft", "risky": "dft"}
    with pytest.raises(ValueError, match="steps=100, the current definition"):
        backfill.plan_of({**res, "regime": {**res["regime"], "steps": 100}}, regime)
    with pytest.raises(ValueError, match="is not the regime's"):
        backfill.plan_of({**res, "regime": {**res["regime"], "teacher": "/x/other"}}, regime)

    # The backfilled records (FLOPs), then the added arm's.
    run.rewrite_records([{**r, "flops": 10 * r["step"]} for r in run.records()])
    run.append([_record("opd", s, k, 0.9, 100 * k) for s in (0, 1) for k in (2, 4)])
    added = {
        "arms": ["opd"],
        "jobs": [{"arm": "opd", "seed": 0}, {"arm": "opd", "seed": 1}],
        "skipped": [],
        "command": "python jobs/benchmark_quality.py --add-arms opd",
        "finished": "2026-12-06 16:00 UTC",
        "wall_s": 120.0,
        "load": {"samples": 5, "load1_mean": 2.0, "contended": True},
    }
    note = {"records": {"records": 10, "per_arm": {"initial": 2, "sft": 4, "dft": 4}}}
    upgrade = {"params": {"student": 1, "teacher": 2}, "backfill": note}
    out = report.write_added(run, res, upgrade, added, str(tmp_path / "docs"))
    kept = ("command", "finished", "plan", "timings", "wall_s", "load", "chosen", "regime")
    assert {k: out[k] for k in kept} == {k: res[k] for k in kept}
    assert out["arms"] == ["sft", "dft", "opd"] and out["seeds_per_arm"]["opd"] == 2
    assert out["added"] == [{**added, "backfill": note}] and out["params"]["teacher"] == 2
    final = {r["arm"]: r for r in out["rows"] if r["step"] == 4}
    assert final["opd"]["greedy_acc"] == pytest.approx(0.9) and final["sft"]["flops"] == 40
    assert json.loads((tmp_path / "results.json").read_text()) == out
    md = (tmp_path / "table.md").read_text()
    assert (
        "- Added later: `opd` (2 jobs) by `python jobs/benchmark_quality.py --add-arms opd`" in md
    )
    assert "10 records (initial 2, sft 4, dft 4) got them by replaying" in md
    assert (tmp_path / "docs" / "results" / "knowledge.md").read_text() == md


def test_dasd_rows_picked_from_a_later_candidate_are_checked_and_priced():
    prompts = [[5, 6], [5, 6, 7]]
    cands = [[[8, 1], [9, 9, 1]], [[8, 8, 8, 1], [9, 1]]]  # candidate k of prompt i
    t10 = build_trace_set(prompts, cands[0], prompt_ids=[0, 1])
    # DASD picked candidate 1 for prompt 0, candidate 0 for prompt 1 (rows in pick order).
    dasd = build_trace_set([prompts[1], prompts[0]], [cands[0][1], cands[1][0]], prompt_ids=[1, 0])
    assert backfill.check_candidates(cands, t10, dasd) == {
        "t10_rows": 2,
        "dasd_rows_from_a_later_candidate": 1,
    }
    # Each dasd row costs both candidates of its prompt: prompt 1's rows are 3 + 3 and
    # 3 + 2 tokens, prompt 0's 2 + 2 and 2 + 4.
    costs = backfill.dasd_row_flops(dasd, prompts, cands, student_params=10, teacher_params=100)
    assert costs["generation"] == [2 * 100 * (6 + 5), 2 * 100 * (4 + 6)]
    assert costs["student_scoring"] == [2 * 10 * (6 + 5), 2 * 10 * (4 + 6)]
    wrong = build_trace_set([prompts[0]], [[9, 9, 9, 1]], prompt_ids=[0])
    with pytest.raises(ValueError, match="dasd row 0 .prompt 0. is none of its candidates"):
        backfill.check_candidates(cands, t10, wrong)
