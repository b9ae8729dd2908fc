"""The benchmark's report: per-(arm, step) aggregates over seeds, the verdict, the plots,
results.json, table.md, and (``bench.quality.results_md``) docs/results.md."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench.quality.flops import mean_parts
from bench.quality.jobs import WEIGHT_BINS
from bench.quality.results_md import overview_json, overview_markdown, results_markdown
from bench.quality.run import ARMS, OPD_ARMS, PRESET_ARMS, write_json_safe
from bench.quality.task import REGIMES

if TYPE_CHECKING:
    from bench.machine import LoadMonitor
    from bench.quality.run import BenchmarkRun, Plan


def _num(x) -> float:
    return float("nan") if x is None else float(x)


# (key, getter) of the per-seed figures results.json aggregates.
METRICS: dict[str, Callable[[dict], float]] = {
    "greedy_acc": lambda r: r["greedy"]["accuracy"],
    "sampled_acc": lambda r: r["sampled"]["accuracy"],
    "derailed_greedy": lambda r: r["greedy"]["derailed"],
    "derailed_sampled": lambda r: r["sampled"]["derailed"],
    "lines_error_sd": lambda r: r["sampled"]["lines_error_sd"],
    "length_mean": lambda r: r["length_mean"],
    "prior_acc": lambda r: r["prior_accuracy"],
    "tf_predicted": lambda r: r["teacher_forced"]["predicted_accuracy"],
    "exposure_gap": lambda r: r["exposure_gap"],
    "exacc_16": lambda r: _num(r["exacc_err"]["16"]),
    "exacc_32": lambda r: _num(r["exacc_err"]["32"]),
    # the arm's cumulative FLOPs at the record's step (bench.quality.flops)
    "flops": lambda r: _num(r.get("flops")),
}


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN if none)."""
    xs = [x for x in xs if math.isfinite(x)]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def aggregate(records: Sequence[dict]) -> list[dict]:
    """One row per (arm, step): mean, sd and per-seed values of each metric. Every arm's
    step 0 is the initial student's record of the same seed (arm ``initial``)."""
    initial = {r["seed"]: r for r in records if r["arm"] == "initial"}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["arm"] != "initial":
            groups.setdefault((r["arm"], r["step"]), []).append(r)
    for arm in {a for a, _ in groups}:
        seeds = {r["seed"] for (a, _), rs in groups.items() if a == arm for r in rs}
        if any(s in initial for s in seeds):
            groups[(arm, 0)] = [initial[s] for s in sorted(seeds) if s in initial]
    rows = []
    for (arm, step), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        row = {"arm": arm, "step": step, "seeds": len(rs)}
        for name, get in METRICS.items():
            vals = [float(get(r)) for r in rs]
            row[name], row[name + "_sd"] = mean_sd(vals)
            row[name + "_per_seed"] = vals
        rows.append(row)
    order = {a: i for i, a in enumerate(ARMS)}
    return sorted(rows, key=lambda r: (order.get(r["arm"], 99), r["step"]))


def verdict(rows: Sequence[dict], steps: int, metric: str = "greedy_acc") -> dict:
    """At the last step: each arm's mean minus sft's, in units of the two arms' pooled
    seed spread (sqrt((sd_a^2 + sd_sft^2) / 2)); the best arm by mean."""
    final = {r["arm"]: r for r in rows if r["step"] == steps}
    if not final:
        return {}
    best = max(final, key=lambda a: final[a][metric])
    out = {"metric": metric, "steps": steps, "best": best, "vs_sft": {}}
    if "sft" in final:
        s = final["sft"]
        for arm, r in final.items():
            pooled = math.sqrt((r[metric + "_sd"] ** 2 + s[metric + "_sd"] ** 2) / 2)
            diff = r[metric] - s[metric]
            out["vs_sft"][arm] = {
                "mean": r[metric],
                "sd": r[metric + "_sd"],
                "diff": diff,
                "spreads": diff / pooled if pooled > 0 else float("nan"),
            }
    return out


def best_weighted(rows: Sequence[dict], steps: int) -> str | None:
    """The arm with the highest final greedy accuracy among those whose weights of the
    offline traces vary (the on-policy arms' signed weights are another method)."""
    skip = ("sft", "dasd_sft", "stages_sft", *OPD_ARMS)
    final = [r for r in rows if r["step"] == steps and r["arm"] not in skip]
    return max(final, key=lambda r: r["greedy_acc"])["arm"] if final else None


def weight_hists(records: Sequence[dict]) -> dict[str, list[int]]:
    """Per arm, the loss tokens' weight counts in WEIGHT_BINS summed over its seeds."""
    out: dict[str, list[int]] = {}
    seen = set()
    for r in records:
        key = (r["arm"], r["seed"])
        if r["arm"] == "initial" or key in seen:
            continue
        seen.add(key)
        h = r["train"]["weight_hist"]
        out[r["arm"]] = [a + b for a, b in zip(out.get(r["arm"], [0] * len(h)), h)]
    return out


