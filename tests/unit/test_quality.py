"""The quality benchmark's task generator, grader, trace rows, generation and reporting."""

from __future__ import annotations

import math
import random
import time

import pytest
import torch

from raydc import quality as q
from raydc.weights import preset


def test_encode_decode_roundtrip_and_unknown_character():
    text = "Sa0b1:a0=0\nb1=1\n#1"
    assert q.decode(q.encode(text) + [q.EOS, 5, 6]) == text
    assert q.decode([q.PAD] + q.encode("Da1b2:")) == "Da1b2:"
    with pytest.raises(ValueError, match="'x'"):
        q.encode("Sa1x")


def test_solution_styles_and_answer():
    p = q.Problem("S", (3, 9, 4))
    assert p.prompt == "Sa3b9c4:"
    assert q.solution(p, "forward") == "a3=3\nb9=2\nc4=6\n#6"
    assert q.solution(p, "backward") == "c4=4\nb9=3\na3=6\n#6"
    assert p.answer == "6"
    with pytest.raises(ValueError, match="1 to 14"):
        q.Problem("S", tuple(range(10)) * 2)
    assert q.Problem("D", (3, 9, 4)).answer == "=a6b8c8"
    with pytest.raises(ValueError, match="style"):
        q.solution(p, "sideways")


@pytest.mark.parametrize("style", q.STYLES)
def test_correct_solutions_grade_valid(style):
    rng = random.Random(0)
    for p in q.make_problems(200, rng, (1, 14)):
        g = q.grade(p, q.solution(p, style))
        assert g.valid and g.correct and g.finished
        assert g.n_steps == len(p.digits)
        if p.digits != tuple(reversed(p.digits)):
            assert g.style == style


def test_grade_catches_each_kind_of_slip():
    p = q.Problem("S", (3, 9, 4))
    skipped = "a3=3\nc4=7\n#7"  # an item never consumed: the answer is wrong too
    assert not q.grade(p, skipped).valid and not q.grade(p, skipped).correct
    repeated = "a3=3\na3=6\nc4=0\n#0"  # a twice, b never
    g = q.grade(p, repeated)
    assert not g.valid and g.style == "other"
    bad_sum = "a3=3\nb9=3\nc4=7\n#6"  # wrong running sum, right answer by luck
    g = q.grade(p, bad_sum)
    assert g.correct and not g.valid
    wrong_digit = "a3=3\nb8=1\nc4=5\n#6"
    assert not q.grade(p, wrong_digit).valid
    no_such_item = "a3=3\nb9=2\nc4=6\nd1=7\n#6"
    assert not q.grade(p, no_such_item).valid
    mixed = "a3=3\nc4=7\nb9=6\n#6"  # forward start, backward drift: all consumed once
    g = q.grade(p, mixed)
    assert g.valid and g.style == "other"
    unfinished = "a3=3\nb9=2\n"
    g = q.grade(p, unfinished)
    assert not g.finished and not g.valid
    assert not q.grade(p, "a3=3\nb9=2\nc4=6\n#66").finished
    assert not q.grade(p, "a3=3\nxx\n#6").valid


def test_grade_side_task():
    p = q.Problem("D", (3, 9, 4))
    assert q.grade(p, "=a6b8c8").valid
    assert not q.grade(p, "=a6b8c9").valid
    assert not q.grade(p, "688").valid and not q.grade(p, "a6b8c8").valid


def test_valid_next_tokens_contains_reference_and_exactly_the_remaining_digits():
    rng = random.Random(1)
    for p in q.make_problems(100, rng, (2, 14)):
        for style in q.STYLES:
            ref = q.solution(p, style)
            ids = q.encode(ref) + [q.EOS]
            allowed = q.valid_next_tokens(p, ref)
            assert len(allowed) == len(ids)
            assert all(t in s for t, s in zip(ids, allowed))
    p = q.Problem("S", (5, 5, 2))
    allowed = q.valid_next_tokens(p, q.solution(p, "forward"))
    ids = lambda *cs: {q.encode(str(c))[0] for c in cs}  # noqa: E731
    assert allowed[0] == ids("a", "b", "c")
    assert allowed[5] == ids("b", "c")  # a consumed
    assert allowed[10] == ids("c")
    assert allowed[1] == ids(5) and allowed[3] == ids(5) and allowed[8] == ids(0)


def test_build_trace_set_masks_and_alignment():
    prompts = [q.encode("Sa1:"), q.encode("Sa3b4:")]
    responses = [q.encode("a1=1\nb2=3\n#3") + [q.EOS], q.encode("a3=3\n")]
    lps = [[-0.1 * (j + 1) for j in range(len(r))] for r in responses]
    ts = q.build_trace_set(prompts, responses, lps, prompt_ids=[7, 8])
    assert ts.ids_BL.shape == (2, 4 + 13)
    # Targets of response tokens start at index len(prompt) - 1.
    assert ts.loss_mask[0].nonzero().flatten().tolist() == list(range(3, 3 + 13))
    assert ts.loss_mask[1].sum() == 5
    assert torch.allclose(ts.teacher_lp[0, 3:16], torch.tensor(lps[0]))
    assert ts.teacher_lp[0, :3].abs().sum() == 0
    # One sentence per step line; the newline belongs to its line.
    assert ts.sentence_ids[0, 3:16].tolist() == [0] * 5 + [1] * 5 + [2] * 3
    assert ts.prompt_id.tolist() == [7, 8]
    sub = ts.subset([1])
    assert len(sub) == 1 and sub.prompt_id.tolist() == [8]
    with pytest.raises(ValueError, match="row 0"):
        q.build_trace_set(prompts[:1], responses[:1], [[-0.1]])


