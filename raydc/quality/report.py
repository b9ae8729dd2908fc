"""The benchmark's report: aggregating records, the markdown table, the plot, and
``write_report`` (results.json, table.md, results.png, load.json)."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from raydc.quality.models import count_params, load_model
from raydc.quality.run import TUNE_BASE, TUNE_SPACE, write_json_safe

if TYPE_CHECKING:
    from raydc.quality.machine import LoadMonitor
    from raydc.quality.run import BenchmarkRun, Plan


def _msd(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, sd


# (column, getter) of the per-seed figures the table and results.json aggregate.
METRICS: dict[str, Callable[[dict], float]] = {
    "greedy_acc": lambda r: r["greedy"]["accuracy"],
    "sampled_acc": lambda r: r["sampled"]["accuracy"],
    "derailed_greedy": lambda r: r["greedy"]["derailed"],
    "derailed_sampled": lambda r: r["sampled"]["derailed"],
    "length_error_sd": lambda r: r["sampled"]["length_error_sd"],
    "forward_share": lambda r: r["greedy"]["forward_share"],
    "backward_share": lambda r: r["greedy"]["backward_share"],
    "side_acc": lambda r: r["side_accuracy"],
    "tf_predicted": lambda r: r["tf_predicted_best"],
    "tf_predicted_backward": lambda r: r["teacher_forced"]["predicted_accuracy"],
    "tf_step_acc": lambda r: r["teacher_forced"]["step_accuracy"],
    "exposure_gap": lambda r: r["exposure_gap"],
}


def aggregate(records: Sequence[dict]) -> list[dict]:
    """One row per (traces, arm, budget): mean, sd and per-seed values of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["traces"], r["arm"], r["budget"]), []).append(r)
    rows = []
    for (traces, arm, budget), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        row = {"traces": traces, "arm": arm, "budget": budget, "seeds": len(rs)}
        for name, get in METRICS.items():
            vals = [float(get(r)) for r in rs]
            row[name], row[name + "_sd"] = _msd(vals)
            row[name + "_per_seed"] = vals
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict], arms_order: Sequence[str]) -> str:
    """The results table (mean ± sd over seeds)."""
    order = {a: i for i, a in enumerate(arms_order)}
    rows = sorted(rows, key=lambda r: (r["traces"], r["budget"], order.get(r["arm"], 99)))
    head = (
        "| traces | steps | arm | seeds | greedy acc. | sampled acc. (T=1) | derailed (greedy) "
        "| derailed (sampled) | length err. sd | forward style (prior) | side task (prior) "
        "| TF-predicted | exposure gap |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )

    def f(r, k, sd=True):
        return f"{r[k]:.3f} ± {r[k + '_sd']:.3f}" if sd else f"{r[k]:.3f}"

    lines = [
        f"| {r['traces']} | {r['budget']} | {r['arm']} | {r['seeds']} | {f(r, 'greedy_acc')} "
        f"| {f(r, 'sampled_acc')} | {f(r, 'derailed_greedy', False)} "
        f"| {f(r, 'derailed_sampled', False)} | {f(r, 'length_error_sd', False)} "
        f"| {f(r, 'forward_share', False)} | {f(r, 'side_acc')} | {f(r, 'tf_predicted', False)} "
        f"| {f(r, 'exposure_gap')} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], arms_order: Sequence[str], path: str | os.PathLike) -> None:
    """Greedy accuracy, sampled accuracy and the two prior measures per arm; one row of
    panels per trace set, one bar per budget, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = sorted({r["traces"] for r in rows})
    budgets = sorted({r["budget"] for r in rows})
    arms = [a for a in arms_order if any(r["arm"] == a for r in rows)]
    panels = [
        ("greedy_acc", "greedy accuracy"),
        ("sampled_acc", "sampled accuracy (T=1)"),
        ("forward_share", "own style kept (forward share)"),
        ("side_acc", "side-task accuracy (prior)"),
    ]
    fig, axes = plt.subplots(
        len(traces), len(panels), figsize=(4.2 * len(panels), 3.2 * len(traces)), squeeze=False
    )
    width = 0.8 / max(1, len(budgets))
    for i, tr in enumerate(traces):
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            for k, b in enumerate(budgets):
                xs, ms, sds = [], [], []
                for a_i, a in enumerate(arms):
                    r = next(
                        (r for r in rows if (r["traces"], r["arm"], r["budget"]) == (tr, a, b)),
                        None,
                    )
                    if r is None:
                        continue
                    x = a_i + (k - (len(budgets) - 1) / 2) * width
                    xs.append(x)
                    ms.append(r[key])
                    sds.append(r[key + "_sd"])
                    ax.scatter(
                        [x] * len(r[key + "_per_seed"]),
                        r[key + "_per_seed"],
                        s=6,
                        color="black",
                        zorder=3,
                    )
                ax.bar(xs, ms, width=width, yerr=sds, label=f"{b} steps", alpha=0.75, capsize=2)
            ax.set_xticks(range(len(arms)))
            ax.set_xticklabels(arms, rotation=60, ha="right", fontsize=7)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{tr}: {title}", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    run: BenchmarkRun,
    plan: Plan,
    records: list[dict],
    monitor: LoadMonitor,
    timings: dict[str, float],
    t_start: float,
    fine_tuning_runs: int,
) -> None:
    """8. The report: this invocation's session (its load) added to the state, then
    results.json, table.md, results.png and load.json; the table logged."""
    timings["total_s"] = time.time() - t_start
    load = monitor.stop()
    # One entry per invocation: a resumed run reports the load of every part it ran in.
    sessions = run.state.get("sessions", []) + [
        {
            "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_start)),
            "timings_s": timings,
            "load": load,
            "fine_tuning_runs": fine_tuning_runs,
        }
    ]
    run.save_state(sessions=sessions)
    contended = any(s["load"].get("contended") for s in sessions)
    rows = aggregate(records)
    table = markdown_table(rows, plan.arms)
    plot(rows, plan.arms, run.out / "results.png")
    (run.out / "table.md").write_text(table)
    (run.out / "load.json").write_text(
        json.dumps(write_json_safe({"summary": load, "samples": monitor.samples}), indent=1)
    )
    results = _results(run, plan, rows, records, contended)
    (run.out / "results.json").write_text(json.dumps(write_json_safe(results), indent=1))
    label = "CONTENDED" if contended else "uncontended"
    run.log(
        f"done in {timings['total_s']:.0f} s ({label}: foreign CPU "
        f"{load.get('foreign_cores_mean', float('nan')):.2f} cores, load1 mean "
        f"{load.get('load1_mean', float('nan')):.1f})\n{table}"
    )


def _results(run: BenchmarkRun, plan: Plan, rows, records, contended: bool) -> dict:
    """results.json: the plan, the machine, every stage's state, the rows and records."""
    import torch

    state = run.state
    return {
        "command": " ".join(["python", *sys.argv]),
        "params": plan.params,
        "budgets": plan.budgets,
        "seeds": plan.seeds,
        "arms": plan.arms,
        "student_ref": plan.student_ref,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "contended": contended,
        "sessions": state["sessions"],
        "models": {
            "teacher_params": count_params(load_model(run.teacher_dir)),
            "student_params": count_params(load_model(run.student_dir)),
        },
        "teacher": state["teacher"],
        "student_init": state["student"],
        "traces": state["traces"],
        "tune": {"space": TUNE_SPACE, "base": TUNE_BASE, **state.get("tune", {})},
        "rows": rows,
        "records": records,
    }
