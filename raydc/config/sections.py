"""One typed config tree for every stage: YAML + dotted ``key=value`` overrides, validated.

Each stage takes its own section (``cfg.data``, ``cfg.score``, ``cfg.train``...). Unknown
keys, wrong types and out-of-range values fail with the dotted field path in the message,
e.g. ``train.lr=-1: must be > 0``. Ray Tune's search space names the same dotted fields.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydc.config.engines import (
    EvalConfig,
    GenerateConfig,
    MixedPolicyConfig,
    VLLMEngineConfig,
    _check_sampling,
)
from raydc.config.tree import ConfigError, build, choice, parse_override, positive, set_dotted
from raydc.method.weights import (
    BASELINES,
    WeightConfig,
    WeightConfigError,
    needs_entropy,
    preset,
)


@dataclass
class DataConfig:
    """Teacher traces in: where they are and how rows are read, rendered and masked."""

    path: str = ""  # JSONL / Parquet file or folder, or a saved HF `datasets` folder
    format: str = "auto"  # auto | jsonl | parquet | hf
    schema: str = "auto"  # auto | chat | prompt_response
    messages_key: str = "messages"
    prompt_key: str = "prompt"
    response_key: str = "response"
    id_key: str = "id"  # row id column; generated from the position if absent
    prompt_id_key: str = "prompt_id"  # groups candidate responses of one prompt
    teacher_logprobs_key: str = "teacher_logprobs"  # optional per-token teacher log-probs
    # Their shape: auto (each value's own) | lists (numbers, with the tokens / offsets / ids
    # keys below) | openai (an API response's logprobs) | vllm (per-position token maps)
    teacher_logprobs_format: str = "auto"
    teacher_tokens_key: str = "teacher_tokens"  # optional token strings for those
    teacher_offsets_key: str = "teacher_offsets"  # optional char offsets for those
    # optional teacher token ids for the log-probs, in the teacher's own tokenizer (a
    # public -Logprob set): decoded with data.teacher_tokenizer to character spans
    teacher_token_ids_key: str = "teacher_token_ids"
    teacher_tokenizer: str | None = None  # the tokenizer of teacher_token_ids (folder)
    # A teacher text (token strings, bytes, decoded ids) that differs from the response is
    # aligned on the text both share; a row whose response it covers less is rejected.
    # 0.9: markup (<think> tags, channel headers, whitespace) is a few dozen characters of
    # a trace of thousands, while an unrelated text matches a few percent.
    min_teacher_coverage: float = 0.9
    # Teacher ids and log-probs in a file of their own (a public -Logprob set), joined to
    # the traces by join_key (Ray Data's hash join); a trace without a match is rejected
    teacher_logprobs_path: str | None = None
    join_key: str = "sample_uuid"  # the key's column in the traces
    teacher_join_key: str | None = None  # its column in the log-prob file (None: join_key)
    join_partitions: int | None = None  # None: the cluster's CPU count
    # Mixed-policy traces: how many leading response characters the student wrote; with
    # mask_student_prefix they carry no loss (DASD trained on them: the default)
    student_prefix_key: str = "student_prefix_chars"
    mask_student_prefix: bool = False
    # Loss on an empty <think></think> block, which a thinking template (Qwen3) puts before
    # an answer without reasoning; off: the block is prompt, not a lesson to skip thinking
    train_empty_think: bool = False
    system_prompt: str | None = None
    tokenizer: str | None = None  # tokenizer folder / shipped name; default: score.student
    max_length: int = 2048
    overlength: str = "drop"  # drop | truncate
    max_reject_share: float = 0.5
    limit: int | None = None  # read only the first N rows (smoke runs)

    def validate(self, path: str) -> None:
        choice(f"{path}.format", self.format, ("auto", "jsonl", "parquet", "hf"))
        choice(f"{path}.schema", self.schema, ("auto", "chat", "prompt_response"))
        choice(f"{path}.overlength", self.overlength, ("drop", "truncate"))
        choice(
            f"{path}.teacher_logprobs_format",
            self.teacher_logprobs_format,
            ("auto", "lists", "openai", "vllm"),
        )
        positive(f"{path}.max_length", self.max_length)
        positive(f"{path}.limit", self.limit)
        positive(f"{path}.join_partitions", self.join_partitions)
        lists = self.teacher_logprobs_format in ("auto", "lists")
        if self.teacher_logprobs_path and lists and not self.teacher_tokenizer:
            raise ConfigError(
                f"{path}.teacher_logprobs_path: set {path}.teacher_tokenizer too (the tokenizer "
                f"its token ids are in), or {path}.teacher_logprobs_format to openai / vllm "
                "for log-probs that carry their token strings"
            )
        if not 0.0 <= self.max_reject_share <= 1.0:
            raise ConfigError(
                f"{path}.max_reject_share={self.max_reject_share!r}: must be in [0, 1]"
            )
        if not 0.0 <= self.min_teacher_coverage <= 1.0:
            raise ConfigError(
                f"{path}.min_teacher_coverage={self.min_teacher_coverage!r}: must be in [0, 1]"
            )


def _score_engine() -> VLLMEngineConfig:
    # Scoring rows are whole conversations: smaller batches, and a bounded step.
    return VLLMEngineConfig(batch_size=16, max_num_batched_tokens=4096)


@dataclass
class ScoreConfig:
    """Scoring teacher tokens under the student (and teacher) with engine actors."""

    backend: str = "vllm"  # vllm | transformers: the scorer each engine actor runs
    student: str = ""  # model folder or hub name
    teacher: str | None = None  # score the teacher too, when the data has no teacher log-probs
    # The scored store: log-probs as float16 (2 B a token, error <= 2**-11 of the value) or
    # float32; inspection also writes text, offsets, conversation and the configured
    # weights to score/inspect/ (training never reads them).
    logprobs: str = "float16"
    inspection: bool = False
    # The temperature the traces were sampled at: the teacher's log-probs are those of
    # softmax(logits / T), the distribution the tokens came from (DASD samples at 0.6 and
    # 1.0). The student is always scored at 1: it is the model being trained.
    teacher_temperature: float = 1.0
    # The student's predictive entropy per token, stored beside its log-prob (what an
    # entropy gate reads under train.student_ref=init): auto stores it when the weighting
    # or the Tune space has a gate; on | off. Exact from transformers; from vLLM, estimated
    # from the top entropy_top_k prompt log-probs (raydc.method.entropy.topk_entropy).
    entropy: str = "auto"
    entropy_top_k: int = 20
    engine: VLLMEngineConfig = field(default_factory=_score_engine)

    def validate(self, path: str) -> None:
        choice(f"{path}.backend", self.backend, ("vllm", "transformers"))
        positive(f"{path}.teacher_temperature", self.teacher_temperature)
        choice(f"{path}.logprobs", self.logprobs, ("float16", "float32"))
        choice(f"{path}.entropy", self.entropy, ("auto", "on", "off"))
        positive(f"{path}.entropy_top_k", self.entropy_top_k)
        self.engine.validate(f"{path}.engine")
        if self.engine.backend == "local":
            raise ConfigError(
                f"{path}.engine.backend='local': scoring runs its engines as a Ray Data "
                "actor pool; use auto or ray"
            )
        if self.engine.max_num_batched_tokens is None:
            raise ConfigError(
                f"{path}.engine.max_num_batched_tokens=None: scoring needs a bound on the "
                "[tokens x vocab] prompt-logprob tensor"
            )


@dataclass
class SelectConfig:
    """DASD divergence-aware selection (off unless enabled)."""

    enabled: bool = False
    threshold: float = 0.0
    top_k: int = 1

    def validate(self, path: str) -> None:
        positive(f"{path}.top_k", self.top_k)


LORA_ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """LoRA adapters through PEFT (``r: 0``, the default, trains every weight). The frozen
    base keeps no gradient and no optimizer state; export writes the merged model and the
    adapter."""

    r: int = 0  # the adapters' rank; 0: off (full fine-tuning)
    alpha: float = 16.0  # the update is (alpha / r) * B A
    dropout: float = 0.0  # dropout on each adapter's input (training only)
    # PEFT's module names (suffixes such as q_proj), or all-linear alone: every linear layer
    # but the output head (which raydc's chunked loss reads directly: never a target)
    target_modules: list[str] = field(default_factory=lambda: [LORA_ALL_LINEAR])

    @property
    def enabled(self) -> bool:
        return self.r > 0

    def validate(self, path: str) -> None:
        positive(f"{path}.r", self.r, strict=False)
        positive(f"{path}.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{path}.dropout={self.dropout!r}: must be in [0, 1)")
        names = self.target_modules
        if not names:
            raise ConfigError(f"{path}.target_modules=[]: name at least one module")
        for i, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(
                    f"{path}.target_modules[{i}]={name!r}: must be a module name such as q_proj"
                )
        if LORA_ALL_LINEAR in names and len(names) > 1:
            raise ConfigError(
                f"{path}.target_modules={names!r}: {LORA_ALL_LINEAR} stands alone (it already "
                "names every linear layer but the output head)"
            )
        if "lm_head" in names:
            raise ConfigError(
                f"{path}.target_modules: lm_head is the output head, which the chunked loss "
                "reads as a plain weight; adapt the decoder layers instead"
            )


@dataclass
class TrainConfig:
    """Weighted distillation on Ray Train + DeepSpeed."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | linear | constant
    max_steps: int = 100
    micro_batch_tokens: int = 4096  # tokens per micro-batch per worker (packed or padded)
    packing: bool = True  # several rows per sequence (position ids restart; no cross-row attention)
    # auto: flash_attention_2 on a GPU with flash-attn installed, else sdpa_packed (sdpa per
    # packed row: no [T x T] mask) | flash_attention_2 | sdpa | eager
    attn_implementation: str = "auto"
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward (non-reentrant)
    shuffle_window_tokens: int = (
        2_000_000  # rows shuffled and packed within windows of this many tokens
    )
    grad_accum: int = 1
    grad_clip: float = 1.0
    student_ref: str = "init"  # init (stored scores) | current (live forward, detached)
    rescore_every: int = 0  # re-score with the latest weights every k steps (0: never)
    weight_warmup_steps: int = 0  # w = 1 for the first N steps
    loss_chunk_size: int = 1024
    log_every: int = 10
    checkpoint_every: int = 50
    seed: int = 0
    student: str = ""  # model folder to train; "" -> score.student (must match the scores)
    # Start from another run's checkpoint: its weights and optimizer state (the previous DASD
    # phase); step count, data position and lr schedule start anew
    init_checkpoint: str | None = None
    # The student the scores were made with, when training starts from another model (a
    # phase with scores_from: initial); None: the training student itself
    scored_student: str | None = None
    min_lr_ratio: float = 0.0  # the decay ends at min_lr_ratio * lr
    val_share: float = 0.0  # share of prompts held out for val_nll (0: no validation)
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2  # newest checkpoints kept
    lora: LoraConfig = field(default_factory=LoraConfig)  # LoRA adapters (r: 0, off)

    def validate(self, path: str) -> None:
        self.lora.validate(f"{path}.lora")
        choice(f"{path}.zero_stage", self.zero_stage, (0, 1, 2, 3))
        choice(f"{path}.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{path}.min_lr_ratio={self.min_lr_ratio!r}: must be in [0, 1]")
        if not 0.0 <= self.val_share < 1.0:
            raise ConfigError(f"{path}.val_share={self.val_share!r}: must be in [0, 1)")
        positive(f"{path}.keep_checkpoints", self.keep_checkpoints)
        positive(f"{path}.max_failures", self.max_failures, strict=False)
        if self.rescore_every and self.student_ref != "init":
            raise ConfigError(
                f"{path}.rescore_every={self.rescore_every!r}: re-scoring rounds refresh the "
                "stored scores of student_ref=init; student_ref=current scores every step"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"{path}.offload_params=True: needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError(f"{path}.offload_optimizer=True: needs zero_stage >= 1")
        choice(f"{path}.lr_schedule", self.lr_schedule, ("cosine", "linear", "constant"))
        choice(f"{path}.student_ref", self.student_ref, ("init", "current"))
        choice(
            f"{path}.attn_implementation",
            self.attn_implementation,
            ("auto", "flash_attention_2", "sdpa", "sdpa_packed", "eager"),
        )
        for name in (
            "num_workers",
            "cpus_per_worker",
            "lr",
            "max_steps",
            "micro_batch_tokens",
            "shuffle_window_tokens",
            "grad_accum",
            "loss_chunk_size",
            "log_every",
            "checkpoint_every",
        ):
            positive(f"{path}.{name}", getattr(self, name))
        for name in (
            "weight_decay",
            "warmup_steps",
            "rescore_every",
            "weight_warmup_steps",
            "grad_clip",
        ):
            positive(f"{path}.{name}", getattr(self, name), strict=False)


SPACE_TYPES = ("uniform", "loguniform", "randint", "choice", "grid")
METRIC_MODES = {"val_nll": "min", "val_accuracy": "max", "val_reverse_kl": "min"}


def _check_space(path: str, space: dict) -> None:
    """Each search-space key names a config field (or ``weights.preset``); each spec is a
    list (a choice) or {type, low, high} / {type, values} with sensible bounds."""
    for key, spec in space.items():
        where = f"{path}.{key}"
        if key != "weights.preset":
            node: Any = RaydcConfig
            for part in key.split("."):
                hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
                if part not in hints:
                    raise ConfigError(f"{where}: {key!r} is not a config field")
                node = hints[part]
            if dataclasses.is_dataclass(node):
                raise ConfigError(f"{where}: {key!r} is a section, not a field")
        if isinstance(spec, list):
            spec = {"type": "choice", "values": spec}
        if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
            raise ConfigError(
                f"{where}={spec!r}: must be a list or a mapping with type one of {list(SPACE_TYPES)}"
            )
        if spec["type"] in ("choice", "grid"):
            if not isinstance(spec.get("values"), list) or not spec["values"]:
                raise ConfigError(f"{where}.values: must be a non-empty list")
            continue
        low, high = spec.get("low"), spec.get("high")
        for name, v in (("low", low), ("high", high)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{where}.{name}={v!r}: must be a number")
        if not low < high:
            raise ConfigError(f"{where}.low={low!r}: must be < high ({high!r})")
        if spec["type"] == "loguniform" and low <= 0:
            raise ConfigError(f"{where}.low={low!r}: must be > 0 for loguniform")


@dataclass
class TuneConfig:
    """Ray Tune over WeightConfig (and train) fields; trials reuse the stored scores.

    The defaults are what the quality benchmark showed keeps Tune from choosing noise
    (docs/results.md, docs/tuning.md): trials judged on the graded accuracy of >= 300
    held-out problems, two training seeds each, no early stopping (ASHA has nothing to cut
    on one end-of-training measure)."""

    enabled: bool = False
    num_samples: int = 8  # trials (grid: repeats of the whole grid)
    metric: str = "val_accuracy"  # val_accuracy | val_nll | val_reverse_kl
    mode: str = "auto"  # auto (from the metric) | min | max
    search_alg: str = "optuna"  # optuna (TPE) | random | grid
    scheduler: str = "none"  # asha | none
    grace_period: int = 1  # ASHA: reports before a trial may be stopped
    reduction_factor: int = 2  # ASHA: keep 1 / reduction_factor at each rung
    max_concurrent_trials: int | None = None  # None: what the cluster's CPUs/GPUs fit
    max_failures: int = 1  # retries of a failed trial
    driver_cpus: float = 0.01  # the per-trial driver; its TorchTrainer asks for its own
    # Training seeds per trial: train.seed, train.seed + 1, ... trained one after another;
    # the trial is judged on the mean of the metric over them (ASHA then stops over seeds)
    seeds: int = 2
    # The held-out problems val_accuracy / val_reverse_kl judge a trial on; "": eval.path (a
    # file of its own keeps the final eval free of the sweep's choice)
    val_path: str = ""
    # the first N of them; None: all of val_path, or eval.num_prompts of eval.path
    val_problems: int | None = None
    # Refuse a sweep whose trials are judged on fewer validation problems (the eval
    # metrics' prompts, or val_nll's held-out prompts under each trial seed); 0: no minimum
    min_val_problems: int = 300
    # dotted field -> [values] | {"type": uniform|loguniform|randint, "low", "high"}
    #                          | {"type": choice|grid, "values": [...]}
    space: dict = field(default_factory=dict)
    # A point of the space evaluated first, a value for each of its keys (e.g. plain SFT);
    # the sweep then chooses it unless a trial beats it by more than baseline_margin
    # standard errors of their difference (paired over seeds; binomial for val_accuracy at
    # least). {}: no baseline
    baseline: dict = field(default_factory=dict)
    baseline_margin: float = 1.0

    def validate(self, path: str) -> None:
        choice(f"{path}.metric", self.metric, tuple(METRIC_MODES))
        choice(f"{path}.mode", self.mode, ("auto", "min", "max"))
        choice(f"{path}.search_alg", self.search_alg, ("optuna", "random", "grid"))
        choice(f"{path}.scheduler", self.scheduler, ("asha", "none"))
        for name in ("num_samples", "grace_period", "driver_cpus", "seeds"):
            positive(f"{path}.{name}", getattr(self, name))
        positive(f"{path}.max_concurrent_trials", self.max_concurrent_trials)
        positive(f"{path}.max_failures", self.max_failures, strict=False)
        positive(f"{path}.val_problems", self.val_problems)
        positive(f"{path}.min_val_problems", self.min_val_problems, strict=False)
        if self.metric == "val_nll":
            for name in ("val_path", "val_problems"):
                if getattr(self, name):
                    raise ConfigError(
                        f"{path}.{name}={getattr(self, name)!r}: sets the problems of the eval "
                        "metrics (val_accuracy, val_reverse_kl); val_nll is measured on the "
                        "held-out share of the training prompts (train.val_share)"
                    )
        if self.val_problems is not None and self.val_problems < self.min_val_problems:
            raise ConfigError(
                f"{path}.val_problems={self.val_problems}: below "
                f"{path}.min_val_problems={self.min_val_problems}"
            )
        if self.seeds > 1 and "train.seed" in self.space:
            raise ConfigError(
                f"{path}.space.train.seed: with {path}.seeds={self.seeds} each trial trains "
                "train.seed, train.seed + 1, ...; search the seed or set seeds, not both"
            )
        if self.reduction_factor < 2:
            raise ConfigError(f"{path}.reduction_factor={self.reduction_factor!r}: must be >= 2")
        _check_space(f"{path}.space", self.space)
        positive(f"{path}.baseline_margin", self.baseline_margin, strict=False)
        self._check_baseline(path)
        if self.search_alg == "grid":
            for key, spec in self.space.items():
                if isinstance(spec, dict) and spec.get("type") not in ("choice", "grid"):
                    raise ConfigError(
                        f"{path}.space.{key}: search_alg grid needs a list of values, "
                        f"got type {spec.get('type')!r}"
                    )
        if self.enabled and not self.space:
            raise ConfigError(f"{path}.space: empty; name at least one field to search")

    def _check_baseline(self, path: str) -> None:
        """The baseline names one value of the space for each of its keys."""
        if not self.baseline:
            return
        missing = [k for k in self.space if k not in self.baseline]
        if missing:
            raise ConfigError(f"{path}.baseline: names no value for {path}.space key(s) {missing}")
        for key, v in self.baseline.items():
            where = f"{path}.baseline.{key}"
            if key not in self.space:
                raise ConfigError(f"{where}: not a key of {path}.space")
            spec = self.space[key]
            spec = {"type": "choice", "values": spec} if isinstance(spec, list) else spec
            if "values" in spec:
                if v not in spec["values"]:
                    raise ConfigError(f"{where}={v!r}: not one of {path}.space's {spec['values']}")
                continue
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not number or not spec["low"] <= v <= spec["high"]:
                raise ConfigError(f"{where}={v!r}: outside [{spec['low']}, {spec['high']}]")
            if spec["type"] == "randint" and (v != int(v) or v >= spec["high"]):
                raise ConfigError(f"{where}={v!r}: randint draws integers in [low, high)")

    @property
    def resolved_mode(self) -> str:
        return METRIC_MODES[self.metric] if self.mode == "auto" else self.mode


PHASE_SECTIONS = ("data", "generate", "mixed_policy", "score", "select", "weights", "train")


@dataclass
class PhaseConfig:
    """One DASD training phase (``phases:``): its overrides of the job's sections; it starts
    from the previous phase's weights (and optimizer state)."""

    name: str = ""
    data: dict = field(default_factory=dict)
    generate: dict = field(default_factory=dict)
    mixed_policy: dict = field(default_factory=dict)
    score: dict = field(default_factory=dict)
    select: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    scores_from: str = "previous"  # previous: score under the last phase's student | initial
    optimizer: str = "carry"  # carry: the last phase's optimizer state | fresh

    def validate(self, path: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name or ""):
            raise ConfigError(f"{path}.name={self.name!r}: a folder name (letters, digits, _ . -)")
        choice(f"{path}.scores_from", self.scores_from, ("previous", "initial"))
        choice(f"{path}.optimizer", self.optimizer, ("carry", "fresh"))


# train fields each on-policy round sets itself (on_policy.train may not)
ON_POLICY_TRAIN_OWN = ("student", "student_ref", "max_steps", "init_checkpoint", "scored_student")


@dataclass
class OnPolicyConfig:
    """On-policy distillation rounds (``raydc.on_policy``): each round the current student
    samples ``n_samples`` answers per prompt, the teacher scores exactly those tokens, and
    training takes ``steps_per_round`` steps with the ``advantage`` weight (tinker's
    importance-sampling loss; ``baseline`` subtracts the step's mean advantage), from the
    previous round's weights and optimizer state."""

    enabled: bool = False  # true: run_all runs the stage after train / tune
    prompts: str = ""  # the prompts (JSONL / Parquet / a folder of them)
    prompt_key: str = "auto"  # auto: prompt | question | problem
    id_key: str = "id"  # prompt id column; "{file}:{index}" when absent
    system_prompt: str | None = None
    num_prompts: int | None = None  # the first N prompts only
    prompts_per_round: int | None = None  # None: every prompt each round; else a cyclic slice
    # student: round 0 starts from on_policy.student (else train.student or score.student);
    # trained: from the job's trained model (train / tune / the last phase) and its optimizer
    start: str = "student"
    student: str = ""
    teacher: str = ""  # "" -> score.teacher, else generate.teacher
    rounds: int = 2
    n_samples: int = 4  # samples per prompt each round
    steps_per_round: int = 8  # optimizer steps per round
    temperature: float = 1.0  # the student's sampling temperature (1: on-policy exactly)
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0  # round r samples with seed + r * 1_000_003
    advantage_coef: float = 1.0  # c in w = c (log p_T - log p_samp) clip(ratio)
    ratio_min: float = 0.0  # the importance ratio's clip (weights.w_min of the advantage)
    ratio_max: float = 2.0
    # subtracted from the advantage: none (tinker-cookbook's form) or batch_mean (the
    # step's mean advantage; measured better after offline training in every bench regime,
    # worse from the initial student: docs/method.md)
    baseline: str = "none"
    # Guards: the stage stops, naming the field, when a round's samples leave the band
    eos_rate_min: float = 0.0  # share of samples ending with a stop token (0: off)
    mean_length_min: float | None = None  # tokens
    mean_length_max: float | None = None
    # Overrides of the train section for the rounds (lr, lr_schedule, warmup, workers...);
    # not the fields each round sets (ON_POLICY_TRAIN_OWN)
    train: dict = field(default_factory=dict)
    engine: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)

    def weights(self) -> WeightConfig:
        """The rounds' weighting: the ``opd`` preset with this section's coefficient and
        ratio clip."""
        return preset(
            "opd",
            c=self.advantage_coef,
            w_min=self.ratio_min,
            w_max=self.ratio_max,
            baseline=self.baseline,
        )

    def validate(self, path: str) -> None:
        choice(f"{path}.start", self.start, ("student", "trained"))
        choice(f"{path}.baseline", self.baseline, BASELINES)
        for name in ("rounds", "steps_per_round", "temperature"):
            positive(f"{path}.{name}", getattr(self, name))
        positive(f"{path}.num_prompts", self.num_prompts)
        positive(f"{path}.prompts_per_round", self.prompts_per_round)
        _check_sampling(path, self)
        for name in ("advantage_coef", "ratio_min", "ratio_max", "eos_rate_min"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ConfigError(f"{path}.{name}={v!r}: must be a finite number")
        positive(f"{path}.advantage_coef", self.advantage_coef)
        positive(f"{path}.ratio_min", self.ratio_min, strict=False)
        positive(f"{path}.ratio_max", self.ratio_max)
        if self.ratio_min > self.ratio_max:
            raise ConfigError(
                f"{path}.ratio_min={self.ratio_min!r}: must be <= ratio_max ({self.ratio_max})"
            )
        if not 0.0 <= self.eos_rate_min <= 1.0:
            raise ConfigError(f"{path}.eos_rate_min={self.eos_rate_min!r}: must be in [0, 1]")
        positive(f"{path}.mean_length_min", self.mean_length_min, strict=False)
        positive(f"{path}.mean_length_max", self.mean_length_max)
        lo, hi = self.mean_length_min, self.mean_length_max
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"{path}.mean_length_min={lo!r}: must be <= mean_length_max ({hi})")
        own = sorted(set(self.train) & set(ON_POLICY_TRAIN_OWN))
        if own:
            raise ConfigError(
                f"{path}.train.{own[0]}: set by each round (round 0: {path}.student or "
                f"{path}.start; {path}.steps_per_round; student_ref is current), not here"
            )
        train = build(TrainConfig, self.train, f"{path}.train")
        train.student_ref = "current"
        train.validate(f"{path}.train")
        self.weights()  # the ranges above make it valid


TRACKERS = ("tensorboard", "mlflow", "wandb")  # run.trackers; raydc.infra.tracking logs to them


@dataclass
class RunConfig:
    """Where a run writes and which Ray cluster it uses."""

    # Stage outputs, checkpoints and Tune results: <output_dir>/<stage>/. On a multi-node
    # cluster, a path on storage every node mounts (see cluster.yaml).
    output_dir: str = "runs/default"
    ray_address: str | None = None  # None: RAY_ADDRESS or a local Ray; "auto", host:port, ray://
    seed: int = 0
    # Experiment tracking (raydc.infra.tracking), any of: tensorboard (<stage>/tensorboard/),
    # mlflow, wandb (pip install 'raydc[tracking]'). [] logs to metrics.jsonl only
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # None: MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlruns/mlflow.db
    mlflow_tracking_uri: str | None = None
    experiment: str = "raydc"  # the MLflow experiment and the W&B project

    def validate(self, path: str) -> None:
        # An empty value would mean "the current folder", where stage folders would be
        # created and cleared beside the user's own files.
        if not str(self.output_dir or "").strip():
            raise ConfigError(f"{path}.output_dir={self.output_dir!r}: must name a folder")
        for i, name in enumerate(self.trackers):
            choice(f"{path}.trackers[{i}]", name, TRACKERS)
        if len(set(self.trackers)) != len(self.trackers):
            raise ConfigError(f"{path}.trackers={self.trackers}: names a tracker twice")
        if not str(self.experiment or "").strip():
            raise ConfigError(f"{path}.experiment={self.experiment!r}: must name an experiment")


@dataclass
class RaydcConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    weights: WeightConfig = field(default_factory=lambda: preset("discord"))
    select: SelectConfig = field(default_factory=SelectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    mixed_policy: MixedPolicyConfig = field(default_factory=MixedPolicyConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    # DASD training phases (raydc.pipeline.phases): each phase's overrides of the sections
    # above, run in order, each starting from the previous one's model; empty: one phase
    phases: list[PhaseConfig] = field(default_factory=list)

    def validate(self) -> RaydcConfig:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        self._validate_phases()
        if (
            needs_entropy(self.weights)
            and self.train.student_ref != "current"
            and self.score.entropy == "off"
        ):
            raise ConfigError(
                f"weights.gate={self.weights.gate}: needs the student's per-token entropy: "
                "store it (score.entropy=auto or on) or compute it live "
                "(train.student_ref=current)"
            )
        return self

    def stores_entropy(self) -> bool:
        """Whether the score stage stores the student's entropy (``score.entropy``; with
        auto, when the weighting or a Tune space over it may use an entropy gate)."""
        if self.score.entropy != "auto":
            return self.score.entropy == "on"
        if needs_entropy(self.weights):
            return True
        if not self.tune.enabled:
            return False
        for key, spec in self.tune.space.items():
            if key.startswith("weights.gate"):
                return True
            if key == "weights.preset":
                values = spec.get("values", []) if isinstance(spec, dict) else spec
                if any(_gated_preset(v) for v in values):
                    return True
        return False

    def _validate_phases(self) -> None:
        """Each phase's name and overrides, checked now rather than phases later."""
        names = [s.name for s in self.phases]
        lora_before = False
        for i, spec in enumerate(self.phases):
            spec.validate(f"phases[{i}]")
            if spec.name in names[:i]:
                raise ConfigError(f"phases[{i}].name={spec.name!r}: used by another phase")
            try:
                phase = from_dict(phase_tree(self, spec))
            except ConfigError as e:
                raise ConfigError(f"phases[{i}] ({spec.name}): {e}") from None
            lora = phase.train.lora.enabled
            if i and spec.optimizer == "carry" and (lora or lora_before):
                # Phase i trains on phase i-1's merged model: a carried adapter (or its
                # optimizer state) would apply phase i-1's update twice.
                raise ConfigError(
                    f"phases[{i}].optimizer='carry' ({spec.name}): with train.lora a phase "
                    "trains a fresh adapter on the previous phase's merged model; set "
                    f"phases[{i}].optimizer: fresh"
                )
            lora_before = lora

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gated_preset(name) -> bool:
    try:
        return needs_entropy(preset(name))
    except (WeightConfigError, TypeError):
        return False  # not a preset: tune's own check names it


def _merge(into: dict, over: dict) -> dict:
    """``over`` on top of ``into``, nested mappings merged key by key."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v
    return into


def phase_tree(cfg: RaydcConfig, spec: PhaseConfig) -> dict:
    """The job's config as a dict with phase ``spec``'s overrides applied (a weights
    override naming a preset replaces the job's weighting; others merge into it)."""
    tree = cfg.to_dict()
    tree.pop("phases")
    for section in PHASE_SECTIONS:
        over = copy.deepcopy(getattr(spec, section))
        if section == "weights" and "preset" in over:
            tree[section] = over
        else:
            _merge(tree[section], over)
    return tree


# ----------------------------------------------------------------------------- loading


def _weights_section(data: dict) -> dict:
    """`weights: {preset: discord, tau: 2}` expands the preset, then applies the rest."""
    data = dict(data or {})
    name = data.pop("preset", None)
    if name is None:
        return data
    try:
        base = preset(name).to_dict()
    except WeightConfigError as e:
        raise ConfigError(f"weights.preset={name!r}: {e}") from e
    return {**base, **data}


def from_dict(data: dict | None, overrides: list[str] | dict | None = None) -> RaydcConfig:
    """Build and validate a config from a (YAML-shaped) dict plus dotted overrides."""
    tree = copy.deepcopy(data or {})
    if "stages" in tree:  # renamed: "stage" is a step of the pipeline (prepare, score...)
        raise ConfigError(
            "stages: renamed to phases (the DASD training phases); write phases: instead"
        )
    items = (
        overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    )
    for key, value in items:
        set_dotted(tree, key, value)
    if "weights" in tree:
        tree["weights"] = _weights_section(tree["weights"])
    try:
        cfg = build(RaydcConfig, tree, "")
    except WeightConfigError as e:
        raise ConfigError(f"weights: {e}") from e
    return cfg.validate()


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict | None = None
) -> RaydcConfig:
    """Load YAML (or nothing: the defaults) and apply dotted overrides.

    The file is read with ``yaml.safe_load``: plain data only. A tag that would build a
    Python object (``!!python/object/apply:os.system``) is refused with a ConfigError that
    names the file, line and tag (safe_load never executes it); so is YAML that does not
    parse."""
    data = {}
    if path:
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
            problem = getattr(e, "problem", None) or str(e)
            tag = re.search(r"constructor for the tag '([^']*)'", problem)
            if tag:
                name = re.sub(r"^tag:yaml\.org,2002:", "!!", tag.group(1))
                raise ConfigError(
                    f"{where}: the YAML tag {name} is not allowed: a config is plain data "
                    "(mappings, lists, strings, numbers) and nothing in it was executed"
                ) from None
            raise ConfigError(f"{where}: not valid YAML ({problem})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    return from_dict(data, overrides)


def dump_config(cfg: RaydcConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