def _naive_greedy(model, prompt, n):
    ids = list(prompt)
    out = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        if tok == q.EOS:
            break
        ids.append(tok)
    return out


def test_generate_with_cache_and_left_padding_matches_naive_decoding():
    torch.manual_seed(0)
    model = q.build_model((64, 1, 1, 1, 64), seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model.eval()
    prompts = [q.encode("Sa1:"), q.encode("Sa1b2c3d4e5f6g7h8:"), q.encode("Da9b9:")]
    got = q.generate(model, prompts, 12)
    with torch.no_grad():
        want = [_naive_greedy(model, p, 12) for p in prompts]
    assert got == want
    s1 = q.generate(model, prompts, 12, temperature=1.0, seed=5)
    s2 = q.generate(model, prompts, 12, temperature=1.0, seed=5)
    assert s1 == s2


def test_train_uses_the_library_loss_and_learns():
    rng = random.Random(0)
    probs = q.make_problems(64, rng, (2, 4))
    ts = q.examples_to_trace_set(probs, ["forward"] * len(probs))
    ts.teacher_lp = torch.where(ts.loss_mask, torch.full_like(ts.teacher_lp, -0.5), 0.0)
    model = q.build_model((64, 1, 1, 1, 64), seed=0)
    before = float(q.score_traces(model, ts)[ts.loss_mask].mean())
    info = q.train(
        model, ts, q.TrainSpec(steps=20, batch_size=16, lr=3e-3, weights=preset("discord"))
    )
    after = float(q.score_traces(model, ts)[ts.loss_mask].mean())
    assert after > before + 0.5
    assert 0 < info["mean_weight"] < 2 and 0 < info["mean_ess_fraction"] <= 1
    # Budgets nest: the model after 4 steps of a 12-step run is the 4-step model.
    m1, m2 = q.build_model((64, 1, 1, 1, 64), 0), q.build_model((64, 1, 1, 1, 64), 0)
    snap = {}
    q.train(
        m1,
        ts,
        q.TrainSpec(steps=12, batch_size=4),
        on_step=lambda s, m: (
            snap.update({k: v.clone() for k, v in m.state_dict().items()}) if s == 4 else None
        ),
    )
    q.train(m2, ts, q.TrainSpec(steps=4, batch_size=4))
    for k, v in m2.state_dict().items():
        assert torch.allclose(v, snap[k]), k


def test_teacher_forced_metrics_of_a_model_that_knows_nothing():
    model = q.build_model((64, 1, 1, 1, 64), seed=0)
    probs = q.make_problems(8, random.Random(0), (3, 5))
    tf = q.teacher_forced_metrics(model, probs, "backward")
    assert 0 <= tf["token_accuracy"] < 0.5
    assert tf["predicted_accuracy"] == 0.0
    assert tf["independent_prediction"] <= tf["step_accuracy"]


def test_aggregate_and_table():
    def rec(arm, seed, acc):
        fg = {
            "accuracy": acc,
            "derailed": 1 - acc,
            "length_error_sd": 1.0,
            "forward_share": 0.5,
            "backward_share": 0.5,
        }
        return {
            "traces": "clean",
            "arm": arm,
            "budget": 10,
            "seed": seed,
            "greedy": fg,
            "sampled": fg,
            "side_accuracy": 0.9,
            "exposure_gap": 0.1,
            "tf_predicted_best": 0.7,
            "teacher_forced": {"predicted_accuracy": 0.8, "step_accuracy": 0.9},
        }

    rows = q.aggregate([rec("sft", 0, 0.5), rec("sft", 1, 0.7), rec("dft", 0, 0.1)])
    sft = next(r for r in rows if r["arm"] == "sft")
    assert sft["seeds"] == 2 and math.isclose(sft["greedy_acc"], 0.6)
    assert math.isclose(sft["greedy_acc_sd"], math.sqrt(0.02))
    table = q.markdown_table(rows, ["sft", "dft"])
    lines = table.strip().splitlines()
    assert len(lines) == 4 and "| clean | 10 | sft | 2 | 0.600 ± 0.141 |" in lines[2]


def test_load_monitor_samples_the_machine():
    mon = q.LoadMonitor(interval_s=0.05).start()
    t = time.time()
    # Busy until two samples exist (a loaded machine may delay the sampling thread).
    while len(mon.samples) < 2 and time.time() - t < 30:
        sum(range(10000))
    s = mon.stop()
    assert s["samples"] >= 2
    assert s["ours_cores_mean"] >= 0 and s["foreign_cores_mean"] >= 0
    assert isinstance(s["contended"], bool)


def test_evaluate_reports_every_figure_in_range():
    model = q.build_model((64, 1, 1, 1, 64), seed=0)
    probs = q.make_problems(4, random.Random(0), (2, 3))
    side = q.make_problems(2, random.Random(1), (2, 3), "D")
    res = q.evaluate(model, probs, side, seed=0, max_digits=3)
    for key in ("greedy", "sampled"):
        fg = res[key]
        assert fg["n"] == 4 and fg["accuracy"] + fg["derailed"] == 1.0
        assert math.isclose(fg["forward_share"] + fg["backward_share"] + fg["other_share"], 1.0)
    assert 0 <= res["side_accuracy"] <= 1
    assert set(res["teacher_forced_forward"]) == set(res["teacher_forced"])
    best = max(
        r["predicted_accuracy"] for r in (res["teacher_forced"], res["teacher_forced_forward"])
    )
    assert res["tf_predicted_best"] == best
    assert math.isclose(res["exposure_gap"], best - res["greedy"]["accuracy"])
