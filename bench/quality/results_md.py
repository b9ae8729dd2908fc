"""docs/results.md from a run's results.json: every figure in it comes from there."""

from __future__ import annotations

import math

ARM_NOTES = {
    "sft": "w = 1 on the teacher's T = 1 traces (first of 2 candidates)",
    "dft": "w = p_S(token) (DFT)",
    "discord": "2 sigmoid(log p_S - log p_T), self-normalised (DisCorD)",
    "das_token": "2 sigmoid(log p_T - log p_S), self-normalised (DASD's direction)",
    "iw_seq": "clip(exp(mean log-ratio of the response), 0, 16)",
    "tis": "as iw_seq, clipped at 2",
    "dasd_sft": "sft on the candidate DASD selection picks (of 2 at T = 1)",
    "stages_sft": "sft: first half on T = 0.6 traces, second half on T = 1 traces, one optimizer",
    "stages_best": "the same stages with the best weighted preset",
    "risky_floor": "the riskiest weighted preset with floor 0.3",
    "risky_warmup": "the riskiest weighted preset, uniform weights for its first 20 steps",
    "tune": "the Ray Tune choice (validation split)",
}

FORMULA = """With the teacher p as the oracle and the student q (Arora et al. 2022, "Why exposure bias
matters"; the form MiniLLM uses), over responses of the evaluation prompts:

    eps(l)      = E_{y ~ p} [ (1/l) * sum_{t=1..l} KL( p(.|x, y_<t) || q(.|x, y_<t) ) ]
    R(l)        = E_{y ~ q} [         sum_{t=1..l} KL( p(.|x, y_<t) || q(.|x, y_<t) ) ]
    ExAccErr(l) = ( R(l) - l * eps(l) ) / ( l * eps(l) ) * 100 %

eps(l) is the student's per-token error where the prefixes are the teacher's (teacher
forcing), R(l) the error it accumulates on its own prefixes; ExAccErr is the share of R
beyond what teacher forcing predicts (> 0: its own prefixes lead it where it errs more).
Estimate per length l: each KL is exact over the 2,048-token vocabulary; the expectation
over p is the mean over one teacher sample at T = 1 for each of the first 100 evaluation
prompts (fixed for the run), the one over q the mean over the student's own T = 1 sample
of the same prompts (the samples of the sampled accuracy), in both cases over the samples
with at least l
response tokens (a length is not estimated with fewer than 10). Responses are 16 to 45
tokens (2 to 6 codes), so l = 16 covers nearly every sample and l = 32 the lists of 5-6
codes; the table shows both."""


def _f(x, digits: int = 3) -> str:
    return (
        "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"
    )


def _ms(r: dict, key: str, digits: int = 3) -> str:
    m = _f(r.get(key), digits)
    return m if m == "n/a" else f"{m} ± {_f(r.get(key + '_sd'), digits)}"


