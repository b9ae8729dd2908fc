"""The run's report: one line per finished stage and the end-of-job summary.

The metric names the summary keeps are imported from the code that emits them
(``raydc.train.loop.HEADLINE``, ``raydc.eval.stage.HEADLINE``), so a renamed metric
cannot silently drop out of the summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raydc.config import RaydcConfig
    from raydc.infra.artifacts import StageResult


def _fmt_int(x) -> str:
    return f"{int(x):,}" if isinstance(x, (int, float)) else "?"


def _rate(summary: dict, key: str = "tokens") -> float | None:
    if isinstance(summary.get("tokens_per_s"), (int, float)):
        return float(summary["tokens_per_s"])
    tokens = summary.get(key) or (summary.get("counts") or {}).get(key)
    secs = summary.get("seconds")
    if isinstance(tokens, (int, float)) and isinstance(secs, (int, float)) and secs > 0:
        return tokens / secs
    return None


def stage_line(name: str, summary: dict) -> str:
    """The one-line report of a stage: counts, throughput, headline metric."""
    bits = []
    if name == "select" and "not_selected" in summary:
        # Candidates outside the top k are not rejects: nothing is wrong with them.
        rej = summary.get("rows_rejected", 0) - summary["not_selected"]
        bits.append(
            f"candidates {_fmt_int(summary['rows_in'])} -> {_fmt_int(summary['rows_out'])} "
            f"selected" + (f" ({_fmt_int(rej)} rejected)" if rej else "")
        )
    elif "rows_in" in summary and "rows_out" in summary:
        rej = summary.get("rows_rejected", 0)
        bits.append(
            f"rows {_fmt_int(summary['rows_in'])} -> {_fmt_int(summary['rows_out'])}"
            + (f" ({_fmt_int(rej)} rejected)" if rej else "")
        )
    if name == "score":
        r = _rate(summary)
        if r:
            bits.append(f"{r:,.0f} tokens/s")
    if name in ("train", "tune"):
        m = summary.get("metrics") or {}
        if "steps" in summary or "step" in m:
            bits.append(f"{summary.get('steps', m.get('step'))} steps")
        for k in ("loss", "val_nll", "tokens_per_s"):
            if isinstance(m.get(k), (int, float)):
                bits.append(f"{k} {m[k]:,.4g}")
        if name == "tune" and "num_trials" in summary:
            bits.append(
                f"{summary['num_trials']} trials, best {summary.get('metric')}="
                f"{summary.get('best_metric')}"
            )
    if name == "on_policy" and "rounds" in summary:
        bits.append(f"{summary['rounds']} rounds, {summary.get('steps')} steps")
        for k in ("eos_rate", "mean_length", "mean_reverse_kl"):
            v = summary.get(k)
            if isinstance(v, (int, float)):
                bits.append(f"{k} {v:.4g}")
        flops = (summary.get("flops") or {}).get("total")
        if isinstance(flops, (int, float)):
            bits.append(f"{flops:.3g} FLOPs")
    if name == "eval":
        from raydc.eval.stage import HEADLINE as EVAL_HEADLINE

        for k in EVAL_HEADLINE[:2]:
            v = summary.get(k)
            if isinstance(v, (int, float)):
                bits.append(f"{k} {v:.4g}")
        if "prompts" in summary:
            bits.append(f"{summary['prompts']} prompts")
    return ", ".join(bits)


def summarize_run(results: dict[str, StageResult], cfg: RaydcConfig) -> dict:
    """The end-of-job figures: rows, throughputs, metrics, best Tune config, paths."""
    from raydc.eval.stage import HEADLINE as EVAL_HEADLINE
    from raydc.infra.runtime import RAY_LOG
    from raydc.train.loop import HEADLINE as TRAIN_HEADLINE

    s: dict[str, Any] = {"output_dir": cfg.run.output_dir, "stages": {}}
    for name, r in results.items():
        if name.startswith("phases/") and name.count("/") == 1:
            continue  # a phase's model: listed as its train (or tune) stage
        s["stages"][name] = {
            "out_dir": str(r.out_dir),
            "reused": r.skipped,
            "seconds": r.summary.get("seconds"),
        }
    phases = _phases(results)
    if phases:
        s["phases"] = phases
    if "prepare" in results:
        p = results["prepare"].summary
        s["rows"] = {k: p.get(k) for k in ("rows_in", "rows_out", "rows_rejected")}
        s["rejects"] = (p.get("paths") or {}).get("rejects")
    if "score" in results:
        s["scoring_tokens_per_s"] = _rate(results["score"].summary)
        engines = results["score"].summary.get("engines") or {}
        s["scoring_engines"] = {
            role: {k: e.get(k) for k in ("tokens_per_s_busy", "startup_s")}
            for role, e in engines.items()
            if isinstance(e, dict)
        }
        s["scored_rows"] = results["score"].summary.get("rows_out")
        s["store_bytes_per_token"] = (
            results["score"].summary.get("store_bytes_per_token") or {}
        ).get("total")
    if "select" in results:
        s["selected_rows"] = results["select"].summary.get("rows_out")
    model = results.get("tune") or results.get("train")
    if model is not None:
        m = model.summary.get("metrics") or {}
        s["training_tokens_per_s"] = m.get("tokens_per_s")
        s["train_metrics"] = {k: v for k, v in m.items() if k in TRAIN_HEADLINE}
        s["model_dir"] = model.summary.get("model_dir")
        if "tune" in results:
            t = results["tune"].summary
            s["tune"] = {
                k: t.get(k)
                for k in (
                    "metric",
                    "mode",
                    "best_metric",
                    "best_config",
                    "best_checkpoint",
                    "results_csv",
                    "num_trials",
                )
            }
    if "on_policy" in results:
        o = results["on_policy"].summary
        s["on_policy"] = {
            k: o.get(k)
            for k in ("rounds", "steps", "eos_rate", "mean_reverse_kl", "tokens", "flops")
        }
        s["model_dir"] = o.get("model_dir")
    if "eval" in results:
        e = results["eval"].summary
        s["eval_metrics"] = {k: e[k] for k in EVAL_HEADLINE if e.get(k) is not None}
        s["eval_dir"] = str(results["eval"].out_dir)
    ray_log = Path(cfg.run.output_dir) / RAY_LOG
    if ray_log.exists():
        s["ray_log"] = str(ray_log)
    return s


def _phases(results: dict[str, StageResult]) -> dict[str, dict]:
    """Per DASD phase (results named ``phases/<phase>/<stage>``): its rows, steps and loss."""
    out: dict[str, dict] = {}
    for key, r in results.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "phases":
            continue
        ph = out.setdefault(parts[1], {})
        if parts[2] == "prepare":
            ph.update({k: r.summary.get(k) for k in ("rows_in", "rows_out", "rows_rejected")})
        elif parts[2] in ("train", "tune"):
            m = r.summary.get("metrics") or {}
            ph.update(steps=r.summary.get("steps", m.get("step")), loss=m.get("loss"))
    return out


def _figures(metrics: dict) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )


def format_summary(s: dict) -> str:
    lines = ["", "=" * 72, "raydc run summary", "-" * 72]
    rows = s.get("rows")
    if rows:
        lines.append(
            f"rows              in {_fmt_int(rows['rows_in'])}, out "
            f"{_fmt_int(rows['rows_out'])}, rejected {_fmt_int(rows['rows_rejected'])}"
            + (f"  ({s['rejects']})" if rows.get("rows_rejected") and s.get("rejects") else "")
        )
    for name, ph in (s.get("phases") or {}).items():
        bits = []
        if ph.get("rows_in") is not None:
            bits.append(
                f"rows in {_fmt_int(ph['rows_in'])}, out {_fmt_int(ph.get('rows_out'))}, "
                f"rejected {_fmt_int(ph.get('rows_rejected') or 0)}"
            )
        if ph.get("steps") is not None:
            bits.append(f"{ph['steps']} steps")
        if isinstance(ph.get("loss"), (int, float)):
            bits.append(f"loss {ph['loss']:.4g}")
        lines.append(f"{'phase ' + name:<18}" + "; ".join(bits))
    for key, label in (("scored_rows", "scored rows"), ("selected_rows", "selected rows")):
        if s.get(key) is not None:
            lines.append(f"{label:<18}{_fmt_int(s[key])}")
    if isinstance(s.get("store_bytes_per_token"), (int, float)):
        lines.append(f"{'scored store':<18}{s['store_bytes_per_token']:.2f} bytes/token on disk")
    for key, label in (("scoring_tokens_per_s", "scoring"), ("training_tokens_per_s", "training")):
        if key not in s:
            continue
        v = s.get(key)
        text = f"{v:,.0f} tokens/s" if isinstance(v, (int, float)) else "n/a"
        if key == "scoring_tokens_per_s" and s.get("scoring_engines"):
            # End to end includes vLLM start-up; the engines' busy rate is the steady state.
            text += " end to end; busy: " + ", ".join(
                f"{role} {e['tokens_per_s_busy']:,.0f} tokens/s (start-up {e['startup_s']:.0f} s)"
                for role, e in s["scoring_engines"].items()
                if isinstance(e.get("tokens_per_s_busy"), (int, float))
                and isinstance(e.get("startup_s"), (int, float))
            )
        lines.append(f"{label:<18}{text}")
    if s.get("train_metrics"):
        lines.append("final train       " + _figures(s["train_metrics"]))
    if s.get("tune"):
        t = s["tune"]
        lines.append(
            f"tune              {t.get('num_trials')} trials; best {t.get('metric')} "
            f"= {t.get('best_metric')} ({t.get('mode')})"
        )
        lines.append(f"best config       {json.dumps(t.get('best_config'), default=str)}")
        lines.append(f"tune results      {t.get('results_csv')}")
    if s.get("eval_metrics"):
        e = s["eval_metrics"]
        if e.get("initial_pass@1") is not None and e.get("pass@1") is not None:
            lines.append(f"student pass@1: {e['initial_pass@1']:.3f} -> {e['pass@1']:.3f}")
        lines.append("eval              " + _figures(e))
    lines.append("-" * 72)
    lines.append(f"output dir        {s['output_dir']}")
    if s.get("ray_log"):
        lines.append(f"ray logs          {s['ray_log']}")
    for name, st in s["stages"].items():
        sec = st.get("seconds")
        tag = (
            "reused" if st["reused"] else (f"{sec:.1f} s" if isinstance(sec, (int, float)) else "")
        )
        lines.append(f"  {name:<16}{st['out_dir']}  [{tag}]")
    if s.get("model_dir"):
        lines.append(f"model             {s['model_dir']}")
    lines.append("=" * 72)
    return "\n".join(lines)
