"""The Ray connection's one home: what travels to workers, when the reaper starts, and
that the reaper ends exactly the processes holding its token (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from raydc.infra import runtime
from raydc.infra.progress import DataProgress


def _spawn(code: str, token: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop(runtime.REAP_TOKEN_VAR, None)
    if token is not None:
        env[runtime.REAP_TOKEN_VAR] = token
    proc = subprocess.Popen(
        [sys.executable, "-c", code + "\nprint('up', flush=True)\ntime.sleep(600)"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_reap_ends_the_token_holders_and_nothing_else():
    token = "t" + os.urandom(8).hex()
    polite = _spawn("import time", token)
    stubborn = _spawn("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN)", token)
    bystander = _spawn("import time", None)
    other = _spawn("import time", token + "x")
    try:
        assert sorted(runtime.processes_with_token(token)) == sorted([polite.pid, stubborn.pid])
        # driver_pid is not our parent: the driver counts as gone, the reaper acts at once
        assert runtime.reap(token, driver_pid=-1, grace_s=2.0) == 0
        assert polite.wait(timeout=10) == -15  # SIGTERM was enough
        assert stubborn.wait(timeout=10) == -9  # SIGKILL after the grace
        time.sleep(0.2)
        assert bystander.poll() is None and other.poll() is None
    finally:
        for p in (polite, stubborn, bystander, other):
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize(
    "address, env_address, reaps",
    [(None, None, True), ("ray://head:10001", None, False), (None, "127.0.0.1:6379", False)],
)
def test_the_reaper_starts_only_for_a_local_ray(monkeypatch, address, env_address, reaps):
    import ray

    calls: dict = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.setdefault("init", kw))
    monkeypatch.setattr(runtime, "_start_reaper", lambda: calls.setdefault("reaper", True))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("RAYDC_NOT_A_RUNTIME_VAR", "1")
    if env_address:
        monkeypatch.setenv("RAY_ADDRESS", env_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runtime.connect_ray(address)
    assert calls.get("reaper", False) is reaps
    assert calls["init"]["address"] == address
    sent = calls["init"]["runtime_env"]["env_vars"]
    assert sent["DS_ACCELERATOR"] == "cpu" and "RAYDC_NOT_A_RUNTIME_VAR" not in sent
    assert set(sent) <= set(runtime.RUNTIME_ENV_VARS)


def _drop_handlers_under(loggers, folder) -> None:
    for lg in loggers:
        for h in list(lg.handlers):
            if str(getattr(h, "baseFilename", "")).startswith(str(folder)) or isinstance(
                h, DataProgress
            ):
                lg.removeHandler(h)
                h.close()


def test_ray_logs_go_to_the_run_file_and_the_console_keeps_warnings_and_progress(tmp_path):
    import io
    import logging

    import ray.data  # noqa: F401  (configures the "ray.data" logger as in a run)

    data = logging.getLogger("ray.data")
    core = logging.getLogger("ray")
    console = io.StringIO()  # stands in for Ray's console handlers (stderr)
    mine = logging.StreamHandler(console)
    progress = io.StringIO()
    data.addHandler(mine)
    core.addHandler(mine)
    try:
        runtime.route_ray_logs(tmp_path / "ray.log", stage="score", progress_every_s=0)
        runtime.route_ray_logs(
            tmp_path / "ray.log", stage="score", progress_every_s=0, progress_stream=progress
        )  # idempotent: one file handler, one progress handler
        data.info("Starting execution of Dataset d_0")
        for line in [  # off a terminal, instead of a bar: a progress dump every 10 s
            "======= Running Dataset: d_0 =======",
            "Total Progress: 0/?",
            "ReadParquet->MapBatches(check): 8/8",
            "MapBatches(StudentScorer): 2/1",
            "Write: 0/1",
            "====================================",
        ]:
            data.info(line)
        data.warning("a block failed; retrying")
        logging.getLogger("ray._private.worker").info("Calling ray.init() again")
        logging.getLogger("ray.train.v2").info("Attempting to start training worker group")
        # a set-up notice that asks nothing of the user: the file has it, the console not
        logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
            "Token authentication is enabled for this Ray cluster."
        )
        logging.getLogger("ray._private.worker").error("the GCS is gone")
        for h in data.handlers + core.handlers:
            h.flush()
        assert console.getvalue().splitlines() == ["a block failed; retrying", "the GCS is gone"]
        # Ray Data's progress dump became raydc's own line (interval 0: at once)
        assert progress.getvalue().splitlines() == ["[raydc] score    rows 2/8 (25%)"]
        logged = (tmp_path / "ray.log").read_text()
        for text in (
            "Starting execution of Dataset d_0",
            "Total Progress: 0/?",
            "Calling ray.init() again",
            "Attempting to start training worker group",
            "Token authentication is enabled",
            "the GCS is gone",
        ):
            assert logged.count(text) == 1, text  # once: no handler writes it twice
        # A second run in the same process: its logs go to its own file only.
        (tmp_path / "run2").mkdir()
        runtime.route_ray_logs(tmp_path / "run2" / "ray.log")
        data.info("Starting execution of Dataset d_1")
        core.info("Connecting to existing Ray cluster")
        for h in data.handlers + core.handlers:
            h.flush()
        assert "d_1" not in (tmp_path / "ray.log").read_text()
        assert "d_1" in (tmp_path / "run2" / "ray.log").read_text()
        assert "Connecting" in (tmp_path / "run2" / "ray.log").read_text()
        assert not any(isinstance(h, DataProgress) for h in data.handlers)  # no stage named
    finally:
        data.removeHandler(mine)
        core.removeHandler(mine)
        _drop_handlers_under([logging.getLogger(n) for n in ("ray", "ray.data", "vllm")], tmp_path)
        runtime._run_log = None


def test_vllm_in_the_driver_is_routed_before_and_after_it_sets_its_logging_up(tmp_path, capsys):
    """In the driver vLLM 0.32 configures no logger (its engines' processes do): its
    records reached the console through Python's last resort, its CPU build's Triton
    notice included. An in-process engine sets a handler of its own up, routed again."""
    import io
    import logging

    vllm_logger = logging.getLogger("vllm")
    old = (vllm_logger.handlers[:], vllm_logger.propagate, vllm_logger.level)
    root = logging.getLogger().handlers[:]
    try:
        vllm_logger.handlers[:] = []
        logging.getLogger().handlers[:] = []  # as in a driver (pytest has its own there)
        runtime.route_ray_logs(tmp_path / "ray.log")  # vllm is imported: routed too
        logging.getLogger("vllm.triton_utils.importing").warning(
            "Triton is installed, but doesn't include CPU backend. Disabling Triton."
        )
        logging.getLogger("vllm.config").warning("max_model_len is larger than the model's")
        assert capsys.readouterr().err.splitlines() == [
            "WARNING vllm.config: max_model_len is larger than the model's"
        ]
        # an in-process engine (LocalEngine) replaces the handlers with its own console one
        console = io.StringIO()
        vllm_logger.handlers[:] = [logging.StreamHandler(console)]
        vllm_logger.propagate = False
        vllm_logger.setLevel(logging.INFO)
        runtime.route_library_logs()
        logging.getLogger("vllm.engine").info("Initializing an engine")
        logging.getLogger("vllm.engine").warning("the KV cache is small")
        assert console.getvalue().splitlines() == ["the KV cache is small"]
        logged = (tmp_path / "ray.log").read_text()
        for text in ("Triton is installed", "max_model_len", "Initializing", "KV cache"):
            assert logged.count(text) == 1, text
    finally:
        for h in vllm_logger.handlers:
            h.close()
        vllm_logger.handlers[:], vllm_logger.propagate, vllm_logger.level = old
        logging.getLogger().handlers[:] = root
        _drop_handlers_under([logging.getLogger(n) for n in ("ray", "ray.data")], tmp_path)
        runtime._run_log = None


def test_native_log_lines_go_to_the_file_and_the_rest_to_the_console(tmp_path):
    import io

    lines = [
        b"[2026-12-06 10:32:27,488 E 27815 27815] core_worker.cc:2465: Actor with class "
        b"name: 'MapWorker(MapBatches(StudentScorer))' has constructor arguments in the "
        b"object store and max_restarts > 0.\n",
        b"[raydc] score    running -> /runs/score\n",
        b"[2026-12-06 10:32:28,001 C 27815 27830] raylet_client.cc:80: Check failed: ok\n",
        b"*** SIGABRT received at time=1765017148 ***\n",
        b"[2026-12-06 10:32:27,900 W 27815 27830] core_worker.cc:912: slow\n",
    ]
    console = io.BytesIO()
    runtime.filter_native(io.BytesIO(b"".join(lines)), console, str(tmp_path / "ray.log"))
    assert console.getvalue() == lines[1] + lines[2] + lines[3]  # FATAL ('C') stays
    assert (tmp_path / "ray.log").read_bytes() == lines[0] + lines[4]


def test_native_stderr_to_routes_the_processs_fd_2(tmp_path):
    """A real process: what C code writes to fd 2 goes through the filter; Python's
    sys.stderr reaches stderr directly; after the block fd 2 is the console again."""
    log = tmp_path / "ray.log"
    code = f"""
import os, sys
from raydc.infra.runtime import native_stderr_to
with native_stderr_to({str(log)!r}):
    os.write(2, b"[2026-12-06 10:32:27,488 E 1 1] core_worker.cc:2465: Actor x has constructor arguments\\n")
    os.write(2, b"a native line of another library\\n")
    print("[raydc] train    running", file=sys.stderr, flush=True)
os.write(2, b"after the block\\n")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    shown = sorted(r.stderr.splitlines())  # two writers: the filter's order is its own
    assert shown == sorted(
        ["a native line of another library", "[raydc] train    running", "after the block"]
    )
    assert log.read_text().splitlines() == [
        "[2026-12-06 10:32:27,488 E 1 1] core_worker.cc:2465: Actor x has constructor arguments"
    ]


def test_native_stderr_to_leaves_a_captured_stderr_alone(tmp_path, capsys):
    before = sys.stderr
    with runtime.native_stderr_to(tmp_path / "ray.log"):
        assert sys.stderr is before
        print("captured", file=sys.stderr)
    assert capsys.readouterr().err == "captured\n"
    assert not (tmp_path / "ray.log").exists()  # no filter was started
