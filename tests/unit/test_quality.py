"""The quality benchmark's task, grader, measures (ExAccErr on a hand example), trace rows
and report aggregation."""

from __future__ import annotations

import math
import random

import pytest
import torch

from bench.quality import task
from bench.quality.evaluate import exacc_err, free_generation_metrics, generate, step_kl
from bench.quality.jobs import WEIGHT_BINS, weight_histogram
from bench.quality.report import aggregate, mean_sd, verdict
from bench.quality.traces import build_trace_set


def test_code_table_is_the_shipped_models():
    assert len(task.VALUES) == 40 and len(task.KNOWN) == 24 and len(task.NEW) == 16
    assert task.VALUES["sus"] == 0 and task.VALUES["sux"] == 9 and task.VALUES["jev"] == 5


def test_solution_and_prompt():
    p = task.Problem(("sus", "sux", "jev"))
    assert p.prompt == "Sum mod 10: sus sux jev"
    assert task.solution(p) == "sus0=0\nsux9=9\njev5=4\n#### 4"
    assert task.running_sums(p) == [0, 9, 4]
    assert not p.has_new


def test_grade_correct_derailed_and_length():
    p = task.Problem(("sus", "sux", "jev"))
    assert task.grade(p, task.solution(p)) == task.Grade(True, False, 0)
    # A wrong value, still in the task's form.
    assert task.grade(p, "sus0=0\nsux8=8\njev5=3\n#### 3") == task.Grade(False, False, 0)
    # A skipped code: derailed, one line short, the answer right by chance.
    assert task.grade(p, "sus0=0\njev5=4\n#### 4") == task.Grade(True, True, -1)
    # A code out of order, no answer line, an extra line.
    assert task.grade(p, "sux9=9\nsus0=9\njev5=4\n#### 4").derailed
    assert task.grade(p, "sus0=0\nsux9=9\njev5=4").correct is False
    assert task.grade(p, "sus0=0\nsux9=9\njev5=4\njev5=9\n#### 9") == task.Grade(False, True, 1)


def test_make_problems_pools_lengths_and_exclusion():
    first = task.make_problems(50, random.Random(0))
    known = task.make_problems(50, random.Random(1), "known", exclude=first)
    assert len(set(first)) == 50 and not set(first) & set(known)
    assert all(2 <= len(p.codes) <= 6 for p in first + known)
    assert all(not p.has_new for p in known)
    assert any(p.has_new for p in first)


def test_free_generation_metrics_by_hand():
    p = task.Problem(("sus", "sux"))  # sus0=0, sux9=9, #### 9
    texts = ["sus0=0\nsux9=9\n#### 9", "sus0=0\n#### 9", "sus0=0\nsux9=9\nsux9=8\n#### 8"]
    m = free_generation_metrics([p] * 3, texts)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["derailed"] == pytest.approx(2 / 3)
    assert m["lines_error_sd"] == pytest.approx(math.sqrt((0 + 1 + 1) / 3))


def test_exacc_err_hand_example():
    # Teacher forcing: 0.1 nats a step, so eps(l) = 0.1. On its own prefixes the student's
    # error grows: 0.1, 0.2, 0.3, 0.4. R(2) = 0.3, R(4) = 1.0:
    # ExAccErr(2) = (0.3 - 0.2) / 0.2 = 50 %, ExAccErr(4) = (1.0 - 0.4) / 0.4 = 150 %.
    own = [[0.1, 0.2, 0.3, 0.4]] * 10
    forced = [[0.1] * 4] * 10
    out = exacc_err(own, forced, lengths=(2, 4, 5))
    assert out["2"] == pytest.approx(50.0)
    assert out["4"] == pytest.approx(150.0)
    assert math.isnan(out["5"])  # no sample reaches 5 tokens
    # Samples shorter than l do not count; equal errors give 0.
    out = exacc_err([[0.1] * 4] * 10 + [[9.0]] * 5, forced, lengths=(3,))
    assert out["3"] == pytest.approx(0.0)
    # Fewer than MIN_SAMPLES samples: not estimated.
    assert math.isnan(exacc_err(own[:3], forced, lengths=(2,))["2"])


