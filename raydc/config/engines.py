"""The vLLM sections of the config tree: one engine config and the three sampling stages.

``VLLMEngineConfig`` is the one home of an engine's settings, reused by ``score.engine``,
``eval.engine``, ``generate.engine`` and ``mixed_policy.engine``; the sampling sections
(eval, generate, mixed-policy) share their checks. ``raydc.config`` assembles the tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raydc.config.tree import ConfigError, choice, positive

# How many times Ray restarts an engine actor whose vLLM engine died (and retries the
# batches it held) before the stage fails. Ray Data's default is forever, which turned a
# repeatable engine crash into a generate stage that restarted its engine with no end and
# no error at the driver.
ENGINE_RESTARTS = 1


@dataclass
class VLLMEngineConfig:
    """vLLM engines on Ray Data, one section per stage: ``score.engine``, ``eval.engine``,
    ``generate.engine``. The ``vllm.LLM`` arguments and the Ray resources of an engine are
    derived here (``llm_kwargs``, ``actor_pool_args``, ``processor_args``) and nowhere else.
    """

    # auto (ray when Ray is up or run.ray_address is set) | ray | local: where eval and
    # generate run their engines; scoring always runs them as a Ray Data actor pool
    backend: str = "auto"
    dtype: str = "float32"  # float32 on CPU; bfloat16 / float16 on GPU
    num_engines: int = 1  # vLLM actors on Ray Data (one per GPU group on a cluster)
    tensor_parallel_size: int = 1  # GPUs one engine spans
    gpus_per_engine: float = 0.0  # GPUs of one engine, all its tensor-parallel workers; 0 on CPU
    cpus_per_engine: float = 1.0
    max_model_len: int = 2048  # the engine's context: score's longest row; eval: prompt + output
    # Tokens per engine step (None: vLLM's default). Scoring bounds it: prompt log-probs
    # materialise a [tokens x vocab] float32 tensor per step.
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.1  # on CPU: the share of RAM for the KV cache
    enforce_eager: bool = True
    batch_size: int = 32  # rows (requests) per Ray Data batch sent to an engine

    def validate(self, path: str) -> None:
        choice(f"{path}.backend", self.backend, ("auto", "ray", "local"))
        choice(f"{path}.dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))
        for name in (
            "num_engines",
            "tensor_parallel_size",
            "cpus_per_engine",
            "max_model_len",
            "max_num_batched_tokens",
            "batch_size",
        ):
            positive(f"{path}.{name}", getattr(self, name))
        positive(f"{path}.gpus_per_engine", self.gpus_per_engine, strict=False)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"{path}.gpu_memory_utilization={self.gpu_memory_utilization!r}: must be in (0, 1]"
            )

    def llm_kwargs(
        self, logprobs_mode: str, max_model_len: int | None = None, seeded: bool = False
    ) -> dict:
        """``vllm.LLM`` arguments (the model aside); ``max_model_len`` replaces the
        configured context (scoring counts the one token vLLM generates).

        ``seeded``: the engine samples requests that carry their own seed (generate, eval,
        mixed_policy). On CPU (``gpus_per_engine == 0``) chunked prefill is then off: vLLM
        0.32 rewinds a seeded request's generator (``Generator.set_offset``) after a step
        that prefilled only part of its prompt, and a CPU generator has no offset, so the
        engine died with ``CPU Generator does not use offset`` whenever a step's token
        budget split a prompt (256 prompts at T=1). Without chunking a step takes whole
        prompts only; vLLM raises the budget to at least ``max_model_len`` itself."""
        length = int(self.max_model_len if max_model_len is None else max_model_len)
        kwargs = dict(
            dtype=self.dtype,
            max_model_len=length,
            gpu_memory_utilization=float(self.gpu_memory_utilization),
            tensor_parallel_size=int(self.tensor_parallel_size),
            enforce_eager=bool(self.enforce_eager),
            logprobs_mode=logprobs_mode,
            seed=0,
        )
        if self.max_num_batched_tokens is not None:  # a step holds at least one whole row
            kwargs["max_num_batched_tokens"] = max(int(self.max_num_batched_tokens), length)
        if seeded and self.gpus_per_engine == 0:
            kwargs["enable_chunked_prefill"] = False
        return kwargs

    def actor_pool_args(self) -> dict:
        """``Dataset.map_batches`` arguments of a pool of ``num_engines`` actors, each
        holding one engine and all its resources, fed Arrow batches; a dead actor is
        restarted ``ENGINE_RESTARTS`` times (``restart_args``), not forever."""
        import ray

        args = dict(
            compute=ray.data.ActorPoolStrategy(size=int(self.num_engines)),
            batch_size=int(self.batch_size),
            num_cpus=float(self.cpus_per_engine),
            batch_format="pyarrow",
            **self.restart_args(),
        )
        if self.gpus_per_engine > 0:
            args["num_gpus"] = float(self.gpus_per_engine)
        return args

    def restart_args(self) -> dict:
        """Ray actor options bounding an engine actor's restarts and its batches' retries
        (``ENGINE_RESTARTS`` each): a dead engine is replaced and its batches retried that
        many times, then the stage fails instead of restarting it forever."""
        return dict(max_restarts=ENGINE_RESTARTS, max_task_retries=ENGINE_RESTARTS)

    def processor_args(self) -> dict:
        """``ray.data.llm.vLLMEngineProcessorConfig`` resources: ``num_engines`` engines,
        each a placement group with one bundle per tensor-parallel worker holding its share
        of the engine's GPUs, or one CPU bundle without GPUs (a GPU bundle would wait
        forever on a machine that has none)."""
        if self.gpus_per_engine > 0:
            tp = int(self.tensor_parallel_size)
            share = {
                "CPU": float(self.cpus_per_engine) / tp,
                "GPU": float(self.gpus_per_engine) / tp,
            }
            bundles = [share] * tp
        else:
            bundles = [{"CPU": float(self.cpus_per_engine)}]
        return dict(
            batch_size=int(self.batch_size),
            concurrency=int(self.num_engines),
            placement_group_config={"bundles": bundles},
        )


def _check_sampling(path: str, cfg) -> None:
    positive(f"{path}.n_samples", getattr(cfg, "n_samples", 1))
    positive(f"{path}.max_new_tokens", cfg.max_new_tokens)
    positive(f"{path}.temperature", cfg.temperature, strict=False)
    if not 0.0 < cfg.top_p <= 1.0:
        raise ConfigError(f"{path}.top_p={cfg.top_p!r}: must be in (0, 1]")
    if cfg.max_new_tokens >= cfg.engine.max_model_len:
        raise ConfigError(
            f"{path}.max_new_tokens={cfg.max_new_tokens}: must be < "
            f"{path}.engine.max_model_len ({cfg.engine.max_model_len}) to leave room for a prompt"
        )
    cfg.engine.validate(f"{path}.engine")


def fill_prompt_template(template: str, prompt: str, path: str = "eval.prompt_template") -> str:
    """The user message: ``prompt`` filled into ``template`` with ``str.format`` (its one
    field is ``{prompt}``; a literal brace is doubled). A template ``str.format`` cannot
    fill raises ConfigError naming ``path``."""
    try:
        return template.format(prompt=prompt)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(
            f"{path}={template!r}: {type(e).__name__}: {e}; it is filled with str.format: "
            "{prompt} is the question, and a literal brace is doubled ({{ and }}, "
            "e.g. \\boxed{{}} for \\boxed{})"
        ) from None


# A question no template holds by chance: a template that does not show it has no {prompt}.
_TEMPLATE_PROBE = "<raydc: the question>"


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
    engine: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)

    def validate(self, path: str) -> None:
        choice(f"{path}.grader", self.grader, ("gsm8k", "boxed"))
        positive(f"{path}.num_prompts", self.num_prompts)
        _check_sampling(path, self)
        # Rendered once now, as the eval stage renders each question, so that a template
        # str.format cannot fill fails at load rather than at eval, after training.
        field = f"{path}.prompt_template"
        if _TEMPLATE_PROBE not in fill_prompt_template(
            self.prompt_template, _TEMPLATE_PROBE, field
        ):
            raise ConfigError(
                f"{field}={self.prompt_template!r}: has no {{prompt}}, so every question "
                "would get the same message"
            )


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
    engine: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)

    def validate(self, path: str) -> None:
        positive(f"{path}.num_prompts", self.num_prompts)
        _check_sampling(path, self)
        if self.enabled and not self.prompts:
            raise ConfigError(f"{path}.prompts: not set; name the prompts to sample traces for")


@dataclass
class MixedPolicyConfig:
    """Mixed-policy traces (DASD): the current student starts a response, the teacher
    finishes it from a random cut past half of it, with its log-probs."""

    # true: a stage of the job writes these traces, and prepare reads them instead of
    # data.path (or the generated traces)
    enabled: bool = False
    traces: str = (
        ""  # prompts with teacher traces (their length caps the student's); "" -> data.path
    )
    student: str = (
        ""  # "" -> train.student or score.student (a later stage: the last stage's model)
    )
    teacher: str = ""  # "" -> generate.teacher or score.teacher
    prompt_key: str = "auto"  # auto: prompt | question | problem
    answer_key: str = "auto"  # auto: answer | solution, else the teacher trace's own answer
    system_prompt: str | None = None
    num_prompts: int | None = None
    length_cap: float = 1.5  # the student writes at most this many times the teacher trace's tokens
    cut_after: float = 0.5  # the cut falls uniformly past this share of the student's response
    temperature: float = 1.0  # student and teacher sampling temperature
    top_p: float = 1.0
    max_new_tokens: int = 1024  # the teacher's continuation
    seed: int = 0
    require_correct: bool = True  # keep only continuations whose final answer grades correct
    grader: str = "gsm8k"  # gsm8k | boxed
    keep_truncated: bool = False
    engine: VLLMEngineConfig = field(default_factory=VLLMEngineConfig)

    def validate(self, path: str) -> None:
        positive(f"{path}.num_prompts", self.num_prompts)
        _check_sampling(path, self)
        choice(f"{path}.grader", self.grader, ("gsm8k", "boxed"))
        # The student's budget is ceil(length_cap x the teacher trace's tokens) and a cut
        # needs 2; a cap that leaves every trace under 2 fails when the traces are read.
        if not 0 < self.length_cap < math.inf:  # nan and inf fail here, not in math.ceil
            raise ConfigError(
                f"{path}.length_cap={self.length_cap!r}: must be a finite number > 0 (the "
                "student writes at most length_cap x the teacher trace's tokens; DASD: 1.5)"
            )
        if not 0.0 <= self.cut_after < 1.0:
            raise ConfigError(f"{path}.cut_after={self.cut_after!r}: must be in [0, 1)")
