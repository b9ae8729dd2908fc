"""A regime's finished folder brought up to what the current benchmark writes, so that arms
can be added to it (``jobs/benchmark_quality.py --add-arms``). A folder written before
the benchmark counted FLOPs and ran the on-policy arms lacks three things; each is
recomputed exactly as the current code would have made it, and checked against what the
folder holds before it is used:

- data.pt's ``trace_prompts`` (the on-policy arms' prompts): drawn again
  (``steps.draw_problems``: the same seed, order and sizes, from results.json's plan),
  checked against the eval, val and prior prompts data.pt holds and against every trace
  row's prompt tokens, then stored in data.pt.
- the trace sets' per-row costs (``meta["row_flops"]``, ``flops.trace_row_flops``): t10's
  and t06's from their rows' lengths and the models' parameter counts. A dasd row also
  carries its prompt's other candidates, which were not saved: the teacher's T = 1
  candidates are sampled again (``make_traces``'s seeds, budget and batches), checked
  against t10 (candidate 0, every row) and against the dasd rows picked from another
  candidate, and priced from their lengths.
- the records' ``flops`` and ``flops_parts``: each offline job's draws replayed from its
  seed without training (``jobs.replay_flops``: the job's own batch code), the initial
  student's 0; records.jsonl is rewritten with them (every other field as it was).
"""

from __future__ import annotations

import filecmp
import os
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import torch

from bench.quality.evaluate import generate
from bench.quality.flops import sum_row_flops, trace_row_flops
from bench.quality.jobs import replay_flops
from bench.quality.models import count_params, load_model, load_tokenizer, prompt_ids
from bench.quality.on_policy import ON_POLICY
from bench.quality.run import BenchmarkRun, Plan
from bench.quality.steps import CANDIDATE_SEED, arm_job, base_job, draw_problems
from bench.quality.task import Regime
from bench.quality.traces import TraceSet

TRACE_SETS = ("t10", "t06", "dasd")
# The regime fields a finished run's results.json must share with the current definition.
REGIME_FIELDS = ("lengths", "prior_pool", "prior_lengths", "max_new_tokens", "steps", "batch_size")


def plan_of(res: dict, regime: Regime) -> Plan:
    """The finished run's plan (results.json's ``plan``) on the current definition of its
    regime, whose fields (REGIME_FIELDS) must be the run's and whose models the same
    folders' (``ValueError`` naming the field otherwise)."""
    old = res["regime"]
    if old["name"] != regime.name:
        raise ValueError(f"results.json is regime {old['name']!r}, not {regime.name!r}")
    for key in REGIME_FIELDS:
        now = getattr(regime, key)
        was = tuple(old[key]) if isinstance(now, tuple) else old[key]
        if was != now:
            raise ValueError(
                f"regime {regime.name}: results.json has {key}={old[key]!r}, the current "
                f"definition (bench.quality.task.REGIMES) {now!r}: arms added now would not "
                "be comparable"
            )
    for key in ("teacher", "student"):
        same_model(old[key], getattr(regime, key))
    p = res["plan"]
    return Plan(
        regime=regime,
        sizes=dict(p["sizes"]),
        evals=list(p["evals"]),
        arms=list(p["arms"]),
        seeds=p["seeds"],
        later_seeds=p["later_seeds"],
        deadline_s=p["deadline_s"],
        tune_trials=p["tune_trials"],
        tune_seeds=p.get("tune_seeds", 2),
    )


def same_model(old: str | os.PathLike, now: Path) -> None:
    """A run's model folder ``old`` (perhaps another checkout's) is the current ``now``:
    the same files, byte for byte, where ``old`` still exists; the same folder name where
    it does not."""
    old = Path(old)
    if old.resolve() == now.resolve():
        return
    if old.name != now.name:
        raise ValueError(f"the run's model {old} is not the regime's {now}")
    if old.is_dir():
        names = sorted(p.name for p in now.iterdir() if p.is_file())
        match, diff, errors = filecmp.cmpfiles(old, now, names, shallow=False)
        if diff or errors:
            raise ValueError(f"the run's model {old} differs from {now} in {diff + errors}")


