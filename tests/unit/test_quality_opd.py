"""The quality benchmark's on-policy arms and FLOPs (issue 32): the FLOPs arithmetic by
hand, a round on hand-built bigram models (truncated samples dropped and counted, the
sampling log-probs kept, training moving the student toward the teacher in reverse KL),
a whole job's FLOPs at its eval steps, and the matched-FLOPs view of the report."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bench.quality import jobs
from bench.quality.evaluate import generate
from bench.quality.finetune import TrainSpec, train_steps
from bench.quality.flops import FlopCount, TraceCost, sum_row_flops, trace_row_flops
from bench.quality.models import count_params
from bench.quality.on_policy import ON_POLICY, PromptCycle, round_rows, sample_round
from bench.quality.task import PAD
from bench.quality.traces import build_trace_set, model_token_logprobs
from raydc.method.opd import OnPolicyGuardError
from raydc.method.weights import preset
from raydc.train.batch import collate

EOS, A, B, C = 1, 2, 3, 4  # token ids of the bigram models (0 is PAD; 5 unused)
V = 6


class Bigram(torch.nn.Module):
    """A hand-built language model whose next-token logits depend only on the last token:
    ``logits[prev] = table[prev]`` through a ``width``-wide embedding (identity on the first
    V dimensions) and LM head. It answers both ``generate`` (HF-style call, a KV cache that
    only needs the last token) and ``model_token_logprobs`` (``.model``, ``.lm_head``)."""

    def __init__(self, table: torch.Tensor, width: int = V):
        super().__init__()
        self.embed = torch.nn.Embedding(V, width)
        self.lm_head = torch.nn.Linear(width, V, bias=False)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[:, :V] = torch.eye(V)
            self.lm_head.weight.zero_()
            self.lm_head.weight[:, :V] = table.T
        self.model = lambda input_ids: SimpleNamespace(last_hidden_state=self.embed(input_ids))

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        return SimpleNamespace(logits=self.lm_head(self.embed(input_ids)), past_key_values=None)

    def next_logprobs(self, prev: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(self.forward(torch.tensor([[prev]])).logits[0, -1], -1)


def _table(rows: dict[int, dict[int, float]]) -> torch.Tensor:
    """Logits: -30 everywhere but the given (prev -> {next: logit})."""
    t = torch.full((V, V), -30.0)
    for prev, nxt in rows.items():
        for tok, logit in nxt.items():
            t[prev, tok] = logit
    return t


def test_flops_of_traces_and_training_by_hand():
    # Rows of 10 and 20 tokens; student 100 params, teacher 300: a forward is 2 x params
    # per token, so generation (teacher) 6,000 and 12,000, teacher scoring the same,
    # student scoring 2,000 and 4,000.
    rf = trace_row_flops([10, 20], student_params=100, teacher_params=300)
    assert rf == {
        "generation": [6000, 12000],
        "student_scoring": [2000, 4000],
        "teacher_scoring": [6000, 12000],
    }
    # A DASD pick carries every candidate of its prompt: row i summed over the sets.
    other = trace_row_flops([5, 5], 100, 300)
    assert sum_row_flops([rf, other])["generation"] == [9000, 15000]
    # A trace is paid the first time it is drawn.
    paid = TraceCost(rf)
    row1 = {"generation": 12000, "student_scoring": 4000, "teacher_scoring": 12000}
    assert paid.draw([1, 1, 1]) == row1
    assert paid.draw([1, 0]) == {k: v // 2 for k, v in row1.items()}
    assert paid.draw([0, 1]) == dict.fromkeys(rf, 0)
    assert TraceCost(None).draw([0]) == dict.fromkeys(rf, 0)
    # Training: 6 x student params per trained token.
    fc = FlopCount(student_params=100)
    fc.train(50)
    fc.add({"generation": 7, "teacher_scoring": 11, "total": 18})
    assert fc.parts["training"] == 30_000 and fc.total == 30_018
    assert fc.record() == {
        "flops": 30_018,
        "flops_parts": {
            "generation": 7,
            "student_scoring": 0,
            "teacher_scoring": 11,
            "training": 30_000,
        },
    }


def test_sampled_logprobs_are_the_models_own():
    torch.manual_seed(0)
    model = Bigram(torch.randn(V, V))
    prompts = [[A], [B, A], [C]]
    outs, lps = generate(model, prompts, EOS, max_new_tokens=5, temperature=1.0, with_logprobs=True)
    assert [len(o) for o in outs] == [len(x) for x in lps]
    assert outs == generate(model, prompts, EOS, max_new_tokens=5, temperature=1.0)
    ts = build_trace_set(prompts, outs, student_lps=lps)
    with torch.no_grad():
        forward = model_token_logprobs(model, ts.ids_BL)
    m = ts.loss_mask
    assert torch.allclose(ts.student_lp[m], forward[m], atol=1e-5)


def test_a_round_drops_and_counts_truncated_samples_and_prices_itself():
    # After A the student says B or C (even odds); B ends (EOS), C repeats itself forever:
    # with a budget of 4 tokens every C answer is truncated.
    student = Bigram(_table({A: {B: 0.0, C: 0.0}, B: {EOS: 0.0}, C: {C: 0.0}}))
    teacher = Bigram(_table({A: {B: 0.0}, B: {EOS: 0.0}, C: {EOS: 0.0}}), width=8)
    Ps, Pt = count_params(student), count_params(teacher)
    assert (Ps, Pt) == (2 * V * V, 2 * V * 8)
    prompts = [[A]] * 40
    rnd = sample_round(student, teacher, prompts, EOS, 4, 3, student_params=Ps, teacher_params=Pt)
    outs = generate(student, prompts, EOS, max_new_tokens=4, temperature=1.0, seed=3)
    stopped = [o for o in outs if o[-1] == EOS]
    assert all(o == [B, EOS] for o in stopped) and 0 < len(stopped) < 40
    s = rnd.stats
    assert s["samples"] == 40 and s["kept"] == len(stopped) == len(rnd.ts)
    assert s["truncated"] == 40 - len(stopped) and s["eos_rate"] == len(stopped) / 40
    assert rnd.ts.ids_BL[:, :3].tolist() == [[A, B, EOS]] * len(stopped)
    # Kept rows: the student's log-probs of B (log 1/2) and EOS (0); the teacher's ~0.
    m = rnd.ts.loss_mask
    assert torch.allclose(rnd.ts.student_lp[m].view(-1, 2)[:, 0], torch.tensor(math.log(0.5)))
    assert rnd.ts.teacher_lp[m].abs().max() < 1e-6
    assert s["mean_reverse_kl"] == pytest.approx(math.log(0.5) / 2, abs=1e-5)
    # FLOPs: generation of all 40 (1 prompt token + 2 or 4 answer tokens) by the student,
    # the teacher's forward of the kept rows (3 tokens each); nothing else.
    gen_tokens = len(stopped) * 3 + (40 - len(stopped)) * 5
    assert rnd.flops["generation"] == 2 * Ps * gen_tokens
    assert rnd.flops["teacher_scoring"] == 2 * Pt * 3 * len(stopped)
    assert rnd.flops["student_scoring"] == rnd.flops["training"] == 0
    # A student that never ends leaves nothing to train on.
    never = Bigram(_table({A: {C: 0.0}, C: {C: 0.0}}))
    with pytest.raises(OnPolicyGuardError, match="max_new_tokens=4: nothing to train on"):
        sample_round(never, teacher, prompts, EOS, 4, seed=0, student_params=Ps, teacher_params=Pt)


def test_an_opd_round_moves_the_student_toward_the_teacher_in_reverse_kl():
    # After A the student says B or C at even odds, the teacher B at 98%: the OPD weight
    # (log p_T - log p_samp) is > 0 on B and < 0 on C, so p_S(B | A) must rise and the
    # reverse KL(p_S || p_T) of the next token after A fall.
    student = Bigram(_table({A: {B: 0.0, C: 0.0}, B: {EOS: 0.0}, C: {EOS: 0.0}}))
    teacher = Bigram(_table({A: {B: 2.0, C: -2.0}, B: {EOS: 0.0}, C: {EOS: 0.0}}), width=8)

    def reverse_kl() -> float:
        s, t = student.next_logprobs(A), teacher.next_logprobs(A)
        return float((s.exp() * (s - t)).sum())

    p0, kl0 = float(student.next_logprobs(A)[B].exp()), reverse_kl()
    assert p0 == pytest.approx(0.5)
    rnd = sample_round(student, teacher, [[A]] * 24, EOS, 4, 1, student_params=1, teacher_params=1)
    g = torch.Generator().manual_seed(0)
    block = rnd.ts.row_block()
    steps = [[collate(block, rows, packed=False, pad_id=PAD)] for rows in round_rows(24, 3, 8, g)]
    spec = TrainSpec(steps=3, batch_size=8, lr=0.05, warmup_steps=1, student_ref="current")
    stats = train_steps(student, steps, spec.train_config(), preset("opd"))
    # The weights are the advantage where B and C were sampled (signed), ~0 on EOS.
    w, mb = stats[0].weights[0], stats[0].micro_batches[0]
    first = w[mb.loss_mask].view(-1, 2)[:, 0]
    assert (first > 0).any() and (first < 0).any()
    assert float(student.next_logprobs(A)[B].exp()) > p0 + 0.05
    assert reverse_kl() < kl0 - 0.05


def test_round_rows_and_the_prompt_cycle():
    g = torch.Generator().manual_seed(0)
    rows = round_rows(12, 3, 4, g)
    assert [len(r) for r in rows] == [4, 4, 4] and sorted(sum(rows, [])) == list(range(12))
    # Fewer kept than drawn: every step still has its rows, each kept sample at most twice.
    rows = round_rows(7, 3, 4, g)
    flat = sum(rows, [])
    assert len(flat) == 12 and set(flat) == set(range(7)) and max(map(flat.count, flat)) == 2
    cycle = PromptCycle(5, g)
    first, second = cycle.take(3), cycle.take(3)
    assert len(set(first + second[:2])) == 5  # no prompt repeats before every one is used


def test_a_job_counts_its_flops_at_each_eval_step(tmp_path, monkeypatch):
    # Deterministic bigrams: every answer is "B EOS" (prompt [A]: rows of 3 tokens).
    student = Bigram(_table({A: {B: 40.0}, B: {EOS: 40.0}}))
    teacher = Bigram(_table({A: {B: 0.0, C: 0.0}, B: {EOS: 0.0}}), width=8)
    Ps, Pt = count_params(student), count_params(teacher)
    ts = build_trace_set([[A]], [[B, EOS]])
    ts.meta["row_flops"] = trace_row_flops(ts.lengths.tolist(), Ps, Pt)
    ts.save(tmp_path / "t.pt")
    data = {"trace_prompts": [[A]] * 5, "eos": EOS, "max_new_tokens": 4, "teacher": "T"}
    monkeypatch.setitem(jobs._CACHE, "data.pt", data)
    monkeypatch.setitem(jobs._CACHE, "T", teacher)
    monkeypatch.setattr(jobs, "load_model", lambda path: student)
    monkeypatch.setattr(jobs, "measure", lambda model, job, step: {"step": step, "eval_s": 0.0})
    job = dict(
        data="data.pt",
        student="S",
        phases=[(str(tmp_path / "t.pt"), 2), (ON_POLICY, 3)],
        weights=None,
        round_steps=2,
        batch_size=4,
        lr=1e-3,
        warmup_steps=1,
        student_ref="current",
        evals=[2, 5],
        seed=0,
    )
    recs = jobs.run_arm(job)
    assert [r["step"] for r in recs] == [2, 5]
    # Step 2: the one trace (paid once: 3 tokens generated by the teacher, scored by both)
    # and 2 steps of 4 rows of 3 tokens trained.
    trace = 2 * Pt * 3 + 2 * Pt * 3 + 2 * Ps * 3
    train = 6 * Ps * 4 * 3
    assert recs[0]["flops"] == trace + 2 * train
    # Step 5: rounds of 2 and 1 steps (8 and 4 samples): the student generates 3 tokens a
    # sample, the teacher scores 3 a sample; 3 more steps trained.
    samples = 8 + 4
    assert recs[1]["flops_parts"] == {
        "generation": 2 * Pt * 3 + 2 * Ps * 3 * samples,
        "student_scoring": 2 * Ps * 3,
        "teacher_scoring": 2 * Pt * 3 + 2 * Pt * 3 * samples,
        "training": 5 * train,
    }
    assert recs[1]["flops"] == sum(recs[1]["flops_parts"].values())
    op = recs[1]["train"]["on_policy"]
    assert [r["steps"] for r in op["rounds"]] == [2, 1]
    assert op["samples"] == op["trained_samples"] == samples and op["truncated"] == 0
    # The same job with its on-policy steps at a tenth of the rate runs to its last step
    # (the scheduler reads the scale one step past it) and pays the same FLOPs.
    slow = jobs.run_arm({**job, "on_policy_lr_scale": 0.1})
    assert [r["flops"] for r in slow] == [r["flops"] for r in recs]


def test_the_opd_arms_jobs(tmp_path):
    from bench.quality.run import LATER_ARMS, BenchmarkRun, Plan
    from bench.quality.steps import arm_job
    from bench.quality.task import REGIMES

    run = BenchmarkRun(tmp_path)
    sizes = {"lr": 1e-3, "batch_size": 32, "warmup_steps": 10}
    plan = Plan(REGIMES["knowledge"], sizes, [20, 200], ["opd", "offline_opd"], 2, 1, 60.0, 0)
    opd = arm_job(run, plan, "opd", 0, {})
    assert opd["phases"] == [(ON_POLICY, 200)] and opd["weights"] == preset("opd").to_dict()
    assert opd["round_steps"] * 20 == 200  # R x S = steps
    mixed = arm_job(run, plan, "offline_opd", 1, {"best": "eaft"})
    assert mixed["phases"] == [(run.trace_path("t10"), 100), (ON_POLICY, 100)]
    assert mixed["weights"] == preset("eaft").to_dict() and "offline_opd" in LATER_ARMS
    assert plan.seeds_of("offline_opd") == 1 and plan.seeds_of("opd") == 2
    assert "on_policy_lr_scale" not in opd and "on_policy_lr_scale" not in mixed
    # The _low_lr arms: the same phases, their on-policy steps at a tenth of the rate.
    slow = arm_job(run, plan, "opd_low_lr", 0, {})
    slow_mixed = arm_job(run, plan, "offline_opd_low_lr", 1, {"best": "eaft"})
    assert slow["phases"] == opd["phases"] and slow_mixed["phases"] == mixed["phases"]
    assert slow["on_policy_lr_scale"] == slow_mixed["on_policy_lr_scale"] == 0.1
    assert "on_policy_weights" not in slow and "on_policy_weights" not in slow_mixed
    # The _baseline arms: the _low_lr arms with the opd_baseline preset on their rounds.
    base = arm_job(run, plan, "opd_baseline", 0, {})
    base_mixed = arm_job(run, plan, "offline_opd_baseline", 1, {"best": "eaft"})
    assert base["phases"] == opd["phases"] and base_mixed["phases"] == mixed["phases"]
    assert base["on_policy_lr_scale"] == base_mixed["on_policy_lr_scale"] == 0.1
    with_baseline = {**preset("opd").to_dict(), "baseline": "batch_mean"}
    assert base["on_policy_weights"] == base_mixed["on_policy_weights"] == with_baseline
    assert base_mixed["weights"] == preset("eaft").to_dict()
    assert "offline_opd_baseline" in LATER_ARMS
    full = arm_job(run, plan, "offline_opd_baseline_full_lr", 1, {"best": "eaft"})
    assert full["phases"] == mixed["phases"] and "on_policy_lr_scale" not in full
    assert full["on_policy_weights"] == with_baseline
    with pytest.raises(ValueError, match="unknown arm 'offline_opd_nope'"):
        arm_job(run, plan, "offline_opd_nope", 0, {"best": "eaft"})


def test_lr_scale_at_scales_the_schedule_of_the_steps_it_names():
    """train_steps' lr_scale_at multiplies the trainer's schedule step by step: with a
    constant rate after one warmup step, steps 0-1 at 1e-2 and steps 2-3 at 1e-3 (read
    from the optimizer after each step)."""
    from bench.quality import finetune

    seen = []

    class Spy:
        def __init__(self, learner):
            self.learner = learner

        def step(self, mbs, uniform):  # the learner's step, less its loss: the schedule
            seen.append(self.learner.engine.optimizer.param_groups[0]["lr"])
            self.learner.engine.optimizer.step()
            self.learner.scheduler.step()

    real = finetune.local_learner
    try:
        finetune.local_learner = lambda *a, **k: Spy(real(*a, **k))
        student = Bigram(_table({A: {B: 0.0}, B: {EOS: 0.0}}))
        spec = TrainSpec(steps=4, batch_size=1, lr=1e-2, warmup_steps=1, student_ref="current")
        finetune.train_steps(
            student,
            [[None]] * 4,
            spec.train_config(),
            preset("sft"),
            lr_scale_at=lambda k: 1.0 if k < 2 else 0.1,
        )
    finally:
        finetune.local_learner = real
    assert seen == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])


def _row(arm, step, acc, sd, flops):
    return {
        "arm": arm,
        "step": step,
        "seeds": 2,
        "greedy_acc": acc,
        "greedy_acc_sd": sd,
        "greedy_acc_per_seed": [acc - sd, acc + sd],
        "sampled_acc": acc,
        "sampled_acc_sd": sd,
        "prior_acc": 1.0,
        "flops": flops,
    }


def test_matched_flops_takes_the_eval_step_nearest_sfts_final_flops():
    from bench.quality.results_md import matched_flops, overview_json, overview_markdown

    rows = [_row("sft", 0, 0.2, 0.0, 0.0), _row("sft", 10, 0.6, 0.03, 100e12)]
    rows += [_row("opd", 0, 0.2, 0.0, 0.0), _row("opd", 5, 0.7, 0.04, 80e12)]
    rows += [_row("opd", 10, 0.9, 0.01, 160e12)]
    vs = {
        "sft": {"mean": 0.6, "sd": 0.03, "diff": 0.0, "spreads": 0.0},
        "opd": {"mean": 0.9, "sd": 0.01, "diff": 0.3, "spreads": 0.3 / math.sqrt(0.0005)},
    }
    res = {
        "regime": {"name": "knowledge", "summary": "K"},
        "rows": rows,
        "plan": {"steps": 10, "seeds": 2, "sizes": {"batch_size": 4}},
        "verdict": {"best": "opd", "vs_sft": vs},
        "wall_s": 60.0,
    }
    # |80 - 100| < |160 - 100|: step 5, 0.8 x sft's FLOPs; 0.7 - 0.6 over the pooled
    # spread sqrt((0.04^2 + 0.03^2) / 2) = sqrt(0.00125).
    m = matched_flops(res, "opd")
    assert m["step"] == 5 and m["ratio"] == pytest.approx(0.8)
    assert m["diff"] == pytest.approx(0.1)
    assert m["spreads"] == pytest.approx(0.1 / math.sqrt(0.00125))
    js = overview_json({"knowledge": res})["regimes"]["knowledge"]
    assert js["arms"]["opd"]["flops"] == 160e12 and js["arms"]["sft"]["flops"] == 100e12
    assert js["opd_arms"] == ["opd"] and js["matched_flops"]["opd"]["step"] == 5
    md = overview_markdown({"knowledge": res})
    assert "## On-policy distillation: matched steps, matched FLOPs" in md
    assert "| knowledge | 0.600 ± 0.030 (100) | opd | 0.900 ± 0.010 (13.4; 160) " in md
    assert "0.700 at step 5 (0.80 x sft's FLOPs; 2.8)" in md
    # Without FLOPs (a run from before they were counted) there is no match.
    old = {**res, "rows": [{**r, "flops": None} for r in rows]}
    assert matched_flops(old, "opd") is None


def test_aggregate_means_the_flops_over_seeds():
    from bench.quality.report import aggregate

    def rec(arm, seed, step, flops):
        gen = {"accuracy": 0.5, "derailed": 0.0, "lines_error_sd": 0.0}
        return {
            "arm": arm,
            "seed": seed,
            "step": step,
            "greedy": gen,
            "sampled": gen,
            "prior_accuracy": 1.0,
            "teacher_forced": {"predicted_accuracy": 0.5},
            "exposure_gap": 0.0,
            "exacc_err": {"16": 1.0, "32": 1.0},
            "length_mean": 20.0,
            "flops": flops,
        }

    rows = aggregate([rec("initial", 0, 0, 0), rec("opd", 0, 4, 10.0), rec("opd", 1, 4, 30.0)])
    final = next(r for r in rows if r["step"] == 4)
    assert final["flops"] == 20.0 and final["flops_per_seed"] == [10.0, 30.0]
    assert next(r for r in rows if r["step"] == 0)["flops"] == 0.0