def flops_parts(records: Sequence[dict], steps: int) -> dict[str, dict[str, float]]:
    """Per arm, its FLOPs at the last step by part (and the total), mean over seeds."""
    arms = {r["arm"] for r in records if r["arm"] != "initial"}
    out = {}
    for arm in arms:
        parts = mean_parts([r for r in records if r["arm"] == arm and r["step"] == steps])
        if parts:
            out[arm] = parts
    return out


def on_policy_summary(records: Sequence[dict]) -> dict[str, dict]:
    """Per on-policy arm, its rounds over seeds: per seed (mean) the rounds, samples,
    truncated ones (never trained on) and trained ones; over every round of every seed the
    mean EOS rate, truncation share and sampled length; the mean reverse KL (sampling
    policy to teacher, kept samples) of the first and the last round."""
    runs: dict[str, dict] = {}
    for r in records:
        op = (r.get("train") or {}).get("on_policy")
        if op:
            runs.setdefault(r["arm"], {})[r["seed"]] = op
    out = {}
    for arm, by_seed in runs.items():
        ops = list(by_seed.values())
        rounds = [x for op in ops for x in op["rounds"]]

        def mean(xs):
            return mean_sd([float(x) for x in xs])[0]

        out[arm] = {
            "seeds": len(ops),
            "rounds": mean([len(op["rounds"]) for op in ops]),
            "samples": mean([op["samples"] for op in ops]),
            "truncated": mean([op["truncated"] for op in ops]),
            "trained_samples": mean([op["trained_samples"] for op in ops]),
            "eos_rate": mean([x["eos_rate"] for x in rounds]),
            "truncation_share": mean([x["truncated"] / x["samples"] for x in rounds]),
            "mean_length": mean([x["mean_length"] for x in rounds]),
            "reverse_kl_first": mean([_num(op["rounds"][0]["mean_reverse_kl"]) for op in ops]),
            "reverse_kl_last": mean([_num(op["rounds"][-1]["mean_reverse_kl"]) for op in ops]),
        }
    return out


CURVES = [
    ("greedy_acc", "greedy accuracy (eval)"),
    ("sampled_acc", "sampled accuracy, T = 1"),
    ("prior_acc", "prior kept: known-code lists"),
    ("derailed_sampled", "derailed share (sampled)"),
    ("exacc_16", "ExAccErr(16) %"),
    ("lines_error_sd", "length spread: line-count error rms"),
]


