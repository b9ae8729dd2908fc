"""One arm's fine-tuning run, as it runs in a worker process: the trainer's steps over one
or more trace sets in turn (one optimizer throughout), evaluated on the way."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from bench.quality.evaluate import evaluate
from bench.quality.finetune import TrainSpec, train_steps
from bench.quality.models import load_model, load_tokenizer
from bench.quality.task import MODELS, PAD
from bench.quality.traces import TraceSet
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
    teacher = _cached("teacher", lambda: load_model(MODELS / "teacher"))
    data = _cached(job["data"], lambda: torch.load(job["data"], weights_only=False))
    view = data if job.get("eval_set", "eval") == "eval" else data["val_view"]
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


def _batches(job: dict, model, records: list[dict]) -> Iterator[list[MicroBatch]]:
    """Each step's micro-batch: ``batch_size`` rows drawn with replacement from the phase's
    trace set; the model is measured (into ``records``) before the step after each of the
    job's eval steps, and after the last."""
    g = torch.Generator().manual_seed(job["seed"])
    step, evals = 0, set(job["evals"])
    for path, n in job["phases"]:
        ts = _cached(path, lambda p=path: TraceSet.load(p))
        block = ts.row_block()
        for _ in range(n):
            if step in evals and step > 0:
                records.append(measure(model, job, step))
            rows = torch.randint(0, len(ts), (job["batch_size"],), generator=g).tolist()
            yield [collate(block, rows, packed=False, pad_id=PAD)]
            step += 1
    if step in evals:
        records.append(measure(model, job, step))


def weight_histogram(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> list[int]:
    """Counts of the loss tokens' weights in WEIGHT_BINS (weights above 4 in the last)."""
    if not weights:
        return [0] * (len(WEIGHT_BINS) - 1)
    w = torch.cat([x[m.bool()].flatten() for x, m in zip(weights, masks)]).numpy()
    return np.histogram(np.clip(w, 0.0, WEIGHT_BINS[-1]), bins=WEIGHT_BINS)[0].tolist()


def run_arm(job: dict) -> list[dict]:
    """Fine-tune the shipped student with one weighting and seed over the job's phases
    (list of (trace set path, steps): the optimizer and model continue across them);
    measure at the job's eval steps. Returns one record per eval step, each with the run's
    training figures. Job keys: tags, data, phases, weights (WeightConfig dict or None for
    sft), weight_warmup_steps, seed, evals, lr, batch_size, warmup_steps, student_ref,
    eval_set (eval | val), full_eval."""
    torch.manual_seed(job["seed"])
    model = load_model(MODELS / "student")
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
    records: list[dict] = []
    t0 = time.time()
    stats = train_steps(model, _batches(job, model, records), spec.train_config(), wc)
    info = {
        "wall_s": time.time() - t0,
        "eval_s": sum(r["eval_s"] for r in records),
        "loss": [s.loss for s in stats[:: max(1, steps // 12)]],
        "weight_hist": weight_histogram(
            [s.weights[0] for s in stats], [s.micro_batches[0].loss_mask for s in stats]
        ),
    }
    for r in records:
        r["train"] = info
    return records