def test_step_kl_of_a_model_with_itself_is_zero_and_generation_solves():
    from bench.quality.models import load_model, load_tokenizer, prompt_ids

    tok = load_tokenizer()
    teacher = load_model(task.MODELS / "teacher")
    probs = [task.Problem(("sus", "jol", "qux")), task.Problem(("fag", "lum"))]
    prompts = prompt_ids(tok, [p.prompt for p in probs])
    outs = generate(teacher, prompts, tok.eos_token_id)
    assert all(o[-1] == tok.eos_token_id for o in outs)
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    assert [task.grade(p, t).correct for p, t in zip(probs, texts)] == [True, True]
    kl = step_kl(teacher, teacher, prompts, outs)
    assert [len(k) for k in kl] == [len(o) for o in outs]
    assert max(abs(x) for k in kl for x in k) < 1e-4


def test_trace_rows_sentences_and_weight_histogram():
    ts = build_trace_set([[5, 6], [5]], [[7, 9, 8, 2], [9, 2]], newlines={9})
    assert ts.loss_mask[0].tolist() == [False, True, True, True, True]
    assert ts.sentence_ids[0, 1:5].tolist() == [0, 0, 1, 1]
    assert ts.ids_BL[1].tolist() == [5, 9, 2, task.PAD, task.PAD, task.PAD]
    w = torch.tensor([[0.05, 1.0, 10.0]])
    h = weight_histogram([w], [torch.tensor([[True, True, True]])])
    assert sum(h) == 3 and h[0] == 1 and h[-1] == 1 and len(h) == len(WEIGHT_BINS) - 1


def _record(arm, seed, step, acc):
    gen = {"accuracy": acc, "derailed": 0.0, "lines_error_sd": 0.0}
    return {
        "arm": arm,
        "seed": seed,
        "step": step,
        "greedy": gen,
        "sampled": gen,
        "prior_accuracy": 1.0,
        "teacher_forced": {"predicted_accuracy": acc},
        "exposure_gap": 0.0,
        "exacc_err": {"16": 10.0, "32": None},
        "length_mean": 20.0,
    }


