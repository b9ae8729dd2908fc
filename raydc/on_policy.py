"""On-policy distillation rounds: the student samples, the teacher scores, training steps.

For ``on_policy.rounds`` rounds, round r:

1. **sample**: the round's student (round 0: ``on_policy.student`` or the job's trained
   model with ``start: trained``; then round r-1's exported model) answers the round's
   prompts, ``n_samples`` each (vLLM on Ray Data, as the generate stage samples;
   ``raydc.engines.sampler``), keeping each sampled token's log-prob; ``samples.parquet``.
   The guards run on these samples (``raydc.method.opd.check_band``): the stage stops,
   naming the field, when the EOS rate or the mean length leaves its band.
2. **prepare -> score -> train**, the job's own stages on those samples: the score stage
   scores exactly those tokens under the round's student (at T = 1: the sampling policy's
   log-probs, the store's ``student_logprobs``) and the teacher (its own distribution at
   T = 1; another tokenizer aligned as everywhere else), and training takes
   ``steps_per_round`` steps with the ``advantage`` weight (``OnPolicyConfig.weights``:
   tinker's importance-sampling loss, less the step's mean advantage with
   ``on_policy.baseline: batch_mean``) under ``train.student_ref: current``, from round
   r-1's checkpoint (weights and optimizer state).
3. **round.json**: the samples' statistics, the mean reverse KL and the teacher-silent
   tokens of the scored store, the tokens generated / scored / trained and their FLOPs.

Each round is a Pipeline of its own under ``<stage folder>/rounds/<r>/`` (as a DASD phase
is), so each of its stages is fingerprinted, reused when done and resumed when not: a
driver killed mid-round reruns into the same round, reuses its finished stages and resumes
training from its last checkpoint. Truncated samples (no stop token within
``max_new_tokens``) are counted and not trained on: the chat template would close their
turn with an end-of-turn token the student never sampled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import struct
from collections.abc import Iterable, Sequence
from contextlib import closing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raydc.config import ConfigError, RaydcConfig, from_dict, roles
from raydc.engines.sampler import (
    ParquetSink,
    Sampling,
    fit_prompts,
    now,
    prompt_items,
    read_prompts,
    sample_requests,
)
from raydc.infra.artifacts import data_files, fingerprint_paths, write_json
from raydc.infra.models import check_context, check_input, check_model, check_vocab
from raydc.infra.stage import Stage, TrainedModel, Upstream, model_outputs
from raydc.method.align import token_pieces
from raydc.method.opd import (
    add_flops,
    check_band,
    finite_or_none,
    reverse_kl_stats,
    round_flops,
    sample_stats,
)

STAGE = "on_policy"
ROUNDS_DIR = "rounds"
SAMPLES_FILE = "samples.parquet"
ROUND_FILE = "round.json"
ROUND_SEED_STRIDE = 1_000_003  # round r samples with seeds from seed + r * stride


class OnPolicyError(RuntimeError):
    """A round has nothing to train on."""


# ----------------------------------------------------------------------------- pure parts


def round_seed(seed: int, r: int) -> int:
    """The first sampling seed of round ``r`` (its samples take the seeds after it)."""
    return int(seed) + r * ROUND_SEED_STRIDE


def round_prompts(n_prompts: int, per_round: int | None, r: int) -> list[int]:
    """The indices of round ``r``'s prompts: all of them (``per_round`` None), else
    ``per_round`` of them from ``r * per_round`` on, wrapping around."""
    if per_round is None or per_round >= n_prompts:
        return list(range(n_prompts))
    start = (r * per_round) % n_prompts
    return [(start + i) % n_prompts for i in range(per_round)]


def trained_tokens(metric_lines: Iterable[dict]) -> int:
    """The real tokens the optimizer steps took, from a training run's ``metrics.jsonl``
    records: each report covers the steps since the one before (``step``) and holds their
    ``tokens`` (summed over ranks; older records: ``tokens_per_s * step_time_s`` per step).
    A step reported twice (a resumed run reports its checkpoint's figures again, then
    repeats the steps after it) counts once, the later report's."""
    by_step: dict[int, dict] = {}
    for m in metric_lines:
        if isinstance(m.get("step"), int):
            by_step[m["step"]] = m
    total, before = 0.0, 0
    for step in sorted(by_step):
        m = by_step[step]
        rate, per_step = m.get("tokens_per_s"), m.get("step_time_s")
        if isinstance(m.get("tokens"), int):
            total += m["tokens"]
        elif isinstance(rate, (int, float)) and isinstance(per_step, (int, float)):
            if math.isfinite(rate) and math.isfinite(per_step):
                total += rate * per_step * (step - before)
        before = step
    return int(round(total))


