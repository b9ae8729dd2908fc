"""How a dead vLLM engine is reported: vLLM's processes write their ERROR records to the
stage folder (``engine_log_env``), and the stage fails naming the engine's own error
(``engine_error``, ``engine_failure``). The real engine dying on Ray and in-process is
tests/integration/test_engine_dies.py; the engine settings are tested here too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from raydc.config import VLLMEngineConfig
from raydc.engines.sampler import (
    ENGINE_ERRORS,
    ENGINE_LOGGING,
    GenerationError,
    engine_error,
    engine_failure,
    engine_log_env,
)

# What vLLM's processes write through engine_log_env's handler when a worker hits an
# exception and the engine core then dies (abridged from a real run).
LOG = """\
2026-01-01 10:00:00,001 pid=11 ERROR vllm.v1.executor.multiproc_executor: WorkerProc hit an exception.
Traceback (most recent call last):
  File "vllm/v1/executor/multiproc_executor.py", line 1055, in _execute_worker_rpc
    output = func(*args, **kwargs)
RuntimeError: CPU Generator does not use offset
2026-01-01 10:00:00,002 pid=10 ERROR vllm.v1.engine.core: EngineCore encountered a fatal error.
Traceback (most recent call last):
  File "vllm/v1/engine/core.py", line 1500, in run_engine_core
    raise RuntimeError(
RuntimeError: Worker failed with error 'CPU Generator does not use offset', please check the stack trace above for the root cause
"""  # noqa: E501


def test_engine_error_is_the_first_exception_line_of_vllms_errors(tmp_path):
    assert engine_error(None) is None
    assert engine_error(tmp_path) is None  # no file: nothing failed
    (tmp_path / ENGINE_ERRORS).write_text(LOG)
    assert engine_error(tmp_path) == "RuntimeError: CPU Generator does not use offset"
    (tmp_path / ENGINE_ERRORS).write_text("2026-01-01 pid=1 ERROR vllm.x: no traceback\n")
    assert engine_error(tmp_path) is None


def test_a_dead_engine_is_reported_with_its_own_error(tmp_path):
    from ray.exceptions import ActorDiedError

    (tmp_path / ENGINE_ERRORS).write_text(LOG)
    on_ray = engine_failure(ActorDiedError(), "/models/t", "ray", tmp_path)
    assert isinstance(on_ray, GenerationError)
    assert str(on_ray) == (
        "the vLLM engine of /models/t died: RuntimeError: CPU Generator does not use offset "
        "(a dead engine is restarted 1 time(s) on Ray, then the stage fails; vLLM's errors: "
        f"{tmp_path / ENGINE_ERRORS})"
    )
    local = engine_failure(RuntimeError("EngineCore died"), "/models/t", "local", tmp_path)
    assert str(local) == (
        "the vLLM engine of /models/t died: RuntimeError: CPU Generator does not use offset "
        f"(vLLM's errors: {tmp_path / ENGINE_ERRORS})"
    )
    # No error log (a stage that gave no log_dir): the actor's death, and where to look.
    bare = engine_failure(ActorDiedError(), "/models/t", "ray", None)
    assert str(bare) == (
        "the vLLM engine of /models/t died: ActorDiedError; its own error is in the Ray "
        "worker log of the engine actor (a dead engine is restarted 1 time(s) on Ray, then "
        "the stage fails)"
    )
    # Anything else is not the engine's: passed on as it is.
    other = ValueError("bad row")
    assert engine_failure(other, "/models/t", "ray", tmp_path / "empty") is other


def test_engine_log_env_adds_an_error_file_to_vllms_own_logging(tmp_path):
    (tmp_path / ENGINE_ERRORS).write_text("errors of an engine started before\n")
    env = engine_log_env(tmp_path)
    assert env == {
        "VLLM_CONFIGURE_LOGGING": "1",
        "VLLM_LOGGING_CONFIG_PATH": str((tmp_path / ENGINE_LOGGING).resolve()),
    }
    assert not (tmp_path / ENGINE_ERRORS).exists()  # each engine's errors alone
    config = json.loads((tmp_path / ENGINE_LOGGING).read_text())
    assert config["loggers"]["vllm"]["handlers"] == ["vllm", "raydc_errors"]
    assert config["handlers"]["vllm"]["class"] == "logging.StreamHandler"  # vLLM's console
    errors = config["handlers"]["raydc_errors"]
    assert errors["level"] == "ERROR" and errors["class"] == "logging.FileHandler"
    assert errors["filename"] == str((tmp_path / ENGINE_ERRORS).resolve())
    # The config as vLLM applies it, in a process of its own: an exception logged by a vLLM
    # module lands in the file with its traceback, and engine_error finds it.
    code = (
        "import json, logging, logging.config, sys\n"
        "logging.config.dictConfig(json.load(open(sys.argv[1])))\n"
        "try:\n"
        "    raise IndexError('index out of range in self')\n"
        "except IndexError:\n"
        "    logging.getLogger('vllm.v1.worker').exception('WorkerProc hit an exception.')\n"
        "logging.getLogger('vllm.v1.worker').warning('not an error')\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, env["VLLM_LOGGING_CONFIG_PATH"]], check=True, timeout=300
    )
    text = (tmp_path / ENGINE_ERRORS).read_text()
    assert "WorkerProc hit an exception." in text and "not an error" not in text
    assert engine_error(tmp_path) == "IndexError: index out of range in self"


@pytest.mark.parametrize(
    ("gpus", "seeded", "chunked"),
    [(0.0, True, False), (0.0, False, None), (1.0, True, None)],
)
def test_seeded_sampling_on_cpu_turns_chunked_prefill_off(gpus, seeded, chunked):
    # vLLM 0.32 rewinds a seeded request's generator after a partial prefill, and a CPU
    # generator cannot: "CPU Generator does not use offset" killed the engine.
    kwargs = VLLMEngineConfig(gpus_per_engine=gpus).llm_kwargs("processed_logprobs", seeded=seeded)
    assert kwargs.get("enable_chunked_prefill") is chunked
    assert VLLMEngineConfig().restart_args() == {"max_restarts": 1, "max_task_retries": 1}


def test_the_scoring_actor_pools_restart_a_dead_engine_a_bounded_number_of_times(
    tmp_path, monkeypatch
):
    """Ray Data restarts a map_batches actor forever unless told otherwise
    (max_restarts=-1): a scoring engine that died on every try would restart with no end.
    Both score pools (student, teacher) get max_restarts and max_task_retries 1, as the
    sampling engines do. The pipeline is recorded on a stand-in dataset, without Ray."""
    import ray

    from raydc.config import from_dict
    from raydc.score.actors import StudentScorer
    from raydc.score.stage import _write_scored
    from raydc.score.teacher import TeacherScorer

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 64}))
    calls = []

    class Dataset:
        def map_batches(self, fn, **kwargs):
            calls.append((fn, kwargs))
            return self

        def write_parquet(self, *a, **k):
            pass

    monkeypatch.setattr(ray.data, "read_parquet", lambda *a, **k: Dataset())
    cfg = from_dict({"score": {"student": str(model), "teacher": str(model)}})
    _write_scored(cfg, ["p.parquet"], tmp_path / "out", str(model), same=True)
    pools = {fn: kw for fn, kw in calls if fn in (StudentScorer, TeacherScorer)}
    assert set(pools) == {StudentScorer, TeacherScorer}
    for kw in pools.values():
        assert (kw["max_restarts"], kw["max_task_retries"]) == (1, 1)


@pytest.mark.integration  # a Ray dataset, even unexecuted, starts Ray: the session's cluster
def test_the_restart_args_warning_is_silenced_only_where_raydc_passes_them(ray_local):
    """Ray 2.60's map_batches warns that **ray_remote_args are deprecated, and it names no
    parameter for max_restarts: inside restart_args_allowed that warning is not raised (on a
    real, unexecuted Ray dataset); outside it is, and other warnings pass inside."""
    import warnings

    import ray.data

    from raydc.config import VLLMEngineConfig
    from raydc.infra.runtime import restart_args_allowed

    class Pool:
        def __call__(self, batch):
            return batch

    ds = ray.data.from_items([{"x": 1}])
    args = VLLMEngineConfig().actor_pool_args()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with restart_args_allowed():
            ds.map_batches(Pool, **args)
            warnings.warn("another warning", DeprecationWarning, stacklevel=1)
        inside = [str(w.message) for w in seen]
        ds.map_batches(Pool, **args)
        outside = [str(w.message) for w in seen][len(inside) :]
    assert not any("ray_remote_args" in m for m in inside)
    assert "another warning" in inside
    assert any("ray_remote_args` is deprecated" in m for m in outside)
