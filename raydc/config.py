"""One typed config tree for every stage: YAML + dotted ``key=value`` overrides, validated.

Each stage takes its own section (``cfg.data``, ``cfg.score``, ``cfg.train``...). Unknown
keys, wrong types and out-of-range values fail with the dotted field path in the message,
e.g. ``train.lr=-1: must be > 0``. Ray Tune's search space names the same dotted fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raydc.weights import WeightConfig, WeightConfigError, preset


class ConfigError(ValueError):
    """An invalid configuration value; the message names the dotted field."""


def _positive(path: str, value, strict: bool = True) -> None:
    if value is None:
        return
    if (strict and value <= 0) or (not strict and value < 0):
        raise ConfigError(f"{path}={value!r}: must be {'> 0' if strict else '>= 0'}")


def _choice(path: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{path}={value!r}: must be one of {list(choices)}")


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
    teacher_tokens_key: str = "teacher_tokens"  # optional token strings for those
    teacher_offsets_key: str = "teacher_offsets"  # optional char offsets for those
    # optional teacher token ids for the log-probs, in the teacher's own tokenizer (a
    # public -Logprob set): decoded with data.teacher_tokenizer to character spans
    teacher_token_ids_key: str = "teacher_token_ids"
    teacher_tokenizer: str | None = None  # the tokenizer of teacher_token_ids (folder)
    system_prompt: str | None = None
    tokenizer: str | None = None  # tokenizer folder / shipped name; default: score.student
    max_length: int = 2048
    overlength: str = "drop"  # drop | truncate
    max_reject_share: float = 0.5
    limit: int | None = None  # read only the first N rows (smoke runs)

    def validate(self, path: str) -> None:
        _choice(f"{path}.format", self.format, ("auto", "jsonl", "parquet", "hf"))
        _choice(f"{path}.schema", self.schema, ("auto", "chat", "prompt_response"))
        _choice(f"{path}.overlength", self.overlength, ("drop", "truncate"))
        _positive(f"{path}.max_length", self.max_length)
        _positive(f"{path}.limit", self.limit)
        if not 0.0 <= self.max_reject_share <= 1.0:
            raise ConfigError(
                f"{path}.max_reject_share={self.max_reject_share!r}: must be in [0, 1]"
            )


@dataclass
class ScoreConfig:
    """Scoring teacher tokens under the student (and teacher) with vLLM actors."""

    backend: str = "vllm"  # vllm | transformers
    student: str = ""  # model folder or hub name
    teacher: str | None = None  # score the teacher too, when the data has no teacher log-probs
    dtype: str = "float32"  # float32 on CPU; bfloat16 / float16 on GPU
    batch_size: int = 16  # rows per Ray Data batch sent to an engine
    num_engines: int = 1  # vLLM actors (one per GPU on a cluster)
    tensor_parallel_size: int = 1
    gpus_per_engine: float = 0.0  # 0 on CPU machines
    cpus_per_engine: float = 1.0
    max_model_len: int = 2048
    max_num_batched_tokens: int = 4096  # bounds the [tokens x vocab] prompt-logprob spike
    gpu_memory_utilization: float = 0.1  # on CPU: the share of RAM for the KV cache
    enforce_eager: bool = True
    # The scored store: log-probs as float16 (2 B a token, error <= 2**-11 of the value) or
    # float32; inspection also writes text, offsets, conversation and the configured
    # weights to score/inspect/ (training never reads them).
    logprobs: str = "float16"
    inspection: bool = False
    # The temperature the traces were sampled at: the teacher's log-probs are those of
    # softmax(logits / T), the distribution the tokens came from (DASD samples at 0.6 and
    # 1.0). The student is always scored at 1: it is the model being trained.
    teacher_temperature: float = 1.0

    def validate(self, path: str) -> None:
        _choice(f"{path}.backend", self.backend, ("vllm", "transformers"))
        _positive(f"{path}.teacher_temperature", self.teacher_temperature)
        _choice(f"{path}.logprobs", self.logprobs, ("float16", "float32"))
        _choice(f"{path}.dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))
        for name in (
            "batch_size",
            "num_engines",
            "tensor_parallel_size",
            "max_model_len",
            "max_num_batched_tokens",
            "cpus_per_engine",
        ):
            _positive(f"{path}.{name}", getattr(self, name))
        _positive(f"{path}.gpus_per_engine", self.gpus_per_engine, strict=False)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"{path}.gpu_memory_utilization={self.gpu_memory_utilization!r}: must be in (0, 1]"
            )


@dataclass
class SelectConfig:
    """DASD divergence-aware selection (off unless enabled)."""

    enabled: bool = False
    threshold: float = 0.0
    top_k: int = 1

    def validate(self, path: str) -> None:
        _positive(f"{path}.top_k", self.top_k)


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
    min_lr_ratio: float = 0.0  # the decay ends at min_lr_ratio * lr
    val_share: float = 0.0  # share of prompts held out for val_nll (0: no validation)
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    keep_checkpoints: int = 2  # newest checkpoints kept

    def validate(self, path: str) -> None:
        _choice(f"{path}.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice(f"{path}.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{path}.min_lr_ratio={self.min_lr_ratio!r}: must be in [0, 1]")
        if not 0.0 <= self.val_share < 1.0:
            raise ConfigError(f"{path}.val_share={self.val_share!r}: must be in [0, 1)")
        _positive(f"{path}.keep_checkpoints", self.keep_checkpoints)
        _positive(f"{path}.max_failures", self.max_failures, strict=False)
        if self.rescore_every and self.student_ref != "init":
            raise ConfigError(
                f"{path}.rescore_every={self.rescore_every!r}: re-scoring rounds refresh the "
                "stored scores of student_ref=init; student_ref=current scores every step"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"{path}.offload_params=True: needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError(f"{path}.offload_optimizer=True: needs zero_stage >= 1")
        _choice(f"{path}.lr_schedule", self.lr_schedule, ("cosine", "linear", "constant"))
        _choice(f"{path}.student_ref", self.student_ref, ("init", "current"))
        _choice(
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
            _positive(f"{path}.{name}", getattr(self, name))
        for name in (
            "weight_decay",
            "warmup_steps",
            "rescore_every",
            "weight_warmup_steps",
            "grad_clip",
        ):
            _positive(f"{path}.{name}", getattr(self, name), strict=False)


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
    """Ray Tune over WeightConfig (and train) fields; trials reuse the stored scores."""

    enabled: bool = False
    num_samples: int = 4  # trials (grid: repeats of the whole grid)
    metric: str = "val_nll"  # val_nll | val_accuracy | val_reverse_kl
    mode: str = "auto"  # auto (from the metric) | min | max
    search_alg: str = "optuna"  # optuna (TPE) | random | grid
    scheduler: str = "asha"  # asha | none
    grace_period: int = 1  # ASHA: reports before a trial may be stopped
    reduction_factor: int = 2  # ASHA: keep 1 / reduction_factor at each rung
    max_concurrent_trials: int | None = None  # None: what the cluster's CPUs/GPUs fit
    max_failures: int = 1  # retries of a failed trial
    driver_cpus: float = 0.01  # the per-trial driver; its TorchTrainer asks for its own
    # dotted field -> [values] | {"type": uniform|loguniform|randint, "low", "high"}
    #                          | {"type": choice|grid, "values": [...]}
    space: dict = field(default_factory=dict)

    def validate(self, path: str) -> None:
        _choice(f"{path}.metric", self.metric, tuple(METRIC_MODES))
        _choice(f"{path}.mode", self.mode, ("auto", "min", "max"))
        _choice(f"{path}.search_alg", self.search_alg, ("optuna", "random", "grid"))
        _choice(f"{path}.scheduler", self.scheduler, ("asha", "none"))
        for name in ("num_samples", "grace_period", "driver_cpus"):
            _positive(f"{path}.{name}", getattr(self, name))
        _positive(f"{path}.max_concurrent_trials", self.max_concurrent_trials)
        _positive(f"{path}.max_failures", self.max_failures, strict=False)
        if self.reduction_factor < 2:
            raise ConfigError(f"{path}.reduction_factor={self.reduction_factor!r}: must be >= 2")
        _check_space(f"{path}.space", self.space)
        if self.search_alg == "grid":
            for key, spec in self.space.items():
                if isinstance(spec, dict) and spec.get("type") not in ("choice", "grid"):
                    raise ConfigError(
                        f"{path}.space.{key}: search_alg grid needs a list of values, "
                        f"got type {spec.get('type')!r}"
                    )
        if self.enabled and not self.space:
            raise ConfigError(f"{path}.space: empty; name at least one field to search")

    @property
    def resolved_mode(self) -> str:
        return METRIC_MODES[self.metric] if self.mode == "auto" else self.mode


@dataclass
class EngineConfig:
    """vLLM generation engines for eval and generate (``eval.engine``, ``generate.engine``)."""

    backend: str = "auto"  # auto (ray when Ray is up or run.ray_address is set) | ray | local
    dtype: str = "float32"  # float32 on CPU; bfloat16 / float16 on GPU
    num_engines: int = 1  # vLLM actors on Ray Data (one per GPU group on a cluster)
    tensor_parallel_size: int = 1
    gpus_per_engine: float = 0.0  # 0 on CPU machines
    cpus_per_engine: float = 1.0
    max_model_len: int = 2048  # prompt + generated tokens
    gpu_memory_utilization: float = 0.1  # on CPU: the share of RAM for the KV cache
    enforce_eager: bool = True
    batch_size: int = 32  # requests per Ray Data batch sent to an engine

    def validate(self, path: str) -> None:
        _choice(f"{path}.backend", self.backend, ("auto", "ray", "local"))
        _choice(f"{path}.dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))
        for name in (
            "num_engines",
            "tensor_parallel_size",
            "cpus_per_engine",
            "max_model_len",
            "batch_size",
        ):
            _positive(f"{path}.{name}", getattr(self, name))
        _positive(f"{path}.gpus_per_engine", self.gpus_per_engine, strict=False)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"{path}.gpu_memory_utilization={self.gpu_memory_utilization!r}: must be in (0, 1]"
            )


def _check_sampling(path: str, cfg) -> None:
    _positive(f"{path}.n_samples", cfg.n_samples)
    _positive(f"{path}.max_new_tokens", cfg.max_new_tokens)
    _positive(f"{path}.temperature", cfg.temperature, strict=False)
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"{path}.top_p={cfg.top_p!r}: must be in (0, 1]")
    if cfg.max_new_tokens >= cfg.engine.max_model_len:
        raise ConfigError(
            f"{path}.max_new_tokens={cfg.max_new_tokens}: must be < "
            f"{path}.engine.max_model_len ({cfg.engine.max_model_len}) to leave room for a prompt"
        )
    cfg.engine.validate(f"{path}.engine")


@dataclass
class EvalConfig:
    """Generation on held-out prompts and grading."""

    enabled: bool = True
    path: str = ""  # held-out prompts with answers (JSONL / Parquet)
    grader: str = "gsm8k"  # gsm8k | boxed
    prompt_key: str = "auto"  # auto: question | problem | prompt
    answer_key: str = "auto"  # auto: answer | solution (a full gold solution or a bare answer)
    id_key: str = "id"  # row id column; "{file}:{index}" when absent
    prompt_template: str = "{prompt}"  # the user message; e.g. "{prompt}\nEnd with #### <n>."
    system_prompt: str | None = None
    num_prompts: int | None = None  # the first N prompts only
    n_samples: int = 1  # samples per prompt (pass@1 averages over them)
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0  # sample k of prompt i uses seed + i * n_samples + k
    # Also evaluate the student before training (same prompts and settings), reported as
    # initial_pass@1 beside pass@1: the gain is the run's result, not the final figure alone.
    baseline: bool = True
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self, path: str) -> None:
        _choice(f"{path}.grader", self.grader, ("gsm8k", "boxed"))
        _positive(f"{path}.num_prompts", self.num_prompts)
        _check_sampling(path, self)


@dataclass
class GenerateConfig:
    """Teacher trace sampling with vLLM, recording the teacher's log-probs of its samples."""

    # true: a first stage of the job samples the traces, and prepare reads them instead
    # of data.path (`raydc generate` runs the stage alone either way)
    enabled: bool = False
    prompts: str = ""  # the prompts: JSONL / Parquet / a saved datasets folder
    teacher: str = ""  # the model that writes the traces; "" -> score.teacher
    prompt_key: str = "auto"  # auto: prompt | question | problem
    id_key: str = "id"  # prompt id column; "{file}:{index}" when absent
    system_prompt: str | None = None
    num_prompts: int | None = None
    n_samples: int = 1  # traces per prompt (DASD selection keeps the top-k of them)
    temperature: float = 1.0  # DASD: T=0.6 traces first, then T=1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0
    keep_truncated: bool = False  # keep traces cut at max_new_tokens (no stop token)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self, path: str) -> None:
        _positive(f"{path}.num_prompts", self.num_prompts)
        _check_sampling(path, self)
        if self.enabled and not self.prompts:
            raise ConfigError(f"{path}.prompts: not set; name the prompts to sample traces for")