def final_table(res: dict) -> str:
    steps = res["plan"]["steps"]
    rows = [r for r in res["rows"] if r["step"] == steps]
    head = (
        "| arm | seeds | greedy acc. | sampled acc. (T=1) | prior kept (known lists) "
        "| TF-predicted | derailed greedy / sampled | line-count err. rms | ExAccErr(16) % "
        "| ExAccErr(32) % |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['arm']} | {r['seeds']} | {_ms(r, 'greedy_acc')} | {_ms(r, 'sampled_acc')} "
        f"| {_ms(r, 'prior_acc')} | {_f(r['tf_predicted'])} | {_f(r['derailed_greedy'])} / "
        f"{_f(r['derailed_sampled'])} | {_f(r['lines_error_sd'], 2)} | {_ms(r, 'exacc_16', 1)} "
        f"| {_ms(r, 'exacc_32', 1)} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def curve_table(res: dict, key: str, digits: int = 3) -> str:
    steps = sorted({r["step"] for r in res["rows"]})
    head = "| arm | " + " | ".join(f"step {s}" for s in steps) + " |\n"
    head += "|---" * (len(steps) + 1) + "|\n"
    lines = []
    for arm in res["arms"]:
        by = {r["step"]: r for r in res["rows"] if r["arm"] == arm}
        if by:
            cells = [_ms(by[s], key, digits) if s in by else "" for s in steps]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _compare(res: dict, key: str, label: str, lower_better: bool = False, digits: int = 3) -> str:
    """Among the arms whose final greedy accuracy is within 2 pooled spreads of sft's (or
    above), the one with the best mean ``key`` at the last step against sft."""
    steps = res["plan"]["steps"]
    near = {a for a, x in res["verdict"]["vs_sft"].items() if (x["spreads"] or 0) > -2}
    final = {
        r["arm"]: r
        for r in res["rows"]
        if r["step"] == steps and r["arm"] in near and r.get(key) is not None
    }
    if "sft" not in final:
        return ""
    pick = min if lower_better else max
    best = pick(final, key=lambda a: final[a][key])
    b, s = final[best], final["sft"]
    pooled = math.sqrt((b[key + "_sd"] ** 2 + s[key + "_sd"] ** 2) / 2)
    spreads = (b[key] - s[key]) / pooled if pooled > 0 else float("nan")
    return (
        f"{label}, among the arms within 2 spreads of sft's greedy accuracy or above: "
        f"{'lowest' if lower_better else 'highest'} {best} {_ms(b, key, digits)}, sft "
        f"{_ms(s, key, digits)} ({_f(spreads, 1)} spreads)."
    )


def verdict_text(res: dict) -> str:
    v, vs = res["verdict"], res.get("verdict_sampled", {})
    if not v or not v.get("vs_sft"):
        return "No verdict: the run has no sft arm at its last step.\n"
    d = v["vs_sft"]
    best = v["best"]
    ranked = sorted(d.items(), key=lambda kv: -kv[1]["mean"])
    lines = [
        f"At matched compute ({v['steps']} optimizer steps of {res['plan']['sizes']['batch_size']} "
        f"traces for every arm), the best mean greedy accuracy is **{best}**: "
        f"{_f(d[best]['mean'])} ± {_f(d[best]['sd'])}, against sft {_f(d['sft']['mean'])} ± "
        f"{_f(d['sft']['sd'])} ({_f(d[best]['diff'], 3)}, {_f(d[best]['spreads'], 1)} pooled "
        "seed spreads). Every arm takes the same optimizer steps on the same number of traces; "
        "dasd_sft also needed a second teacher sample a prompt, the stages a T = 0.6 set, and "
        "the tune arm its search (below).",
    ]
    beats = [
        a for a, x in d.items() if a != "sft" and x["spreads"] is not None and x["spreads"] >= 2
    ]
    worse = [
        a for a, x in d.items() if a != "sft" and x["spreads"] is not None and x["spreads"] <= -2
    ]
    lines.append(
        "Arms ahead of sft by 2 or more spreads: " + (", ".join(beats) if beats else "none") + "; "
        "behind it by 2 or more: " + (", ".join(worse) if worse else "none") + "."
    )
    if vs and vs.get("vs_sft"):
        s = vs["vs_sft"]
        lines.append(
            f"Sampled (T = 1) accuracy: best {vs['best']} {_f(s[vs['best']]['mean'])}, sft "
            f"{_f(s['sft']['mean'])} ({_f(s[vs['best']]['spreads'], 1)} spreads)."
        )
    lines.append(_compare(res, "prior_acc", "Prior kept (known-code lists)"))
    lines.append(_compare(res, "exacc_16", "ExAccErr(16) %", lower_better=True, digits=1))
    lines.append(_compare(res, "derailed_sampled", "Derailed share (sampled)", lower_better=True))
    lines.append("")
    lines.append("| arm | greedy acc. at the last step | minus sft | in pooled seed spreads |")
    lines.append("|---|---|---|---|")
    for arm, x in ranked:
        lines.append(
            f"| {arm} | {_f(x['mean'])} ± {_f(x['sd'])} | {_f(x['diff'])} | {_f(x['spreads'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def identical_arms(res: dict) -> list[tuple[str, str]]:
    """Pairs of arms whose every per-seed greedy and sampled accuracy, at every step, agree."""
    key = {}
    for r in res["rows"]:
        key.setdefault(r["arm"], []).append(
            (r["step"], tuple(r["greedy_acc_per_seed"]), tuple(r["sampled_acc_per_seed"]))
        )
    arms = [a for a in res["arms"] if a in key]
    return [
        (a, b)
        for i, a in enumerate(arms)
        for b in arms[i + 1 :]
        if sorted(key[a]) == sorted(key[b])
    ]


def weights_table(res: dict) -> str:
    """Per arm, the loss tokens' weights over all steps and seeds, from the histograms."""
    bins, out = res["weight_bins"], []
    out.append(
        "| arm | mean weight (bin middles, ± 0.05) | share < 0.5 | share 0.5-1.5 | share >= 1.5 |"
    )
    out.append("|---|---|---|---|---|")
    for arm in res["arms"]:
        h = res["weight_hists"].get(arm)
        if not h or not sum(h):
            continue
        n = sum(h)
        mids = [(a + b) / 2 for a, b in zip(bins, bins[1:])]
        mean = sum(c * m for c, m in zip(h, mids)) / n
        low = sum(c for c, a in zip(h, bins) if a < 0.5) / n
        high = sum(c for c, a in zip(h, bins) if a >= 1.5) / n
        out.append(f"| {arm} | {mean:.2f} | {low:.3f} | {1 - low - high:.3f} | {high:.3f} |")
    note = (
        f"Weights are binned in steps of {bins[1] - bins[0]:.1f} (the mean uses bin middles; "
        "the last bin holds every weight above it); the weight-warmup steps count as weight 1."
    )
    return "\n".join(out) + "\n\n" + note + "\n"


def _setup_text(res: dict) -> str:
    t, load, tr = res["timings"], res["load"], res.get("traces", {})
    init = next((r for r in res["rows"] if r["step"] == 0), None)
    seeds = res["seeds_per_arm"]
    fewer = sorted(a for a, n in seeds.items() if n < res["plan"]["seeds"])
    why = (
        f"{len(res['skipped'])} jobs were not started as they would have ended after the "
        f"{res['plan']['deadline_s'] / 60:.0f}-minute deadline"
        if res.get("skipped")
        else f"the plan gave the arms that run after the presets {res['plan']['later_seeds']} seeds"
    )
    lines = [
        f"- Command: `{res['command']}` (one invocation from scratch; finished {res['finished']}).",
        f"- Wall time {res['wall_s'] / 60:.1f} min: setup (problems, traces) {t.get('setup_s', 0):.0f} s, "
        f"tune search {res.get('tune', {}).get('wall_s', 0):.0f} s, arms {t.get('arms_s', 0):.0f} s; "
        f"{res['machine']['cpu_count']} CPU cores, Python {res['machine']['python']}.",
        f"- Load (bench.machine.LoadMonitor, {load.get('samples')} samples): 1-min load "
        f"average mean {_f(load.get('load1_mean'), 2)} (max {_f(load.get('load1_max'), 2)}); this "
        f"run used {_f(load.get('ours_cores_mean'), 2)} cores on average, other processes "
        f"{_f(load.get('foreign_cores_mean'), 2)} (contended: {res.get('contended')}).",
        f"- Seeds: {res['plan']['seeds']} per arm"
        + (f", except {', '.join(f'{a} ({seeds[a]})' for a in fewer)}: {why}" if fewer else "")
        + ". Seeds change the order of the training batches and the T = 1 evaluation samples; every arm starts from the same shipped student.",
    ]
    if init:
        lines.append(
            f"- The initial student (step 0): greedy {_ms(init, 'greedy_acc')}, sampled "
            f"{_ms(init, 'sampled_acc')}, on known-code lists {_ms(init, 'prior_acc')}."
        )
    for name, s in tr.get("stats", {}).items():
        lines.append(
            f"- Trace set `{name}`: {s['rows']} rows, teacher answer correct in {_f(s['teacher_correct'])}"
            + (
                f"; DASD picked the second candidate for {_f(s['picked_not_first'])} of prompts"
                if "picked_not_first" in s
                else ""
            )
            + "."
        )
    return "\n".join(lines) + "\n"


def _tune_text(res: dict) -> str:
    tune = res.get("tune")
    if not tune:
        return "The tune arm was not run.\n"
    rows = sorted(tune["trials"], key=lambda r: -(r["val_accuracy"] or 0))
    keys = [k for k in rows[0] if k != "val_accuracy"]
    out = [
        f"Ray Tune (random search, {len(rows)} trials, 2 at a time, one seed each, the full "
        f"{res['plan']['steps']} steps, greedy accuracy on {res['data']['val_n']} validation "
        f"problems disjoint from the eval set) over token-level clip(exp(sign * (log p_S - "
        f"log p_T) / tau), w_min, w_max) with a floor, self-normalised. It cost "
        f"{tune['wall_s']:.0f} s, on top of the tune arm's matched {res['plan']['steps']} steps. "
        f"Chosen: `{tune['chosen_fields']}`.",
        "",
        "| " + " | ".join(keys) + " | val. accuracy |",
        "|---" * (len(keys) + 1) + "|",
    ]
    out += [
        "| " + " | ".join(str(r[k]) for k in keys) + f" | {_f(r['val_accuracy'])} |" for r in rows
    ]
    return "\n".join(out) + "\n"


def results_markdown(res: dict, curves_png: str, weights_png: str) -> str:
    arms = "\n".join(f"- `{a}`: {ARM_NOTES.get(a, '')}" for a in res["arms"])
    chosen = res.get("chosen", {})
    chosen_line = (
        f"From the presets' mean final greedy accuracy, the best weighted preset was "
        f"`{chosen['best']}` and the riskiest `{chosen['risky']}` ({ {k: round(v, 3) for k, v in chosen['means'].items()} })."
        if chosen
        else ""
    )
    same = identical_arms(res)
    same_line = (
        "Identical runs (every seed's greedy and sampled accuracy at every step): "
        + "; ".join(f"`{a}` = `{b}`" for a, b in same)
        + ": their differences never changed a training step here."
        if same
        else ""
    )
    parts = [
        "# Quality benchmark: results\n",
        "Generated by `jobs/benchmark_quality.py --docs docs` from the run's results.json "
        "(`bench/quality/results_md.py`); no figure here is edited by hand.\n",
        "**The regime.** The embedded default's task and models (raydc/assets/sumtask): a running "
        "sum mod 10 over lists of 2-6 codes, each worth a digit. The shipped teacher (Qwen2 192 x 3) "
        "knows all 40 codes; the shipped student (128 x 2) was trained where only 24 exist. Its "
        "held-out accuracy on lists over all 40 codes is low at the start, and training on the "
        "teacher's traces teaches it the missing values. Every arm fine-tunes the same student "
        "through the trainer's step (`bench.quality.finetune`: the trainer's MicroBatch, weights, "
        "loss, AdamW and LR schedule, in one process), lr 1e-3 after a 10-step warmup, 32 traces a "
        "step, student log-probs of the current model (`student_ref: current`).\n",
        "## Verdict (as measured)\n",
        verdict_text(res),
        "## Run\n",
        _setup_text(res),
        "## Arms\n",
        arms + "\n\n" + chosen_line + "\n\n" + same_line + "\n",
        f"## At the last step ({res['plan']['steps']} steps), mean ± sd over seeds\n",
        final_table(res),
        "## Learning curves\n",
        f"![learning curves]({curves_png})\n",
        "Greedy accuracy on the eval problems:\n",
        curve_table(res, "greedy_acc"),
        "\nSampled (T = 1) accuracy:\n",
        curve_table(res, "sampled_acc"),
        "\nPrior kept (greedy accuracy on lists of the student's 24 known codes only):\n",
        curve_table(res, "prior_acc"),
        "\nExAccErr(16) in %:\n",
        curve_table(res, "exacc_16", 1),
        f"\n## Weights of the best weighted arm (`{res.get('best_weighted')}`)\n",
        f"![weight histogram]({weights_png})\n",
        "Every arm's per-token weights (all steps, all seeds):\n",
        weights_table(res),
        "## The tune arm\n",
        _tune_text(res),
        "## Measures\n",
        MEASURES,
        "\n### ExAccErr\n",
        FORMULA + "\n",
    ]
    return "\n".join(parts)


MEASURES = """- greedy / sampled accuracy: share of the eval problems (lists over all 40 codes, none
  in the traces) whose answer after `####` is right, greedy or one T = 1 sample each.
- TF-predicted: share of eval problems whose every gold response token is the student's
  argmax under teacher forcing; the exposure gap is TF-predicted minus greedy accuracy.
- derailed: the scratchpad left the task's form (a line not `<code><digit>=<digit>`, a code
  out of the prompt's order, a missing or extra line, no `####` answer).
- length spread: root mean square of (step lines written - codes in the list), sampled.
- prior kept: greedy accuracy on lists of the student's 24 known codes only (it starts
  near 1: what distillation must not break)."""
