"""One arm's fine-tuning run, as it runs in a worker process: the trainer's steps over one
or more phases in turn (a trace set's rows, or the student's own samples scored by the
teacher; one optimizer throughout), evaluated and its FLOPs counted on the way."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from bench.quality.evaluate import evaluate
from bench.quality.finetune import TrainSpec, train_steps
from bench.quality.flops import FlopCount, TraceCost
from bench.quality.models import count_params, load_model, load_tokenizer
from bench.quality.on_policy import (
    ON_POLICY,
    ROUND_STEPS,
    PromptCycle,
    round_record,
    round_rows,
    sample_round,
)
from bench.quality.task import PAD
from bench.quality.traces import TraceSet
from raydc.method.opd import OnPolicyGuardError
from raydc.method.weights import WeightConfig, preset
from raydc.train.batch import MicroBatch, collate

WEIGHT_BINS = np.linspace(0.0, 4.0, 41)  # the weight histogram's bins (the last takes > 4)
_CACHE: dict = {}


def _cached(key: str, loader: Callable[[], object]):
    if key not in _CACHE:
        _CACHE[key] = loader()
    return _CACHE[key]


def worker_init(threads: int = 1) -> None:
    """Pool initializer: one torch thread per worker process (2 workers on 2 cores)."""
    from raydc.infra.models import offline_env

    offline_env()
    torch.set_num_threads(threads)


def measure(model, job: dict, step: int) -> dict:
    """The evaluation of ``model`` after ``step`` steps, as a record of the job's run."""
    tok = _cached("tok", load_tokenizer)
    data = _cached(job["data"], lambda: torch.load(job["data"], weights_only=False))
    teacher = _cached(data["teacher"], lambda: load_model(data["teacher"]))
    view = data if job.get("eval_set", "eval") == "eval" else data["val_view"]
    view = {**view, "max_new_tokens": data["max_new_tokens"]}
    t0 = time.time()
    res = evaluate(
        model,
        teacher,
        view,
        lambda ids: tok.decode(ids, skip_special_tokens=True),
        seed=1000 * job["seed"] + step,
        full=job.get("full_eval", True),
    )
    return {
        **job.get("tags", {}),
        "seed": job["seed"],
        "step": step,
        "eval_s": time.time() - t0,
        **res,
    }


class ArmState:
    """What one job's run keeps beside the model: its records (one per eval step), its
    FLOPs so far (``bench.quality.flops``) and its on-policy rounds."""

    def __init__(self, job: dict, model):
        self.job, self.model = job, model
        self.records: list[dict] = []
        self.cost = FlopCount(count_params(model))
        self.rounds: list[dict] = []
        self.stopped: dict | None = None  # an on-policy guard's trip: step and reason

    def measure(self, step: int) -> None:
        self.records.append({**measure(self.model, self.job, step), **self.cost.record()})


def _trace_batches(job: dict, path: str, n: int, g, state: ArmState) -> Iterator[MicroBatch]:
    """``n`` micro-batches of ``batch_size`` rows drawn with replacement from the trace set
    at ``path``; a trace's cost is paid the first time it is drawn (``TraceCost``)."""
    ts = _cached(path, lambda: TraceSet.load(path))
    block, paid = ts.row_block(), TraceCost(ts.meta.get("row_flops"))
    for _ in range(n):
        rows = torch.randint(0, len(ts), (job["batch_size"],), generator=g).tolist()
        state.cost.add(paid.draw(rows))
        yield collate(block, rows, packed=False, pad_id=PAD)


def _on_policy_batches(job: dict, n: int, g, state: ArmState) -> Iterator[MicroBatch]:
    """``n`` micro-batches of the student's own samples (``bench.quality.on_policy``): a
    round of ``round_steps`` x ``batch_size`` prompts sampled by the current model, scored
    by the teacher, then its steps; the next round samples from the model they left."""
    data = _cached(job["data"], lambda: torch.load(job["data"], weights_only=False))
    teacher = _cached(data["teacher"], lambda: load_model(data["teacher"]))
    prompts, B = data["trace_prompts"], job["batch_size"]
    S = job.get("round_steps", ROUND_STEPS)
    cycle, t_params = PromptCycle(len(prompts), g), count_params(teacher)
    done = 0
    while done < n:
        k, r = min(S, n - done), len(state.rounds)
        rnd = sample_round(
            state.model,
            teacher,
            [prompts[i] for i in cycle.take(k * B)],
            data["eos"],
            data["max_new_tokens"],
            seed=1_000_003 * job["seed"] + r,
            student_params=state.cost.student_params,
            teacher_params=t_params,
        )
        state.cost.add(rnd.flops)
        state.rounds.append(round_record(r, k, rnd))
        block = rnd.ts.row_block()
        for rows in round_rows(len(rnd.ts), k, B, g):
            yield collate(block, rows, packed=False, pad_id=PAD)
        done += k


def _batches(job: dict, state: ArmState) -> Iterator[list[MicroBatch]]:
    """Each step's micro-batch, phase after phase (a trace set's, or ``ON_POLICY``: the
    student's own samples); the model is measured (into ``state.records``) before the step
    after each of the job's eval steps, and after the last. Each step's trained tokens are
    counted as it is handed out."""
    g = torch.Generator().manual_seed(job["seed"])
    step, evals = 0, set(job["evals"])
    for source, n in job["phases"]:
        if source == ON_POLICY:
            batches = _on_policy_batches(job, n, g, state)
        else:
            batches = _trace_batches(job, source, n, g, state)
        for _ in range(n):
            # measured before the next batch is drawn: a round's sampling is the next step's
            if step in evals and step > 0:
                state.measure(step)
            try:
                mb = next(batches)
            except OnPolicyGuardError as e:
                # The arm stops training here (as the on_policy stage does); the model it
                # left is what every later eval step measures.
                state.stopped = {"step": step, "reason": str(e)}
                for later in sorted(x for x in evals if x >= step and x > 0):
                    state.measure(later)
                return
            state.cost.train(mb.tokens)
            yield [mb]
            step += 1
    if step in evals:
        state.measure(step)


