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
    "eaft": "sft times EAFT's entropy gate min(1, H / 3) (H: the student's entropy, nats)",
    "eaft_conflict": "sft with confident conflicts suppressed (p_S < 0.1 and H < 1 nat: "
    "a smooth AND of the two)",
    "das_token_mix": "0.5 + 0.5 das_token (an NLL mix halfway to sft)",
    "dasd_sft": "sft on the candidate DASD selection picks (of 2 at T = 1)",
    "stages_sft": "sft: first half on T = 0.6 traces, second half on T = 1 traces, one optimizer",
    "stages_best": "the same stages with the best weighted preset",
    "risky_floor": "the riskiest weighted preset with floor 0.3",
    "risky_warmup": "the riskiest weighted preset, uniform weights for its first 20 steps",
    "tune": "the Ray Tune choice (validation split; sft unless a trial beats it beyond noise)",
    "opd": "on-policy distillation from the initial student: rounds of up to 10 steps, each "
    "on the current student's own T = 1 answers to its steps x batch-size trace prompts "
    "(truncated ones dropped), scored by the teacher, weighted by raydc's `opd` preset (the per-token "
    "advantage log p_T - log p_samp times the importance ratio clipped at 2)",
    "offline_opd": "the best weighted preset on the T = 1 traces for half the steps, then "
    "opd's rounds for the other half, one optimizer (the offline-then-on-policy recipe)",
    "opd_low_lr": "opd with its steps at a tenth of the regime's learning rate",
    "offline_opd_low_lr": "offline_opd with its on-policy steps at a tenth of the regime's "
    "learning rate (the offline half at the full rate)",
    "opd_baseline": "opd_low_lr with the `opd_baseline` preset: the step's mean advantage "
    "subtracted from each token's (the same expected gradient, no constant push-down)",
    "offline_opd_baseline": "offline_opd_low_lr with the `opd_baseline` preset in its "
    "on-policy half",
    "offline_opd_baseline_full_lr": "offline_opd_baseline with its on-policy half at the "
    "regime's own learning rate (offline_opd with the baseline)",
}

FLOPS_TEXT = (
    "FLOPs (`bench/quality/flops.py`): 2 x params per forward token, 6 x the student's params "
    "per trained token (params with the embeddings; attention's own FLOPs left out; real "
    "tokens, prompts included, no padding). Training counts every step's rows. An offline "
    "trace costs its teacher generation and one forward of it under the teacher and one "
    "under the student (every trace set is scored under both); a DASD pick also carries its "
    "prompt's other candidate; an arm pays for a trace the first time one of its batches "
    "draws it (by the last step nearly every trace has been drawn). An on-policy round costs "
    "the student's generation of every sample (truncated ones included) and the teacher's "
    "scoring of the samples kept; the sampling log-probs come with the generation. Not "
    "counted for any arm: the evaluations and the tune arm's search."
)