def chosen_of(res: dict) -> dict:
    """The choices the run's later arms used: ``best``, ``risky`` (results.json's
    ``chosen``), ``tune`` (the tune search's WeightConfig dict), those it made."""
    out = {k: res["chosen"][k] for k in ("best", "risky")} if res.get("chosen") else {}
    if res.get("tune"):
        out["tune"] = res["tune"]["chosen"]
    return out


# ----------------------------------------------------------------------------- trace rows


def prompt_len(ts: TraceSet, row: int) -> int:
    """Row ``row``'s prompt tokens: the loss mask starts at the prompt's last token (the
    target there is the response's first)."""
    on = torch.nonzero(ts.loss_mask[row]).flatten()
    if len(on) == 0:
        raise ValueError(f"trace row {row} has no response tokens")
    return int(on[0]) + 1


def row_prompt(ts: TraceSet, row: int) -> list[int]:
    return ts.ids_BL[row, : prompt_len(ts, row)].tolist()


def row_response(ts: TraceSet, row: int) -> list[int]:
    return ts.ids_BL[row, prompt_len(ts, row) : int(ts.lengths[row])].tolist()


def check_trace_prompts(prompts: Sequence[list[int]], sets: dict[str, TraceSet]) -> int:
    """Every row of every set in ``sets`` starts with the prompt of its ``prompt_id``
    (``ValueError`` naming the first that does not); returns the rows checked."""
    n = 0
    for name, ts in sets.items():
        for row in range(len(ts)):
            pid = int(ts.prompt_id[row])
            if not 0 <= pid < len(prompts) or row_prompt(ts, row) != list(prompts[pid]):
                raise ValueError(
                    f"trace set {name} row {row} (prompt_id {pid}): its prompt tokens are not "
                    "the trace prompt drawn again"
                )
            n += 1
    return n


def recover_trace_prompts(
    data: dict, sizes: dict, regime: Regime, tok, sets: dict[str, TraceSet]
) -> list[list[int]]:
    """The trace prompts' ids as ``make_data`` drew them (``draw_problems`` with the run's
    sizes), checked: the eval, val and prior problems drawn with them must be data.pt's
    (their prompt ids), and every trace row must start with its prompt
    (``check_trace_prompts``)."""
    evals, val, prior, prompts = draw_problems(sizes, regime)
    drawn = {
        "eval_prompts": (evals, data["eval_prompts"]),
        "val_view.eval_prompts": (val, data["val_view"]["eval_prompts"]),
        "prior_prompts": (prior, data["prior_prompts"]),
    }
    for key, (problems, stored) in drawn.items():
        if prompt_ids(tok, [p.prompt for p in problems]) != [list(x) for x in stored]:
            raise ValueError(
                f"data.pt's {key} are not the problems drawn again with the plan's sizes "
                f"{sizes}: the trace prompts cannot be recovered"
            )
    ids = prompt_ids(tok, [p.prompt for p in prompts])
    check_trace_prompts(ids, sets)
    return ids


# ----------------------------------------------------------------------------- trace costs


def sample_candidates(
    teacher, prompts: Sequence[list[int]], eos: int, max_new_tokens: int, n: int
) -> list[list[list[int]]]:
    """The teacher's T = 1 responses of ``prompts``, candidate k as ``make_traces``
    sampled it (seed CANDIDATE_SEED + k, the same batches)."""
    return [
        generate(
            teacher,
            prompts,
            eos,
            temperature=1.0,
            seed=CANDIDATE_SEED + k,
            max_new_tokens=max_new_tokens,
        )
        for k in range(n)
    ]