class CostReplay(ArmState):
    """An offline job's FLOPs without its training: ``_batches`` run as the job's own
    (the same generator seeded with the job's seed, the same draws in the same order, each
    trace paid when first drawn, each step's trained tokens counted), no model and no
    evaluation: at each eval step ``records`` gets the step and the FLOPs so far, as the
    job's record of that step has them (``flops``, ``flops_parts``)."""

    def __init__(self, job: dict, student_params: int):
        on_policy = [n for src, n in job["phases"] if src == ON_POLICY]
        if on_policy:
            raise ValueError(
                f"job {job.get('tags')} seed {job['seed']}: an ON_POLICY phase's draws depend "
                "on the model's samples; only offline phases replay"
            )
        self.job, self.model = job, None
        self.records = []
        self.cost = FlopCount(student_params)
        self.rounds = []

    def measure(self, step: int) -> None:
        self.records.append({"step": step, **self.cost.record()})


def replay_flops(job: dict, student_params: int) -> dict[int, dict]:
    """Per eval step of an offline ``job`` (its phases trace sets only), the FLOPs its run
    had counted by then: ``{step: {"flops", "flops_parts"}}`` (``CostReplay``). The trace
    sets are read from the job's paths as a run reads them (their ``meta["row_flops"]``)."""
    for path, _ in job["phases"]:
        _CACHE.pop(path, None)  # the file as it is now (costs may have been added since)
    state = CostReplay(job, student_params)
    for _ in _batches(job, state):
        pass
    return {r.pop("step"): r for r in state.records}


def weight_histogram(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> list[int]:
    """Counts of the loss tokens' weights in WEIGHT_BINS (weights above 4 in the last)."""
    if not weights:
        return [0] * (len(WEIGHT_BINS) - 1)
    w = torch.cat([x[m.bool()].flatten() for x, m in zip(weights, masks)]).numpy()
    return np.histogram(np.clip(w, 0.0, WEIGHT_BINS[-1]), bins=WEIGHT_BINS)[0].tolist()


def run_arm(job: dict) -> list[dict]:
    """Fine-tune the regime's student with one weighting and seed over the job's phases
    (list of (source, steps), a source a trace set's path or ``ON_POLICY``: the optimizer
    and model continue across them); measure at the job's eval steps. Returns one record
    per eval step, each with the run's FLOPs so far (``flops``, ``flops_parts``) and its
    training figures. Job keys: tags, data, student (its folder), phases, weights
    (WeightConfig dict or None for sft), on_policy_weights (the ON_POLICY phases' weights;
    default the ``opd`` preset), on_policy_lr_scale (a factor on the ON_POLICY steps'
    learning rate; default 1), round_steps (ON_POLICY steps a round of samples feeds),
    weight_warmup_steps, seed, evals, lr, batch_size, warmup_steps, student_ref, eval_set
    (eval | val), full_eval."""
    torch.manual_seed(job["seed"])
    model = load_model(job["student"])
    steps = sum(n for _, n in job["phases"])
    spec = TrainSpec(
        steps=steps,
        batch_size=job["batch_size"],
        lr=job["lr"],
        warmup_steps=job["warmup_steps"],
        student_ref=job["student_ref"],
        seed=job["seed"],
        weight_warmup_steps=job.get("weight_warmup_steps", 0),
    )
    wc = WeightConfig(**job["weights"]) if job.get("weights") else preset("sft")
    opd = job.get("on_policy_weights")
    opd_wc = WeightConfig(**opd) if opd else preset("opd")
    per_step = [opd_wc if src == ON_POLICY else wc for src, n in job["phases"] for _ in range(n)]
    scale = float(job.get("on_policy_lr_scale", 1.0))
    lr_scale = [scale if src == ON_POLICY else 1.0 for src, n in job["phases"] for _ in range(n)]
    state = ArmState(job, model)
    t0 = time.time()
    stats = train_steps(
        model,
        _batches(job, state),
        spec.train_config(),
        wc,
        weights_at=per_step.__getitem__,
        # the schedule is also read one step past the last (the scheduler's last step)
        lr_scale_at=(lambda k: lr_scale[min(k, steps - 1)]) if scale != 1.0 else None,
    )
    records = state.records
    info = {
        "wall_s": time.time() - t0,
        "eval_s": sum(r["eval_s"] for r in records),
        "loss": [s.loss for s in stats[:: max(1, steps // 12)]],
        "weight_hist": weight_histogram(
            [s.weights[0] for s in stats], [s.micro_batches[0].loss_mask for s in stats]
        ),
    }
    if state.stopped:
        info["stopped"] = state.stopped
    if state.rounds:
        info["on_policy"] = {
            "rounds": state.rounds,
            "samples": sum(r["samples"] for r in state.rounds),
            "truncated": sum(r["truncated"] for r in state.rounds),
            "trained_samples": sum(r["kept"] for r in state.rounds),
        }
    for r in records:
        r["train"] = info
    return records