def safetensors_params(model_dir: str | Path) -> int | None:
    """The parameter count of a model folder from its safetensors headers (no weights
    read); None when it has no safetensors files."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n += math.prod(info["shape"])
    return n


def round_tree(
    cfg: RaydcConfig,
    out_dir: Path,
    student: str,
    teacher: str,
    checkpoint: str | None,
) -> dict:
    """The config (as a dict) a round's own pipeline runs with: the job's sections with the
    round's samples as the data, scored under the round's student and the teacher, trained
    for ``steps_per_round`` steps with the rounds' weighting from ``checkpoint``."""
    ocfg = cfg.on_policy
    tree = cfg.to_dict()
    tree.pop("phases")
    tree["run"]["output_dir"] = str(out_dir)
    for section in ("generate", "mixed_policy", "select", "tune", "eval", "on_policy"):
        tree[section]["enabled"] = False
    data = tree["data"]
    data.update(
        path=str(out_dir / "sample" / SAMPLES_FILE),
        format="parquet",
        schema="prompt_response",
        system_prompt=ocfg.system_prompt,
        teacher_logprobs_path=None,
        limit=None,
    )
    tree["score"].update(student=student, teacher=teacher, teacher_temperature=1.0)
    tree["weights"] = ocfg.weights().to_dict()
    train = {**tree["train"], **copy.deepcopy(ocfg.train)}
    lora = bool((train.get("lora") or {}).get("r", 0))
    train.update(
        student=student,
        student_ref="current",
        max_steps=ocfg.steps_per_round,
        scored_student=None,
        rescore_every=0,
        # A LoRA round trains a fresh adapter on the previous round's merged model: its
        # adapter's optimizer state would apply the last round's update twice.
        init_checkpoint=None if lora else checkpoint,
    )
    tree["train"] = train
    return tree


# ----------------------------------------------------------------------------- sampling


def samples_schema(dcfg) -> pa.Schema:
    return pa.schema(
        [
            (dcfg.id_key, pa.string()),
            (dcfg.prompt_id_key, pa.string()),
            (dcfg.prompt_key, pa.string()),
            (dcfg.response_key, pa.string()),
            ("sampling_logprobs", pa.list_(pa.float32())),
            ("sampled_token_ids", pa.list_(pa.int32())),
            ("finish_reason", pa.string()),
            ("num_tokens", pa.int32()),
            ("prompt_tokens", pa.int32()),
            ("sample", pa.int32()),
            ("round", pa.int32()),
        ]
    )