@dataclass
class RunConfig:
    """Where a run writes and which Ray cluster it uses."""

    # Stage outputs, checkpoints and Tune results: <output_dir>/<stage>/. On a multi-node
    # cluster, a path on storage every node mounts (see cluster.yaml).
    output_dir: str = "runs/default"
    ray_address: str | None = None  # None: RAY_ADDRESS or a local Ray; "auto", host:port, ray://
    seed: int = 0

    def validate(self, path: str) -> None:
        # An empty value would mean "the current folder", where stage folders would be
        # created and cleared beside the user's own files.
        if not str(self.output_dir or "").strip():
            raise ConfigError(f"{path}.output_dir={self.output_dir!r}: must name a folder")


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

    def validate(self) -> RaydcConfig:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def _coerce(path: str, tp: Any, value: Any) -> Any:
    """Check/convert one leaf value against its annotation; errors name the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(path, a, value)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{path}={value!r}: invalid")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}={value!r}: must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}={value!r}: must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}={value!r}: must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}={value!r}: must be a string")
    if origin in (dict,) or tp is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{path}={value!r}: must be a mapping")
    if origin in (list,) or tp is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{path}={value!r}: must be a list")
    return value


def _build(cls, data: dict, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config field(s) {[where + u for u in unknown]}; "
            f"known in {path or 'the top level'}: {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        fpath = f"{path}.{name}" if path else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = value if isinstance(value, tp) else _build(tp, value, fpath)
        else:
            kwargs[name] = _coerce(fpath, tp, value)
    try:
        return cls(**kwargs)
    except WeightConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


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


def parse_override(item: str) -> tuple[str, Any]:
    """``train.lr=3e-4`` -> ("train.lr", 3e-4); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def from_dict(data: dict | None, overrides: list[str] | dict | None = None) -> RaydcConfig:
    """Build and validate a config from a (YAML-shaped) dict plus dotted overrides."""
    tree = _deepcopy(data or {})
    items = (
        overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    )
    for key, value in items:
        set_dotted(tree, key, value)
    if "weights" in tree:
        tree["weights"] = _weights_section(tree["weights"])
    return _build(RaydcConfig, tree, "").validate()


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict | None = None
) -> RaydcConfig:
    """Load YAML (or nothing: the defaults) and apply dotted overrides."""
    data = {}
    if path:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    return from_dict(data, overrides)


def _deepcopy(d):
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def dump_config(cfg: RaydcConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