# Each regime's definition and motivation, written before any of its results (issue 30).
REGIME_TEXT = {
    "knowledge": (
        "**K, knowledge gap.** The embedded default's task and models (raydc/assets/sumtask): "
        "a running sum mod 10 over lists of 2-6 codes, each worth a digit. The shipped teacher "
        "(Qwen2 192 x 3) knows all 40 codes; the shipped student (128 x 2) was trained where "
        "only 24 exist. Its held-out accuracy on lists over all 40 codes is low at the start, "
        "and training on the teacher's traces teaches it the missing values: the tokens that "
        "carry them are exactly those the student finds unlikely. The literature's "
        "'model-weak' cell, where NLL is expected to beat prior-leaning objectives."
    ),
    "capacity": (
        "**C, capacity gap.** The student already knows every code: the shipped student "
        "fine-tuned on lists of all 40 codes, 2-6 long, one line per code "
        "(scripts/build_regimes.py, `student_all`). The teacher (`teacher_terse`) writes each "
        "line without the code's value, `sux=9`: the value's lookup and the addition merged "
        "into one token, a step the student was never taught to take at once (it writes "
        "`sux9=9`): DASD's second mismatch, teacher outputs beyond the student's capacity. "
        "(A teacher adding two codes a line, `sus0+sux9=9`, was tried first and could not "
        "learn it itself: 0.15 on 4 codes; it is not used.) Traces and eval: lists of 2-6 codes "
        "over all 40. The initial student is already strong; what is measured is what "
        "imitating the terse steps costs or gains it, and which weighting keeps its own "
        "competent way. The 'model-strong' cell, where prior-leaning objectives are "
        "expected to beat NLL."
    ),
    "long": (
        "**L, long horizon.** The same student (every code known, taught on lists of 2-6); "
        "the teacher (`teacher_long`) was taught lists of 2-16. Traces and eval: lists of "
        "8-16 codes, several times the student's, 60-110 response tokens. One wrong running "
        "sum makes every later line wrong, so errors compound along the student's own "
        "prefixes (DisCorD's drift; ExAccErr measures it). Arms take 120 steps of 16 "
        "traces (about the trained tokens of K's 200 x 32) with a 160-token answer budget."
    ),
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
response tokens (a length is not estimated with fewer than 10). In K and C
responses are 16 to 45 tokens (2 to 6 codes), so l = 16 covers nearly every sample and
l = 32 the lists of 5-6 codes; in L (60-110 tokens) both cover every sample."""


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


def curve_table(res: dict, key: str = "", digits: int = 3, cell=None) -> str:
    """One row per arm, one column per eval step: ``key``'s mean ± sd, or ``cell(row)``."""
    cell = cell or (lambda r: _ms(r, key, digits))
    steps = sorted({r["step"] for r in res["rows"]})
    head = "| arm | " + " | ".join(f"step {s}" for s in steps) + " |\n"
    head += "|---" * (len(steps) + 1) + "|\n"
    lines = []
    for arm in res["arms"]:
        by = {r["step"]: r for r in res["rows"] if r["arm"] == arm}
        if by:
            cells = [cell(by[s]) if s in by else "" for s in steps]
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
        "dasd_sft also needed a second teacher sample a prompt, the stages a T = 0.6 set, the "
        "tune arm its search (below), and the on-policy arms their own samples and the "
        "teacher's scoring of them (the arms at matched FLOPs: below, Compute).",
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
    lines.append(_compare(res, "prior_acc", "Prior kept (the lists taught before)"))
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
        if not h or not sum(h) or is_opd(arm):
            continue
        n = sum(h)
        mids = [(a + b) / 2 for a, b in zip(bins, bins[1:])]
        mean = sum(c * m for c, m in zip(h, mids)) / n
        low = sum(c for c, a in zip(h, bins) if a < 0.5) / n
        high = sum(c for c, a in zip(h, bins) if a >= 1.5) / n
        out.append(f"| {arm} | {mean:.2f} | {low:.3f} | {1 - low - high:.3f} | {high:.3f} |")
    note = (
        f"Weights are binned in steps of {bins[1] - bins[0]:.1f} (the mean uses bin middles; "
        "the last bin holds every weight above it); the weight-warmup steps count as weight 1. "
        "The on-policy arms are left out: their weights are signed (the advantage), and the "
        "histogram's bins hold none below 0."
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
    lines += _added_lines(res)
    if init:
        lines.append(
            f"- The initial student (step 0): greedy {_ms(init, 'greedy_acc')}, sampled "
            f"{_ms(init, 'sampled_acc')}, on the lists taught before {_ms(init, 'prior_acc')}."
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


def _load_text(load: dict) -> str:
    return (
        f"1-min load average mean {_f(load.get('load1_mean'), 2)}, "
        f"{_f(load.get('ours_cores_mean'), 2)} cores used, other processes "
        f"{_f(load.get('foreign_cores_mean'), 2)} (contended: {load.get('contended')})"
    )


def _added_lines(res: dict) -> list[str]:
    """The arms added to the finished run (``--add-arms``), each addition's command, time
    and load, and what was recomputed for the run's folder first."""
    out = []
    for a in res.get("added", []):
        skipped = f", {len(a['skipped'])} not started (deadline)" if a.get("skipped") else ""
        out.append(
            f"- Added later: {', '.join(f'`{x}`' for x in a['arms'])} ({len(a['jobs'])} jobs"
            f"{skipped}) by `{a['command']}` on the run's data and trace sets (finished "
            f"{a['finished']}; {a['wall_s'] / 60:.1f} min; {_load_text(a['load'])})."
        )
        note = a.get("backfill") or {}
        recs = note.get("records")
        if recs:
            per_arm = ", ".join(f"{k} {v}" for k, v in recs["per_arm"].items())
            out.append(
                f"  The run's records predate FLOPs: {recs['records']} records ({per_arm}) "
                "got them by replaying each job's batch draws from its seed without "
                "training (`bench/quality/backfill.py`); records.jsonl was rewritten with "
                "them."
                + (
                    f" Left without: {recs['left_without']} (an on-policy job, or a trace set "
                    "whose costs were not recovered)."
                    if recs.get("left_without")
                    else ""
                )
            )
        for name, how in (note.get("trace_costs") or {}).items():
            out.append(f"  Trace set `{name}`'s per-row costs: {how}.")
        if note.get("trace_prompts"):
            out.append(f"  The on-policy arms' trace prompts: {note['trace_prompts']}.")
    return out


def _tune_text(res: dict) -> str:
    tune = res.get("tune")
    if not tune:
        return "The tune arm was not run.\n"
    rows = sorted(tune["trials"], key=lambda r: -(r["val_accuracy"] or 0))
    keys = [k for k in rows[0] if k not in ("val_accuracy", "val_seeds")]
    seeds = tune.get("seeds", 1)
    kept = (
        "no trial beat the sft point by more than the noise of the comparison "
        f"({_f(tune.get('margin'), 3)}), so the sft point was kept"
        if tune.get("kept_baseline")
        else f"it beat the sft point by more than the noise ({_f(tune.get('margin'), 3)})"
    )
    out = [
        f"Ray Tune ({len(rows)} trials, the sft point first then random search, 2 at a time, "
        f"{seeds} training seeds each (the same seeds in every trial), the full "
        f"{res['plan']['steps']} steps, mean greedy accuracy on {res['data']['val_n']} "
        f"validation problems disjoint from the eval set) over the token-level sigmoid family "
        f"2 sigmoid(sign * (log p_S - log p_T) / tau), self-normalised, with an entropy gate "
        f"(none | conflict) and an NLL mix (nll_mix = 1 is sft). Cost: {len(rows)} trials x "
        f"{seeds} seeds x {res['plan']['steps']} steps = {tune.get('cost_steps')} optimizer "
        f"steps ({tune['wall_s']:.0f} s), on top of the tune arm's matched "
        f"{res['plan']['steps']} steps. Chosen: `{tune['chosen_fields']}`: {kept}.",
        "",
        "| " + " | ".join(keys) + " | val. accuracy (mean) | per seed |",
        "|---" * (len(keys) + 2) + "|",
    ]
    out += [
        "| "
        + " | ".join(str(r[k]) for k in keys)
        + f" | {_f(r['val_accuracy'])} | {', '.join(_f(x) for x in r.get('val_seeds') or [])} |"
        for r in rows
    ]
    return "\n".join(out) + "\n"


def is_opd(arm: str) -> bool:
    """An on-policy distillation arm (issue 32: their names carry "opd")."""
    return "opd" in arm


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _tf(x) -> str:
    """FLOPs in TFLOPs, 3 significant digits."""
    x = _finite(x)
    return "n/a" if x is None else f"{x / 1e12:.3g}"


def matched_flops(res: dict, arm: str, ref: str = "sft") -> dict | None:
    """``arm`` at matched compute: its record at the eval step whose cumulative FLOPs
    (mean over seeds) is closest to ``ref``'s FLOPs at the last step, with its greedy
    accuracy against ``ref``'s final one in pooled seed spreads. None without FLOPs."""
    steps = res["plan"]["steps"]
    base = next((r for r in res["rows"] if r["arm"] == ref and r["step"] == steps), None)
    target = _finite(base.get("flops")) if base else None
    rows = [r for r in res["rows"] if r["arm"] == arm and _finite(r.get("flops")) is not None]
    if not target or not rows:
        return None
    r = min(rows, key=lambda x: abs(x["flops"] - target))
    sd, ref_sd = r["greedy_acc_sd"] or 0.0, base["greedy_acc_sd"] or 0.0
    pooled = math.sqrt((sd**2 + ref_sd**2) / 2)
    diff = r["greedy_acc"] - base["greedy_acc"]
    return {
        "ref": ref,
        "ref_flops": target,
        "ref_greedy_mean": base["greedy_acc"],
        "ref_greedy_sd": ref_sd,
        "step": r["step"],
        "flops": r["flops"],
        "ratio": r["flops"] / target,
        "greedy_mean": r["greedy_acc"],
        "greedy_sd": sd,
        "seeds": r["seeds"],
        "diff": diff,
        "spreads": diff / pooled if pooled > 0 else float("nan"),
    }


def _flops_curve_table(res: dict) -> str:
    return curve_table(res, cell=lambda r: f"{_f(r['greedy_acc'])} @ {_tf(r.get('flops'))}")


def compute_text(res: dict, flops_png: str | None) -> str:
    """The arms' FLOPs, the on-policy arms at sft's FLOPs, their rounds, the curves."""
    steps = res["plan"]["steps"]
    final = {r["arm"]: r for r in res["rows"] if r["step"] == steps}
    parts = res.get("flops_parts") or {}
    sft_f = _finite((final.get("sft") or {}).get("flops"))
    out = [FLOPS_TEXT, ""]
    out.append(
        "| arm | TFLOPs at the last step (mean over seeds) | x sft's | generation | teacher "
        "scoring | student scoring | training | greedy acc. |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for arm in res["arms"]:
        r = final.get(arm)
        if r is None:
            continue
        p, f = parts.get(arm, {}), _finite(r.get("flops"))
        ratio = _f(f / sft_f, 2) if f is not None and sft_f else "n/a"
        cells = [_tf(p.get(k)) for k in ("generation", "teacher_scoring", "student_scoring")]
        out.append(
            f"| {arm} | {_tf(f)} | {ratio} | " + " | ".join(cells) + f" | {_tf(p.get('training'))} "
            f"| {_ms(r, 'greedy_acc')} |"
        )
    opd = [a for a in res["arms"] if is_opd(a)]
    matched = {a: m for a in opd if (m := matched_flops(res, a)) is not None}
    if matched:
        out += [
            "",
            "**Matched FLOPs.** For each on-policy arm, its greedy accuracy at the eval step "
            "whose cumulative FLOPs (mean over seeds) is closest to sft's at the last step, "
            "against sft's final accuracy (in pooled seed spreads); the eval steps are few, so "
            "the FLOPs match only as closely as the ratio shows.",
            "",
            "| arm | eval step | its FLOPs / sft's | greedy acc. there | sft's final | minus sft "
            "| in pooled seed spreads |",
            "|---|---|---|---|---|---|---|",
        ]
        for a, m in matched.items():
            out.append(
                f"| {a} | {m['step']} | {_f(m['ratio'], 2)} | {_f(m['greedy_mean'])} ± "
                f"{_f(m['greedy_sd'])} | {_f(m['ref_greedy_mean'])} ± {_f(m['ref_greedy_sd'])} "
                f"| {_f(m['diff'])} | {_f(m['spreads'], 1)} |"
            )
    rounds = res.get("on_policy") or {}
    if rounds:
        out += [
            "",
            "On-policy rounds (per seed, mean over seeds; the rates over every round). Truncated "
            "samples (no EOS within the answer budget) are dropped before the teacher scores and "
            "never trained on; the reverse KL is the mean of log p_samp - log p_T over the kept "
            "samples' tokens.",
            "",
            "| arm | rounds | samples | truncated (not trained on) | EOS rate | mean sampled "
            "length | reverse KL, first round | last round |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for a, x in rounds.items():
            out.append(
                f"| {a} | {_f(x['rounds'], 1)} | {_f(x['samples'], 1)} | {_f(x['truncated'], 1)} "
                f"| {_f(x['eos_rate'])} | {_f(x['mean_length'], 1)} | "
                f"{_f(x['reverse_kl_first'])} | {_f(x['reverse_kl_last'])} |"
            )
    if flops_png:
        out += ["", f"![accuracy over FLOPs]({flops_png})"]
    out += ["", "Greedy accuracy @ cumulative TFLOPs at each eval step:", ""]
    out.append(_flops_curve_table(res))
    return "\n".join(out) + "\n"


def results_markdown(
    res: dict, curves_png: str, weights_png: str, flops_png: str | None = None
) -> str:
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
        f"# Quality benchmark, regime {res['regime']['name']}: results\n",
        "The overview of the three regimes is [docs/results.md](../results.md).\n",
        "Generated by `jobs/benchmark_quality.py --docs docs` from the run's results.json "
        "(`bench/quality/results_md.py`); no figure here is edited by hand.\n",
        REGIME_TEXT[res["regime"]["name"]] + " Every arm fine-tunes the same student through "
        "the trainer's step (`bench.quality.finetune`: the trainer's MicroBatch, weights, loss, "
        f"AdamW and LR schedule, in one process), lr 1e-3 after a 10-step warmup, "
        f"{res['plan']['sizes']['batch_size']} traces a step, student log-probs and entropy of "
        "the current model (`student_ref: current`).\n",
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
        "\nPrior kept (greedy accuracy on the lists the student was taught before):\n",
        curve_table(res, "prior_acc"),
        "\nExAccErr(16) in %:\n",
        curve_table(res, "exacc_16", 1),
        "\n## Compute: FLOPs, and the on-policy arms at matched FLOPs\n",
        compute_text(res, flops_png),
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
- derailed: the scratchpad left the task's form (a line neither `<code><digit>=<digit>` nor
  `<code><digit>+<code><digit>=<digit>`, codes out of the prompt's order, a missing or extra
  code, no `####` answer).
- length spread: root mean square of (step lines written - codes in the list), sampled.
- prior kept: greedy accuracy on lists like those the student was taught (K: its 24 known
  codes; C and L: all codes, 2-6 long); it starts near 1: what distillation must not break."""


# ----------------------------------------------------------------------------- overview

ENTROPY_ARMS = ("eaft", "eaft_conflict", "das_token_mix")
UNWEIGHTED = ("sft", "dasd_sft", "stages_sft", "tune")


def _final(res: dict) -> dict:
    """The verdict's per-arm figures, with a spread JSON stored as null (NaN) as NaN."""
    return {
        a: {**x, "spreads": float("nan") if x["spreads"] is None else x["spreads"]}
        for a, x in res["verdict"].get("vs_sft", {}).items()
    }


def _best_weighted(res: dict) -> str | None:
    """The best offline-weighted arm (neither unweighted nor on-policy)."""
    d = _final(res)
    arms = [a for a in d if a not in UNWEIGHTED and not is_opd(a)]
    return max(arms, key=lambda a: d[a]["mean"]) if arms else None


def _spread(res: dict, a: str, b: str) -> float:
    """(mean_a - mean_b) in units of the two arms' pooled seed spread."""
    d = _final(res)
    pooled = math.sqrt((d[a]["sd"] ** 2 + d[b]["sd"] ** 2) / 2)
    return (d[a]["mean"] - d[b]["mean"]) / pooled if pooled > 0 else float("nan")


def overview_json(runs: dict[str, dict]) -> dict:
    """docs/results.json: per regime, every arm's final greedy accuracy over seeds (mean,
    sd, seeds; the sampled accuracy too) and its total FLOPs (``flops``, mean over seeds;
    generation and scoring included), the tune arm, the entropy-aware arms, the on-policy
    arms (names with "opd") and each one at sft's FLOPs (``matched_flops``)."""
    out: dict = {"regimes": {}}
    for name, res in runs.items():
        steps = res["plan"]["steps"]
        final = {r["arm"]: r for r in res["rows"] if r["step"] == steps}
        init = next((r for r in res["rows"] if r["step"] == 0), None)
        arms = {
            arm: {
                "mean": r["greedy_acc"],
                "sd": r["greedy_acc_sd"],
                "seeds": r["seeds"],
                "per_seed": r["greedy_acc_per_seed"],
                "sampled_mean": r["sampled_acc"],
                "sampled_sd": r["sampled_acc_sd"],
                "prior_mean": r["prior_acc"],
                "steps": steps,
                "batch_size": res["plan"]["sizes"]["batch_size"],
                "flops": _finite(r.get("flops")),
            }
            for arm, r in final.items()
        }
        tune = res.get("tune") or {}
        out["regimes"][name] = {
            "arms": arms,
            "tune_arm": "tune",
            "tune_choice": tune.get("chosen_fields"),
            "tune_cost_steps": tune.get("cost_steps"),
            "entropy_arms": [a for a in ENTROPY_ARMS if a in arms],
            "opd_arms": [a for a in arms if is_opd(a)],
            "matched_flops": {
                a: m for a in arms if is_opd(a) and (m := matched_flops(res, a)) is not None
            },
            "initial_greedy": init["greedy_acc"] if init else None,
            "summary": res["regime"]["summary"],
        }
    return out


def _regime_rows(name: str, res: dict) -> list[str]:
    d = _final(res)
    best, bw = res["verdict"]["best"], _best_weighted(res)
    init = next((r for r in res["rows"] if r["step"] == 0), None)
    ent = [a for a in ENTROPY_ARMS if a in d]
    ent_txt = ", ".join(f"{a} {_f(d[a]['mean'])} ({_f(d[a]['spreads'], 1)})" for a in ent)
    tune = (
        f"{_f(d['tune']['mean'])} ({_f(d['tune']['spreads'], 1)} vs sft, "
        f"{_f(_spread(res, 'tune', best), 1)} vs {best})"
        if "tune" in d
        else "-"
    )
    bw_txt = f"{bw} {_f(d[bw]['mean'])} ({_f(d[bw]['spreads'], 1)})" if bw else "-"
    return [
        f"| {name} | {_f(init['greedy_acc']) if init else '-'} | {_f(d['sft']['mean'])} ± "
        f"{_f(d['sft']['sd'])} | {best} {_f(d[best]['mean'])} ({_f(d[best]['spreads'], 1)}) | "
        f"{bw_txt} | {ent_txt} | {tune} |"
    ]


def _goals(runs: dict[str, dict]) -> list[str]:
    lines = []
    tune_ok = []
    for name, res in runs.items():
        d = _final(res)
        if "tune" not in d or "sft" not in d:
            continue
        vs_best = _spread(res, "tune", res["verdict"]["best"])
        ok = vs_best >= -1 and d["tune"]["spreads"] >= -1
        tune_ok.append(ok)
        lines.append(
            f"- {name}: Tune's choice is {_f(vs_best, 1)} spreads from the best arm and "
            f"{_f(d['tune']['spreads'], 1)} from sft: {'met' if ok else 'NOT met'} (within 1 "
            "spread of the best, not below sft by more than 1)."
        )
    wins = {
        name: (bw, _final(res)[bw]["spreads"])
        for name, res in runs.items()
        if (bw := _best_weighted(res)) is not None
    }
    beat2 = [f"{n} ({a}, {_f(s, 1)})" for n, (a, s) in wins.items() if s >= 2]
    lines.append(
        "- A weighted arm beats sft by 2 or more spreads in at least one regime: "
        + (f"met in {', '.join(beat2)}." if beat2 else "NOT met in any regime measured.")
    )
    if "knowledge" in runs:
        d = _final(runs["knowledge"])
        ent = {a: d[a]["spreads"] for a in ENTROPY_ARMS if a in d}
        ok = [a for a, s in ent.items() if s >= -1]
        lines.append(
            "- In K the entropy-aware presets stay within 1 spread of sft: "
            + ", ".join(f"{a} {_f(s, 1)}" for a, s in ent.items())
            + (
                f" ({'all' if len(ok) == len(ent) else len(ok)} of {len(ent)} met)."
                if ent
                else " (not run)."
            )
        )
    return lines


def _opd_section(runs: dict[str, dict]) -> list[str]:
    """The on-policy arms against sft in each regime, at matched steps and matched FLOPs."""
    rows = []
    for name, res in runs.items():
        d = _final(res)
        if "sft" not in d:
            continue
        steps = res["plan"]["steps"]
        final = {r["arm"]: r for r in res["rows"] if r["step"] == steps}
        sft_f = _finite(final["sft"].get("flops")) if "sft" in final else None
        for a in [a for a in d if is_opd(a)]:
            m = matched_flops(res, a)
            f = _finite(final[a].get("flops")) if a in final else None
            at = (
                f"{_f(m['greedy_mean'])} at step {m['step']} ({_f(m['ratio'], 2)} x sft's FLOPs; "
                f"{_f(m['spreads'], 1)})"
                if m
                else "-"
            )
            rows.append(
                f"| {name} | {_f(d['sft']['mean'])} ± {_f(d['sft']['sd'])} ({_tf(sft_f)}) | {a} "
                f"| {_f(d[a]['mean'])} ± {_f(d[a]['sd'])} ({_f(d[a]['spreads'], 1)}; "
                f"{_tf(f)}) | {at} |"
            )
    if not rows:
        return []
    return [
        "## On-policy distillation: matched steps, matched FLOPs\n",
        "Greedy accuracy, mean ± sd over seeds, in brackets the difference to sft in pooled "
        "seed spreads and the arm's TFLOPs (generation, scoring and training; "
        "bench/quality/flops.py). Matched steps: at the last step, every arm having taken the "
        "same optimizer steps of the same batch size. Matched FLOPs: the on-policy arm at its "
        "eval step whose cumulative FLOPs (mean over seeds) is closest to sft's at the last "
        "step, against sft's final accuracy; the ratio says how close the match is.\n",
        "| regime | sft (TFLOPs) | on-policy arm | matched steps (vs sft; TFLOPs) "
        "| matched FLOPs (vs sft's final) |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def overview_markdown(runs: dict[str, dict]) -> str:
    parts = [
        "# Quality benchmark: results in three regimes\n",
        "Generated by `jobs/benchmark_quality.py --docs docs` from each regime's results.json "
        "(`bench/quality/results_md.py`); no figure here is edited by hand. Every regime's "
        "details (arms, curves, weights, the tune search, the load during the run) are in "
        "docs/results/<regime>.md; the figures behind the verdicts are in docs/results.json.\n",
        "## The regimes\n",
        "Each regime was defined, and its models built, before any arm ran on it. The task is "
        "the embedded default's: a running sum mod 10 over a list of three-letter codes, each "
        "worth a digit, one scratchpad line per code, the answer after `####`.\n",
        *[REGIME_TEXT[n] + "\n" for n in REGIME_TEXT],
        "## Verdicts\n",
        "Final greedy accuracy, mean ± sd over seeds; in brackets the difference to sft in "
        "pooled seed spreads (sqrt((sd_a^2 + sd_sft^2) / 2)). Every arm takes the same "
        "optimizer steps on the same number of traces within a regime.\n",
        "| regime | initial student | sft | best arm | best weighted arm | entropy-aware arms "
        "| tune (vs sft, vs best) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in runs.items():
        parts += _regime_rows(name, res)
    missing = [n for n in REGIME_TEXT if n not in runs]
    if missing:
        parts.append(f"\nNot run yet: {', '.join(missing)}.")
    parts += ["", *_opd_section(runs)]
    parts += ["", "## The issue's goals, as measured\n", *_goals(runs), ""]
    for name, res in runs.items():
        parts.append(
            f"- [{name}](results/{name}.md): {res['plan']['seeds']} seeds, "
            f"{res['plan']['steps']} steps of {res['plan']['sizes']['batch_size']}, "
            f"{res['wall_s'] / 60:.1f} min, contended: {res.get('contended')}"
            + "".join(
                f"; {', '.join(a['arms'])} added later ({a['wall_s'] / 60:.1f} min, "
                f"contended: {a['load'].get('contended')})"
                for a in res.get("added", [])
            )
            + "."
        )
    return "\n".join(parts) + "\n"