def plot_curves(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Learning curves: mean over seeds with a +- sd band, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    cmap = plt.get_cmap("tab20")
    for ax, (key, title) in zip(axes.flat, CURVES):
        for i, arm in enumerate(arms):
            rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["step"])
            xs = [r["step"] for r in rs]
            m = [r[key] for r in rs]
            sd = [r[key + "_sd"] for r in rs]
            style = "-" if arm in PRESET_ARMS else "--"
            ax.plot(xs, m, style, marker="o", ms=3, color=cmap(i), label=arm)
            ax.fill_between(
                xs,
                [a - b for a, b in zip(m, sd)],
                [a + b for a, b in zip(m, sd)],
                color=cmap(i),
                alpha=0.08,
            )
        ax.set_title(title)
        ax.set_xlabel("optimizer steps")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_flops(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Greedy and sampled accuracy over each arm's cumulative FLOPs (mean over seeds at each
    eval step, generation and scoring included; bench.quality.flops), one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    cmap = plt.get_cmap("tab20")
    for ax, (key, title) in zip(axes, CURVES[:2]):
        for i, arm in enumerate(arms):
            rs = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["step"])
            rs = [r for r in rs if r.get("flops") is not None and math.isfinite(r["flops"])]
            if not rs:
                continue
            style = "-" if arm in OPD_ARMS else ("--" if arm not in PRESET_ARMS else ":")
            ax.plot(
                [r["flops"] / 1e12 for r in rs],
                [r[key] for r in rs],
                style,
                marker="o",
                ms=3,
                color=cmap(i),
                label=arm,
            )
        ax.set_title(f"{title} over compute")
        ax.set_xlabel("cumulative TFLOPs (generation, scoring, training)")
        ax.grid(alpha=0.3)
    if axes[0].lines:  # a run from before FLOPs were counted has none
        axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(hist: Sequence[int], arm: str, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    lefts = WEIGHT_BINS[:-1]
    ax.bar(lefts, hist, width=WEIGHT_BINS[1] - WEIGHT_BINS[0], align="edge")
    ax.set_yscale("log")
    ax.set_xlabel("per-token weight (the last bin holds weights >= 3.9)")
    ax.set_ylabel("loss tokens (all steps, all seeds)")
    ax.set_title(f"weights of {arm}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def from_records(records: Sequence[dict], steps: int) -> dict:
    """What results.json derives from the records (a run's last step ``steps``)."""
    rows = aggregate(records)
    return {
        "seeds_per_arm": {r["arm"]: r["seeds"] for r in rows if r["step"] == steps},
        "rows": rows,
        "verdict": verdict(rows, steps),
        "verdict_sampled": verdict(rows, steps, "sampled_acc"),
        "best_weighted": best_weighted(rows, steps),
        "weight_bins": WEIGHT_BINS.tolist(),
        "weight_hists": weight_hists(records),
        "flops_parts": flops_parts(records, steps),
        "on_policy": on_policy_summary(records),
    }


def build_results(run: BenchmarkRun, plan: Plan, load: dict, timings: dict, command: str) -> dict:
    return write_json_safe(
        {
            "command": command,
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "regime": {
                k: str(v) if isinstance(v, Path) else v for k, v in plan.regime.__dict__.items()
            },
            "plan": {**plan.__dict__, "regime": plan.regime.name, "steps": plan.steps},
            "arms": [a for a in ARMS if a in plan.arms],
            **from_records(run.records(), plan.steps),
            "timings": {k: v for k, v in timings.items() if k != "start"},
            "wall_s": time.time() - timings["start"],
            "load": load,
            "contended": load.get("contended"),
            "machine": {
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
            },
            **run.info,
        }
    )


def write_outputs(res: dict, out: Path, docs: str | None) -> None:
    """results.json, table.md, learning_curves.png, flops_curves.png, weights.png in
    ``out``; with ``docs``, results/<regime>.md and the plots (as results/<regime>_*.png)
    there too."""
    (out / "results.json").write_text(json.dumps(res, indent=1))
    name = res["regime"]["name"]
    targets = [(out, "learning_curves.png", "flops_curves.png", "weights.png")]
    if docs:
        names = (f"{name}_curves.png", f"{name}_flops.png", f"{name}_weights.png")
        targets.append((Path(docs) / "results", *names))
    for folder, curves, flops, weights in targets:
        folder.mkdir(parents=True, exist_ok=True)
        plot_curves(res["rows"], folder / curves)
        plot_flops(res["rows"], folder / flops)
        arm = res["best_weighted"]
        if arm:
            plot_weights(res["weight_hists"][arm], arm, folder / weights)
    md = results_markdown(
        res, f"{name}_curves.png", f"{name}_weights.png", flops_png=f"{name}_flops.png"
    )
    (out / "table.md").write_text(md)
    if docs:
        (Path(docs) / "results" / f"{name}.md").write_text(md)


def write_overview(root: Path, docs: Path) -> None:
    """docs/results.md (the regimes, the verdict of each, the goals) and docs/results.json
    (each regime's arms: final greedy mean, sd, seeds) from <root>/<regime>/results.json."""
    runs = {
        name: json.loads((root / name / "results.json").read_text())
        for name in REGIMES
        if (root / name / "results.json").is_file()
    }
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.md").write_text(overview_markdown(runs))
    (docs / "results.json").write_text(json.dumps(write_json_safe(overview_json(runs)), indent=1))


def write_report(run, plan, monitor: LoadMonitor, timings: dict, command: str, docs) -> dict:
    res = build_results(run, plan, monitor.stop(), timings, command)
    write_outputs(res, run.out, docs)
    run.log(f"report: {run.out / 'results.json'} ({res['wall_s']:.0f} s in all)")
    return res


def write_added(run: BenchmarkRun, res: dict, upgrade: dict, added: dict, docs) -> dict:
    """A finished run's report again after arms were added to it (``jobs/benchmark_quality.py
    --add-arms``): ``res`` (its results.json) keeps the run's command, plan, timings, load
    and choices; what the records give is derived again from every record (the run's and
    the added ones); ``added`` (the addition: arms, jobs, command, wall time, load) is
    appended to its ``added`` list; ``upgrade`` (``bench.quality.backfill.upgrade``:
    ``params``, and ``backfill``, what was recomputed for the folder) is kept under
    ``params`` and, when anything was, in ``added["backfill"]``."""
    res = dict(res)
    arms = set(res["arms"]) | set(added["arms"])
    res["arms"] = [a for a in ARMS if a in arms]
    res.update(from_records(run.records(), res["plan"]["steps"]))
    res["params"] = upgrade["params"]
    if upgrade["backfill"]:
        added = {**added, "backfill": upgrade["backfill"]}
    res["added"] = [*res.get("added", []), added]
    res = write_json_safe(res)
    write_outputs(res, run.out, docs)
    run.log(f"report: {run.out / 'results.json'} (arms added: {added['arms']})")
    return res


def rewrite(out: Path, docs: str | None) -> None:
    """The report again from finished runs' results.json (no new measurement): ``out`` is
    one regime's folder, or the root holding <regime>/ folders."""
    folders = [out] if (out / "results.json").is_file() else [out / n for n in REGIMES]
    for folder in folders:
        if (folder / "results.json").is_file():
            write_outputs(json.loads((folder / "results.json").read_text()), folder, docs)
    if docs and not (out / "results.json").is_file():
        write_overview(out, Path(docs))