def test_aggregate_adds_the_initial_step_and_verdict_counts_spreads():
    recs = [_record("initial", s, 0, 0.2) for s in (0, 1)]
    recs += [_record("sft", 0, 4, 0.5), _record("sft", 1, 4, 0.7)]
    recs += [_record("das_token", 0, 4, 0.8), _record("das_token", 1, 4, 1.0)]
    rows = aggregate(recs)
    assert [(r["arm"], r["step"], r["seeds"]) for r in rows] == [
        ("sft", 0, 2),
        ("sft", 4, 2),
        ("das_token", 0, 2),
        ("das_token", 4, 2),
    ]
    assert rows[0]["greedy_acc"] == pytest.approx(0.2)
    assert math.isnan(rows[1]["exacc_32"]) and rows[1]["exacc_16"] == 10.0
    v = verdict(rows, 4)
    sd = math.sqrt(0.02)  # the sample sd of (0.5, 0.7) and of (0.8, 1.0)
    assert v["best"] == "das_token"
    assert v["vs_sft"]["das_token"]["diff"] == pytest.approx(0.3)
    assert v["vs_sft"]["das_token"]["spreads"] == pytest.approx(0.3 / sd)
    assert mean_sd([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_grade_reads_the_terse_and_merged_lines_of_the_regimes_teachers():
    p = task.Problem(("sus", "sux", "jev"))  # values 0, 9, 5: sums 0, 9, 4
    # C's teacher: no value on a line.
    assert task.grade(p, "sus=0\nsux=9\njev=4\n#### 4") == task.Grade(True, False, 0)
    # Two codes on a line cover both; a missing third code derails.
    assert task.grade(p, "sus0+sux9=9\njev5=4\n#### 4") == task.Grade(True, False, 0)
    assert task.grade(p, "sus0+sux9=9\n#### 4") == task.Grade(True, True, -1)
    # Mixed forms still in order are in form; a wrong sum is wrong, not derailed.
    assert task.grade(p, "sus=0\nsux9=9\njev=3\n#### 3") == task.Grade(False, False, 0)


def test_make_problems_takes_the_regimes_lengths():
    long = task.make_problems(40, random.Random(0), lengths=task.REGIMES["long"].lengths)
    assert all(8 <= len(p.codes) <= 16 for p in long)
    assert {len(p.codes) for p in long} >= {8, 16} or max(len(p.codes) for p in long) > 12


def test_regimes_name_their_models_and_sizes():
    k, c, ln = (task.REGIMES[n] for n in ("knowledge", "capacity", "long"))
    assert k.student == task.MODELS / "student" and k.prior_pool == "known"
    assert c.student == ln.student == task.REGIME_MODELS / "student_all"
    assert c.teacher.name == "teacher_terse" and ln.teacher.name == "teacher_long"
    # L trains on about K's tokens: 120 x 16 rows of ~4x the length of 200 x 32.
    assert ln.steps * ln.batch_size * 4 >= k.steps * k.batch_size


def test_tune_choice_keeps_sft_unless_a_trial_beats_it_beyond_noise():
    from bench.quality.tuning import choose

    base = {"nll_mix": 1.0, "gate": "none"}
    sft = {**base, "val_seeds": [0.80, 0.82], "val_accuracy": 0.81}
    close = {"nll_mix": 0.5, "gate": "none", "val_seeds": [0.83, 0.83], "val_accuracy": 0.83}
    # Binomial se of the difference at p = 0.81, 300 problems, 2 seeds:
    # sqrt(2 * 0.81 * 0.19 / 600) = 0.02265; paired: sd(0.03, 0.01) / sqrt(2) = 0.01.
    got = choose([sft, close], base, n_val=300)
    assert got["kept_baseline"] and got["nll_mix"] == 1.0
    assert got["margin"] == pytest.approx(math.sqrt(2 * 0.81 * 0.19 / 600))
    far = {"nll_mix": 0.0, "gate": "conflict", "val_seeds": [0.90, 0.92], "val_accuracy": 0.91}
    got = choose([sft, close, far], base, n_val=300)
    assert not got["kept_baseline"] and got["gate"] == "conflict"
    # A failed trial (no seeds) is never chosen; the baseline best of the rest is kept.
    failed = {"nll_mix": 0.0, "gate": "none", "val_seeds": None, "val_accuracy": None}
    assert choose([failed, sft], base, n_val=300)["kept_baseline"]


def test_overview_json_has_every_regimes_arms_and_the_goals_read_them():
    from bench.quality.results_md import overview_json, overview_markdown

    def res(name, arms):  # arms: {arm: (mean, sd)}, 2 seeds at step 10
        rows = [
            {
                "arm": a,
                "step": 10,
                "seeds": 2,
                "greedy_acc": m,
                "greedy_acc_sd": s,
                "greedy_acc_per_seed": [m - s, m + s],
                "sampled_acc": m,
                "sampled_acc_sd": s,
                "prior_acc": 1.0,
            }
            for a, (m, s) in arms.items()
        ]
        rows.append({**rows[0], "arm": "sft", "step": 0, "greedy_acc": 0.2})
        vs = {
            a: {
                "mean": m,
                "sd": s,
                "diff": m - arms["sft"][0],
                "spreads": (m - arms["sft"][0]) / math.sqrt((s**2 + arms["sft"][1] ** 2) / 2),
            }
            for a, (m, s) in arms.items()
        }
        best = max(arms, key=lambda a: arms[a][0])
        return {
            "regime": {"name": name, "summary": name},
            "rows": rows,
            "plan": {"steps": 10, "seeds": 2, "sizes": {"batch_size": 4}},
            "verdict": {"best": best, "vs_sft": vs},
            "wall_s": 60.0,
            "tune": {"chosen_fields": {"nll_mix": 1.0}, "cost_steps": 160},
        }

    runs = {
        "knowledge": res(
            "knowledge",
            {"sft": (0.8, 0.02), "eaft": (0.79, 0.02), "dft": (0.2, 0.02), "tune": (0.8, 0.02)},
        ),
        "capacity": res("capacity", {"sft": (0.6, 0.02), "dft": (0.7, 0.02), "tune": (0.6, 0.02)}),
    }
    js = overview_json(runs)
    k = js["regimes"]["knowledge"]
    assert k["arms"]["eaft"]["mean"] == 0.79 and k["arms"]["eaft"]["seeds"] == 2
    assert k["entropy_arms"] == ["eaft"] and k["tune_arm"] == "tune"
    assert k["tune_cost_steps"] == 160 and k["initial_greedy"] == 0.2
    md = overview_markdown(runs)
    # capacity: dft beats sft by 0.1 / 0.02 = 5 spreads; tune (= sft) is 5 spreads behind it.
    assert "met in capacity (dft, 5.0)" in md
    assert "- capacity: Tune's choice is -5.0 spreads from the best arm" in md
    assert "eaft -0.5 (all of 1 met)" in md and "Not run yet: long." in md