def check_candidates(
    candidates: Sequence[Sequence[list[int]]], t10: TraceSet, dasd: TraceSet
) -> dict:
    """Candidates sampled again are the run's: candidate 0 is t10 (every row, by prompt
    id), and each dasd row is one of its prompt's candidates. Returns how many rows were
    checked against candidate 0 and how many dasd rows against a later candidate (rows
    that differ from candidate 0); ``ValueError`` on the first mismatch."""
    for row in range(len(t10)):
        pid = int(t10.prompt_id[row])
        if row_response(t10, row) != list(candidates[0][pid]):
            raise ValueError(f"candidate 0 sampled again differs from t10 row {row}")
    later = 0
    for row in range(len(dasd)):
        pid, resp = int(dasd.prompt_id[row]), row_response(dasd, row)
        options = [list(c[pid]) for c in candidates]
        if resp not in options:
            raise ValueError(f"dasd row {row} (prompt {pid}) is none of its candidates")
        later += resp != options[0]
    return {"t10_rows": len(t10), "dasd_rows_from_a_later_candidate": later}


def dasd_row_flops(
    dasd: TraceSet,
    prompts: Sequence[list[int]],
    candidates: Sequence[Sequence[list[int]]],
    student_params: int,
    teacher_params: int,
) -> dict[str, list[int]]:
    """A dasd row's cost (``make_traces``'s): every candidate of its prompt, generated and
    scored under both models (``sum_row_flops`` of the candidates' ``trace_row_flops``)."""
    per_set = [
        trace_row_flops(
            [len(p) + len(r) for p, r in zip(prompts, cand)], student_params, teacher_params
        )
        for cand in candidates
    ]
    every = sum_row_flops(per_set)
    pids = dasd.prompt_id.tolist()
    return {k: [v[i] for i in pids] for k, v in every.items()}


