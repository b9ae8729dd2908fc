"""The Ray connection's one home: what travels to workers, when the reaper starts, and
that the reaper ends exactly the processes holding its token (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from raydc.infra import runtime


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


def test_ray_logs_go_to_the_run_file_and_the_console_keeps_warnings_and_a_heartbeat(tmp_path):
    import io
    import logging

    import ray.data  # noqa: F401  (configures the "ray.data" logger as in a run)

    logger = logging.getLogger("ray.data")
    console = io.StringIO()
    mine = logging.StreamHandler(console)
    logger.addHandler(mine)
    try:
        runtime.route_ray_logs(tmp_path / "ray.log")
        runtime.route_ray_logs(tmp_path / "ray.log")  # idempotent: one file handler
        logger.info("Starting execution of Dataset d_0")
        for _ in range(3):  # within a minute: one progress line reaches the console
            logger.info("Total Progress: 1/4")
        logger.warning("a block failed; retrying")
        for h in logger.handlers:
            h.flush()
        shown = console.getvalue().splitlines()
        assert shown == ["Total Progress: 1/4", "a block failed; retrying"]
        logged = (tmp_path / "ray.log").read_text().splitlines()
        assert len(logged) == 5 and "Starting execution of Dataset d_0" in logged[0]
        # A second run in the same process: its logs go to its own file only.
        (tmp_path / "run2").mkdir()
        runtime.route_ray_logs(tmp_path / "run2" / "ray.log")
        logger.info("Starting execution of Dataset d_1")
        for h in logger.handlers:
            h.flush()
        assert "d_1" not in (tmp_path / "ray.log").read_text()
        assert "d_1" in (tmp_path / "run2" / "ray.log").read_text()
    finally:
        logger.removeHandler(mine)
        for h in list(logger.handlers):
            if getattr(h, "baseFilename", "").startswith(str(tmp_path)):
                logger.removeHandler(h)
                h.close()
