"""Every shipped YAML loads and validates; bad values fail naming the field; the search
space is checked at load time; the stage fingerprints and markers of raydc.pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raydc.config import ConfigError, dump_config, from_dict, load_config
from raydc.infra.artifacts import HISTORY, MARKER, StageError, fingerprint_parts, fingerprint_paths
from raydc.pipeline import CONFIG_DIR, Pipeline
from raydc.pipeline.resolve import resolve_path

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {p.name for p in SHIPPED} >= {"default.yaml", "tune.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_validates_and_round_trips(path):
    import yaml

    cfg = load_config(path)
    # pkg: paths point at files that ship with the package
    for value in (cfg.data.path, cfg.eval.path):
        if value.startswith("pkg:"):
            assert Path(resolve_path(value)).is_file(), value
    again = from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_tune_example_has_a_search_space_over_weights():
    cfg = load_config(CONFIG_DIR / "tune.yaml")
    assert cfg.tune.enabled and cfg.tune.space
    assert all(k.startswith("weights.") for k in cfg.tune.space)
    assert cfg.tune.resolved_mode == "min"


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.lr=-1", "train.lr"),
        ("train.zero_stage=5", "train.zero_stage"),
        ("score.engine.gpu_memory_utilization=2", "score.engine.gpu_memory_utilization"),
        ("score.engine.backend=local", "score.engine.backend"),
        ("data.max_reject_share=1.5", "data.max_reject_share"),
        ("eval.grader=mmlu", "eval.grader"),
        ("tune.metric=accuracy", "tune.metric"),
        ("tune.reduction_factor=1", "tune.reduction_factor"),
        ("tune.max_concurrent_trials=0", "tune.max_concurrent_trials"),
        ("weights.tau=0", "tau"),
        ("weights.preset=nope", "weights.preset"),
        ("train.max_steps=ten", "train.max_steps"),
        ("run.seed=1.5", "run.seed"),
        ("train.nonsense=1", "train.nonsense"),
    ],
)
def test_a_bad_value_fails_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(CONFIG_DIR / "default.yaml", [override])


@pytest.mark.parametrize("key", ["dtype", "num_engines", "max_model_len", "batch_size"])
def test_an_engine_key_of_the_old_score_section_names_its_new_place(key):
    with pytest.raises(ConfigError, match=rf"'score\.{key}'.*did you mean score\.engine\.{key}\?"):
        load_config(CONFIG_DIR / "default.yaml", [f"score.{key}=1"])
    with pytest.raises(ConfigError, match=rf"did you mean score\.engine\.{key}\?"):
        from_dict({"score": {key: 1}})


def test_each_stage_keeps_its_own_engine_defaults():
    cfg = from_dict({"score": {"engine": {"dtype": "bfloat16"}}}, ["eval.engine.dtype=bfloat16"])
    assert cfg.score.engine.dtype == cfg.eval.engine.dtype == "bfloat16"
    assert cfg.score.engine.batch_size == 16 and cfg.score.engine.max_num_batched_tokens == 4096
    assert cfg.eval.engine.batch_size == 32 and cfg.eval.engine.max_num_batched_tokens is None


def test_the_engine_arguments_derive_from_the_one_section():
    from raydc.config import VLLMEngineConfig

    tp2 = VLLMEngineConfig(
        tensor_parallel_size=2, gpus_per_engine=2, cpus_per_engine=4, max_num_batched_tokens=1024
    )
    kwargs = tp2.llm_kwargs("raw_logprobs", max_model_len=2049)
    assert kwargs["max_model_len"] == 2049 and kwargs["max_num_batched_tokens"] == 2049
    assert kwargs["logprobs_mode"] == "raw_logprobs" and kwargs["tensor_parallel_size"] == 2
    assert "max_num_batched_tokens" not in VLLMEngineConfig().llm_kwargs("processed_logprobs")
    bundles = tp2.processor_args()["placement_group_config"]["bundles"]
    assert bundles == [{"CPU": 2.0, "GPU": 1.0}] * 2
    assert VLLMEngineConfig().processor_args()["placement_group_config"]["bundles"] == [
        {"CPU": 1.0}
    ]
    pool = tp2.actor_pool_args()
    assert pool["num_gpus"] == 2.0 and pool["num_cpus"] == 4.0 and pool["batch_size"] == 32
    assert "num_gpus" not in VLLMEngineConfig().actor_pool_args()


@pytest.mark.parametrize(
    "space, message",
    [
        ({"weights.taux": [1.0]}, r"tune\.space\.weights\.taux.*not a config field"),
        ({"train": [1]}, "a section, not a field"),
        ({"weights.tau": {"type": "uniform", "low": 2, "high": 1}}, r"weights\.tau\.low=2"),
        ({"weights.tau": {"type": "loguniform", "low": 0, "high": 1}}, "loguniform"),
        ({"weights.tau": {"type": "normal", "low": 0, "high": 1}}, "type one of"),
        ({"weights.sign": {"type": "choice", "values": []}}, r"weights\.sign\.values"),
    ],
)
def test_search_space_is_checked_at_load_time(space, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"tune": {"enabled": True, "space": space}})


def test_grid_search_needs_lists_and_an_enabled_sweep_needs_a_space():
    with pytest.raises(ConfigError, match="grid needs a list"):
        from_dict(
            {
                "tune": {
                    "search_alg": "grid",
                    "space": {"weights.tau": {"type": "uniform", "low": 1, "high": 2}},
                }
            }
        )
    with pytest.raises(ConfigError, match=r"tune\.space: empty"):
        from_dict({"tune": {"enabled": True}})
    cfg = from_dict({"tune": {"search_alg": "grid", "space": {"weights.sign": [1, -1]}}})
    assert cfg.tune.space == {"weights.sign": [1, -1]}


def test_mode_follows_the_metric_unless_set():
    assert from_dict({"tune": {"metric": "val_accuracy"}}).tune.resolved_mode == "max"
    assert from_dict({"tune": {"metric": "val_reverse_kl"}}).tune.resolved_mode == "min"
    assert from_dict({"tune": {"metric": "val_nll", "mode": "max"}}).tune.resolved_mode == "max"


def test_a_preset_override_expands_the_whole_weights_section():
    cfg = load_config(CONFIG_DIR / "default.yaml", ["weights.preset=tis", "weights.tau=2"])
    assert cfg.weights.transform == "exp_clip" and cfg.weights.w_max == 2.0
    assert cfg.weights.tau == 2.0


# ----------------------------------------------------------------- fingerprints and markers


def test_path_fingerprint_follows_content(tmp_path):
    f = tmp_path / "d" / "a.jsonl"
    f.parent.mkdir()
    f.write_text('{"x": 1}\n')
    a = fingerprint_paths(f.parent)
    assert a == fingerprint_paths(f.parent)
    f.write_text('{"x": 2}\n')
    assert fingerprint_paths(f.parent) != a
    (f.parent / "b.jsonl").write_text("{}\n")
    assert fingerprint_paths(f.parent) not in (a, fingerprint_paths(f))
    assert fingerprint_paths("org/hub-model") != fingerprint_paths("org/other")
    assert fingerprint_parts({"a": 1, "b": [1, 2]}) == fingerprint_parts({"b": [1, 2], "a": 1})


def _pipe(tmp_path, **over):
    cfg = from_dict({"run": {"output_dir": str(tmp_path / "run")}, **over})
    return Pipeline(cfg, log=lambda m: None, connect_ray=False)


def test_a_done_stage_is_reused_and_a_changed_one_reruns(tmp_path):
    calls = []

    def fn(out: Path) -> dict:
        calls.append(out)
        (out / "part-0.parquet").write_text("data")
        return {"rows_in": 3, "rows_out": 2, "rows_rejected": 1}

    pipe = _pipe(tmp_path)
    first = pipe.run_stage("score", {"k": 1}, fn)
    assert not first.skipped and len(calls) == 1
    marker = json.loads((first.out_dir / MARKER).read_text())
    assert marker["fingerprint"] == first.fingerprint and marker["summary"]["rows_out"] == 2

    again = _pipe(tmp_path).run_stage("score", {"k": 1}, fn)
    assert again.skipped and len(calls) == 1 and again.summary["rows_in"] == 3

    changed = _pipe(tmp_path).run_stage("score", {"k": 2}, fn)
    assert not changed.skipped and len(calls) == 2
    assert changed.fingerprint != first.fingerprint
    history = [json.loads(x) for x in (tmp_path / "run" / HISTORY).read_text().splitlines()]
    assert [h["stage"] for h in history] == ["score", "score"]


def test_a_failed_stage_reruns_and_a_resumable_one_keeps_its_partial_output(tmp_path):
    def boom(out: Path) -> dict:
        (out / "checkpoint").write_text("step 8")
        raise RuntimeError("worker died")

    pipe = _pipe(tmp_path)
    with pytest.raises(StageError, match=r"stage 'train' failed.*worker died"):
        pipe.run_stage("train", {"k": 1}, boom, resumable=True)
    assert not (tmp_path / "run" / "train" / MARKER).exists()

    seen = {}

    def resume(out: Path) -> dict:
        seen["checkpoint"] = (out / "checkpoint").read_text()
        return {"steps": 16}

    res = _pipe(tmp_path).run_stage("train", {"k": 1}, resume, resumable=True)
    assert seen["checkpoint"] == "step 8" and not res.skipped
    assert (res.out_dir / MARKER).exists()

    # A non-resumable stage starts from a clean folder after a failure.
    with pytest.raises(StageError):
        pipe.run_stage("prepare", {"k": 1}, boom)

    def fresh(out: Path) -> dict:
        seen["leftover"] = (out / "checkpoint").exists()
        return {}

    _pipe(tmp_path).run_stage("prepare", {"k": 1}, fresh)
    assert seen["leftover"] is False


def _dotted_fields(cls, prefix=""):
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _dotted_fields(tp, key + ".")
        else:
            yield key


def test_the_configuration_reference_documents_every_field():
    from raydc.config import RaydcConfig

    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    fields = list(_dotted_fields(RaydcConfig))
    assert len(fields) > 80
    missing = [k for k in fields if f"| `{k}` |" not in doc]
    assert not missing, f"docs/configuration.md lacks {missing}: regenerate it"


def test_the_dasd_recipe_configs_validate():
    import re

    import yaml

    doc = (Path(__file__).resolve().parents[2] / "docs" / "recipes" / "dasd.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert len(blocks) == 2
    recipe = from_dict(yaml.safe_load(blocks[0]))
    assert [s.name for s in recipe.phases] == ["t06", "t10", "mixed"]
    assert recipe.select.enabled and recipe.train.zero_stage == 3
    t06, t10, mixed = recipe.phases
    assert t06.generate == {"enabled": True, "temperature": 0.6}
    assert t10.generate["temperature"] == 1.0 and t10.optimizer == "carry"
    assert mixed.mixed_policy["enabled"] and mixed.mixed_policy["length_cap"] == 1.5
    public = from_dict(yaml.safe_load(blocks[1]))
    assert public.data.teacher_token_ids_key == "token_ids" and public.data.teacher_tokenizer
    assert public.data.teacher_logprobs_path and public.data.join_key == "uuid"
    assert public.data.teacher_join_key == "sample_uuid" and public.data.id_key == "uuid"