def save_trace_set(ts: TraceSet, path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp"
    ts.save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- records


def job_of(run: BenchmarkRun, plan: Plan, chosen: dict) -> Callable[[str, int], dict]:
    """The job a record's (arm, seed) ran (``steps.arm_job``; the initial student's
    measure-only job for arm ``initial``)."""

    def job(arm: str, seed: int) -> dict:
        if arm == "initial":
            return {**base_job(run, plan), "phases": [], "evals": [0], "seed": seed}
        return arm_job(run, plan, arm, seed, chosen)

    return job


def backfill_records(
    records: list[dict],
    job: Callable[[str, int], dict],
    student_params: int,
    unpriced: Collection[str] = (),
) -> tuple[list[dict], dict]:
    """``records`` with ``flops`` and ``flops_parts`` on every record of an offline job that
    lacked them (``jobs.replay_flops`` of its (arm, seed)'s job, at the record's step).
    Returns the records (new dicts where filled, the others as they were) and a summary:
    records filled, per arm, and those left without (an on-policy job cannot replay; a job
    drawing from a trace set in ``unpriced``, whose per-row costs are unknown, is left)."""
    replays: dict[tuple[str, int], dict | None] = {}
    out, filled, left = [], {}, {}
    for r in records:
        if "flops" in r:
            out.append(r)
            continue
        key = (r["arm"], r["seed"])
        if key not in replays:
            j = job(*key)
            known = all(src != ON_POLICY and src not in unpriced for src, _ in j["phases"])
            replays[key] = replay_flops(j, student_params) if known else None
        steps = replays[key]
        if steps is None:
            left[r["arm"]] = left.get(r["arm"], 0) + 1
            out.append(r)
            continue
        if r["step"] not in steps:
            raise ValueError(
                f"record {r['arm']} seed {r['seed']} step {r['step']}: its job measures at "
                f"{sorted(steps)} only"
            )
        out.append({**r, **steps[r["step"]]})
        filled[r["arm"]] = filled.get(r["arm"], 0) + 1
    return out, {"records": sum(filled.values()), "per_arm": filled, "left_without": left}


# ----------------------------------------------------------------------------- the folder


def upgrade(run: BenchmarkRun, plan: Plan, res: dict, chosen: dict) -> dict:
    """The run's folder brought up to the current format where it is not (module
    docstring): data.pt (its ``trace_prompts``; ``teacher`` the regime's current folder),
    the trace sets' ``row_flops``, the records' FLOPs. Returns what was done, for
    results.json (``backfill``; empty when the folder needed nothing) and the models'
    parameter counts (``params``)."""
    regime, note = plan.regime, {}
    t0 = time.time()
    data = torch.load(run.data_path, weights_only=False)
    sets = {n: TraceSet.load(run.trace_path(n)) for n in TRACE_SETS}
    teacher = load_model(regime.teacher)
    params = {
        "student": count_params(load_model(regime.student)),
        "teacher": count_params(teacher),
    }
    if res.get("params") and res["params"] != params:
        raise ValueError(f"results.json's params {res['params']} are not the models' {params}")
    changed = str(regime.teacher) != data["teacher"]
    if changed:
        same_model(data["teacher"], regime.teacher)
        note["data_teacher"] = f"{data['teacher']} -> {regime.teacher} (the same files)"
        data["teacher"] = str(regime.teacher)
    if "trace_prompts" not in data:
        tok = load_tokenizer()
        data["trace_prompts"] = recover_trace_prompts(data, plan.sizes, regime, tok, sets)
        rows = sum(len(ts) for ts in sets.values())
        note["trace_prompts"] = (
            f"{len(data['trace_prompts'])} drawn again (steps.draw_problems, the plan's sizes); "
            f"the eval, val and prior prompts data.pt holds and the prompt tokens of the {rows} "
            "trace rows matched them"
        )
        changed = True
    if changed:
        torch.save(data, f"{run.data_path}.tmp")
        os.replace(f"{run.data_path}.tmp", run.data_path)
    Ps, Pt = params["student"], params["teacher"]
    costs = {}
    for name in ("t10", "t06"):
        ts = sets[name]
        if ts.meta.get("row_flops") is None:
            ts.meta["row_flops"] = trace_row_flops(ts.lengths.tolist(), Ps, Pt)
            save_trace_set(ts, run.trace_path(name))
            costs[name] = "from the rows' lengths"
    unpriced: set[str] = set()
    if sets["dasd"].meta.get("row_flops") is None:
        prompts = data["trace_prompts"]
        t1 = time.time()
        cands = sample_candidates(
            teacher, prompts, data["eos"], regime.max_new_tokens, plan.sizes["candidates"]
        )
        try:
            checked = check_candidates(cands, sets["t10"], sets["dasd"])
        except ValueError as err:  # not reproduced: dasd's costs (and its arm's FLOPs) unknown
            unpriced.add(run.trace_path("dasd"))
            costs["dasd"] = f"not recovered: the candidates sampled again are not the run's ({err})"
        else:
            dasd = sets["dasd"]
            dasd.meta["row_flops"] = dasd_row_flops(dasd, prompts, cands, Ps, Pt)
            save_trace_set(dasd, run.trace_path("dasd"))
            costs["dasd"] = (
                f"the {plan.sizes['candidates']} T = 1 candidates of every prompt sampled again "
                f"({time.time() - t1:.0f} s), checked: {checked}"
            )
    if costs:
        note["trace_costs"] = costs
    records = run.records()
    filled, summary = backfill_records(records, job_of(run, plan, chosen), Ps, unpriced)
    if summary["records"]:
        backup = run.out / "records.before_backfill.jsonl"
        if not backup.exists():
            backup.write_text(run.records_path.read_text())
        run.rewrite_records(filled)
        note["records"] = {
            **summary,
            "how": "each offline job's draws replayed from its seed (jobs.replay_flops); "
            "records.jsonl rewritten with flops and flops_parts added (the file before: "
            "records.before_backfill.jsonl)",
        }
    if note:
        note["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        note["wall_s"] = time.time() - t0
    return {"backfill": note, "params": params}