def sample_round(cfg: RaydcConfig, student_dir: str, r: int, out_dir: str | Path) -> dict:
    """Round ``r``'s samples of ``student_dir``: ``out_dir/samples.parquet`` (the ones that
    ended with a stop token; truncated ones in ``truncated.parquet``) and the summary, with
    the samples' statistics (``sample_stats``)."""
    from raydc.infra.models import load_tokenizer

    t0 = now()
    ocfg, dcfg = cfg.on_policy, cfg.data
    check_context(
        "on_policy.engine.max_model_len", ocfg.engine.max_model_len, "student", student_dir
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, pkey = read_prompts(ocfg.prompts, ocfg)
    items, rejects = prompt_items(records, pkey, ocfg.id_key, STAGE)
    items = [items[i] for i in round_prompts(len(items), ocfg.prompts_per_round, r)]
    tokenizer = load_tokenizer(student_dir)
    kept, prompt_ids, rejects = fit_prompts(
        tokenizer, items, rejects, ocfg, STAGE, pkey, out / "rejects.parquet"
    )
    n = ocfg.n_samples
    s = Sampling(
        ocfg.temperature, ocfg.top_p, ocfg.max_new_tokens, True, n, round_seed(ocfg.seed, r)
    )
    backend, batches = sample_requests(
        student_dir, tokenizer, prompt_ids, s, ocfg.engine, cfg.run.ray_address, log_dir=out
    )
    special = {int(i) for i in tokenizer.all_special_ids}
    schema = samples_schema(dcfg)
    lengths, reasons, generated, prefill = [], [], 0, 0
    good = ParquetSink(out / SAMPLES_FILE, schema)
    cut = ParquetSink(out / "truncated.parquet", schema)
    with closing(good), closing(cut):
        for batch in batches:
            rows, cut_rows = [], []
            for smp in batch:
                i, k = divmod(smp.key, n)
                text, _ = token_pieces(tokenizer, smp.token_ids, special)
                lengths.append(len(smp.token_ids))
                reasons.append(smp.finish_reason)
                generated += len(smp.token_ids)
                prefill += len(prompt_ids[i])
                row = {
                    dcfg.id_key: f"{kept[i]['row_id']}:r{r}:{k}",
                    dcfg.prompt_id_key: kept[i]["row_id"],
                    dcfg.prompt_key: kept[i]["message"],
                    dcfg.response_key: text,
                    "sampling_logprobs": smp.logprobs,
                    "sampled_token_ids": list(smp.token_ids),
                    "finish_reason": smp.finish_reason,
                    "num_tokens": len(smp.token_ids),
                    "prompt_tokens": len(prompt_ids[i]),
                    "sample": k,
                    "round": r,
                }
                (rows if smp.finish_reason == "stop" else cut_rows).append(row)
            good.write(rows)
            cut.write(cut_rows)
    stats = sample_stats(lengths, reasons)
    summary = {
        "round": r,
        "prompts": len(kept),
        "rows_rejected": len(rejects),
        **stats,
        "rows_out": good.rows,
        "generated_tokens": generated,
        "prompt_tokens": prefill,
        "student": str(student_dir),
        "backend": backend,
        "seed": s.seed,
        "seconds": now() - t0,
    }
    write_json(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- one round


def store_reverse_kl(score_dir: str | Path) -> dict:
    """``reverse_kl_stats`` of a scored store's rows."""
    cols = ["student_logprobs", "teacher_logprobs", "loss_mask", "teacher_mask"]
    files = data_files(score_dir)
    if not files:
        return reverse_kl_stats([], [], [], [])
    t = pa.concat_tables([pq.read_table(f, columns=cols) for f in files])
    return reverse_kl_stats(*(t.column(c).to_pylist() for c in cols))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _params(model: str) -> int | None:
    n = safetensors_params(model)
    if n is None and Path(model).is_dir():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
        n = sum(p.numel() for p in lm.parameters())
    return n


def round_record(r: int, sampled: dict, scored: dict, trained: dict, params: dict) -> dict:
    """What ``round.json`` says of round ``r``: the samples, the store's reverse KL, the
    tokens of each part and their FLOPs."""
    kl = store_reverse_kl(scored["out_dir"])
    engines = scored["summary"].get("engines") or {}
    s_tok = int((engines.get("student") or {}).get("tokens", scored["summary"].get("tokens", 0)))
    t_tok = int((engines.get("teacher") or {}).get("tokens", 0))
    train_tok = trained_tokens(_read_jsonl(Path(trained["out_dir"]) / "metrics.jsonl"))
    extra = train_tok if trained["grad_accum"] > 1 else 0  # no-grad live forwards
    tokens = {
        "generated": sampled["generated_tokens"],
        "prompt_prefill": sampled["prompt_tokens"],
        "student_scored": s_tok,
        "teacher_scored": t_tok,
        "trained": train_tok,
        "live_forward": extra,
    }
    flops = None
    if params["student"] is not None and params["teacher"] is not None:
        flops = round_flops(
            params["student"],
            params["teacher"],
            sampled["generated_tokens"] + sampled["prompt_tokens"],
            s_tok,
            t_tok,
            train_tok,
            extra,
        )
    keys = ("samples", "mean_length", "eos_rate", "truncation_share", "stopped", "truncated")
    return {
        "round": r,
        **{k: sampled[k] for k in keys},
        "trained_samples": sampled["rows_out"],
        "mean_reverse_kl": finite_or_none(kl["mean_reverse_kl"]),
        "teacher_gap_tokens": kl["teacher_gap_tokens"],
        "loss_tokens": kl["loss_tokens"],
        "steps": trained["steps"],
        "loss": (trained.get("metrics") or {}).get("loss"),
        # the last step's baseline (on_policy.baseline: batch_mean), else None
        "advantage_baseline": (trained.get("metrics") or {}).get("advantage_baseline"),
        "tokens": tokens,
        "params": params,
        "flops": flops,
        "student": sampled["student"],
        "model_dir": trained["model_dir"],
        "checkpoint": trained["checkpoint"],
    }


def run_round(
    pipeline_cls, cfg: RaydcConfig, r: int, start: TrainedModel, teacher: str, root: Path, log
) -> tuple[TrainedModel, dict]:
    """Round ``r`` from ``start`` as a Pipeline of its own under ``root/rounds/<r>``; its
    model and record."""
    ocfg = cfg.on_policy
    out = root / ROUNDS_DIR / str(r)
    child_cfg = from_dict(round_tree(cfg, out, start.model_dir, teacher, start.checkpoint))
    prefix = f"[raydc] {STAGE}/{r}/"

    def round_log(msg: str) -> None:
        log(msg.replace("[raydc] ", prefix, 1))

    child = pipeline_cls(child_cfg, log=round_log)
    try:
        sampling = {
            k: getattr(ocfg, k)
            for k in (
                "prompts",
                "prompt_key",
                "id_key",
                "system_prompt",
                "num_prompts",
                "prompts_per_round",
                "n_samples",
                "temperature",
                "top_p",
                "max_new_tokens",
                "seed",
            )
        }
        parts = {
            "on_policy": sampling,
            "engine": dataclasses.asdict(ocfg.engine),
            "data_keys": dataclasses.asdict(cfg.data),
            "round": r,
            "prompts": fingerprint_paths(ocfg.prompts),
            "student": fingerprint_paths(start.model_dir),
        }
        sampled = child.run_stage(
            "sample", parts, lambda o: sample_round(child.cfg, start.model_dir, r, o)
        ).summary
        check_band(
            sampled,
            ocfg.eos_rate_min,
            ocfg.mean_length_min,
            ocfg.mean_length_max,
            round_index=r,
            max_new_tokens=ocfg.max_new_tokens,
        )
        if not sampled["rows_out"]:
            raise OnPolicyError(
                f"on_policy round {r}: none of the {sampled['samples']} samples ended with a "
                f"stop token within on_policy.max_new_tokens={ocfg.max_new_tokens}, so none "
                "can train; raise it, or set on_policy.eos_rate_min to stop earlier"
            )
        train = child.run("train")
        score = child.results["score"]
        params = {"student": _params(start.model_dir), "teacher": _params(teacher)}
        record = round_record(
            r,
            sampled,
            {"out_dir": score.out_dir, "summary": score.summary},
            {
                **train.summary,
                "out_dir": train.out_dir,
                "grad_accum": child.cfg.train.grad_accum,
            },
            params,
        )
        write_json(out / ROUND_FILE, record)
        round_log(
            f"[raydc] round EOS rate {record['eos_rate']:.3f}, mean length "
            f"{record['mean_length']:.1f}, reverse KL {record['mean_reverse_kl']}, "
            f"teacher gaps {record['teacher_gap_tokens']}"
        )
        return TrainedModel.of(train), record
    finally:
        child.close()


def summarize_rounds(records: Sequence[dict]) -> dict:
    """The stage's summary of its rounds: each round's record, the totals, the last model."""
    flops: dict = {}
    for rec in records:
        if rec["flops"] is None:
            flops = {}
            break
        flops = add_flops(flops, rec["flops"])
    tokens: dict = {}
    for rec in records:
        tokens = add_flops(tokens, rec["tokens"])  # a key-wise sum
    last = records[-1]
    return {
        "rounds": len(records),
        "per_round": list(records),
        "tokens": tokens,
        "flops": flops or None,
        "eos_rate": last["eos_rate"],
        "mean_length": last["mean_length"],
        "mean_reverse_kl": last["mean_reverse_kl"],
        "teacher_gap_tokens": sum(rec["teacher_gap_tokens"] for rec in records),
        "steps": sum(int(rec["steps"] or 0) for rec in records),
        "model_dir": last["model_dir"],
        "checkpoint": last["checkpoint"],
    }


def run_on_policy(pipeline_cls, cfg: RaydcConfig, start: TrainedModel, out_dir, log) -> dict:
    """All the rounds from ``start``; the summary (also ``out_dir/summary.json``)."""
    out = Path(out_dir)
    teacher = _teacher(cfg)
    records, model = [], start
    for r in range(cfg.on_policy.rounds):
        model, record = run_round(pipeline_cls, cfg, r, model, teacher, out, log)
        records.append(record)
    summary = summarize_rounds(records)
    write_json(out / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- the stage


def model_stage(cfg) -> str:
    """The job's model stage (``start: trained`` starts from its model)."""
    return "tune" if cfg.tune.enabled else "train"


def _needs(cfg) -> tuple[str, ...]:
    return (model_stage(cfg),) if cfg.on_policy.start == "trained" else ()


def _student(cfg) -> str:
    return cfg.on_policy.student or roles(cfg).student or ""


def _teacher(cfg) -> str:
    teacher = cfg.on_policy.teacher or cfg.score.teacher or roles(cfg).generate_teacher
    if not teacher:
        raise ConfigError(
            "on_policy.teacher: not set, nor score.teacher or generate.teacher; name the "
            "model that scores the student's samples"
        )
    return teacher


def _start(cfg, up: Upstream) -> TrainedModel:
    if cfg.on_policy.start == "trained":
        return TrainedModel.of(up[model_stage(cfg)])
    student = _student(cfg)
    if not student:
        raise ConfigError(
            "on_policy.student: not set, nor train.student or score.student; name the "
            "student that samples first"
        )
    return TrainedModel(student, None)


def _reads(cfg, up: Upstream) -> dict:
    start = (
        up[model_stage(cfg)].fingerprint
        if cfg.on_policy.start == "trained"
        else fingerprint_paths(_student(cfg))
    )
    return {
        "on_policy": dataclasses.asdict(cfg.on_policy),
        "data": dataclasses.asdict(cfg.data),
        "score": dataclasses.asdict(cfg.score),
        "train": dataclasses.asdict(cfg.train),
        "prompts": fingerprint_paths(cfg.on_policy.prompts),
        "start": start,
        "teacher": fingerprint_paths(_teacher(cfg)),
        "seed": cfg.run.seed,
    }


def _check(cfg) -> None:
    """The prompts and both models, checked as the sampling and scoring engines would."""
    ocfg = cfg.on_policy
    if not ocfg.prompts:
        raise ConfigError("on_policy.prompts: not set; name the prompts the student answers")
    check_input("on_policy.prompts", ocfg.prompts)
    teacher = _teacher(cfg)
    field = "on_policy.teacher" if ocfg.teacher else "score.teacher"
    check_model(field, teacher)
    if Path(teacher).expanduser().is_dir():
        check_vocab(field, teacher)
    if ocfg.start == "student":
        student = _student(cfg)
        sfield = "on_policy.student" if ocfg.student else "train.student"
        if not student:
            raise ConfigError(
                "on_policy.student: not set, nor train.student or score.student; name the "
                "student that samples first"
            )
        check_model(sfield, student)
        if Path(student).expanduser().is_dir():
            check_vocab(sfield, student)
            check_context(
                "on_policy.engine.max_model_len", ocfg.engine.max_model_len, sfield, student
            )


def _run(cfg, up: Upstream, out: Path) -> dict:
    import sys

    from raydc.pipeline.runner import Pipeline  # the rounds are pipelines of their own

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    return run_on_policy(Pipeline, cfg, _start(cfg, up), out, log)


ON_POLICY = Stage(
    "on_policy",
    help="on-policy distillation rounds: the student samples, the teacher scores, train",
    needs=_needs,
    enabled=lambda cfg: cfg.on_policy.enabled,
    check=_check,
    reads=_reads,
    run=_run,
    resumes=True,
    vouch=model_outputs,
)
