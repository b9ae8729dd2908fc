"""The one home of the Ray connection: which environment travels to workers, and who
cleans up a local cluster whose driver was killed.

``connect_ray`` joins ``address`` (or ``RAY_ADDRESS``, as inside ``ray job submit``) or
starts a local Ray. A local Ray started here shares the driver's fate: Ray stops its GCS
and raylet when the driver dies, but not always their children (the dashboard and
runtime-env agents were seen alive ~7 minutes after a SIGKILL of the driver). A small
reaper process, one per driver, waits for the driver to go and then ends every process
that inherited this driver's reap token (see :func:`reap`). A cluster raydc joined is
never touched.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

# Settings of this process that every Ray worker needs as well (offline hub, no telemetry,
# the DeepSpeed accelerator on CPU machines).
RUNTIME_ENV_VARS = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
    "VLLM_NO_USAGE_STATS",
    "TOKENIZERS_PARALLELISM",
    "DS_ACCELERATOR",
)

# What a light Ray task (check, finish, read, write) asks for, so that it runs beside the
# engine actors on a small machine.
LIGHT_CPUS = 0.25

# Inherited by every process a local Ray started from this driver (GCS, raylet, agents,
# workers); the reaper finds them by it in /proc/<pid>/environ.
REAP_TOKEN_VAR = "RAYDC_REAP_TOKEN"

# On a console (not a terminal) Ray Data logs a multi-line progress dump every 10 s; raydc
# lets through warnings and one "Total Progress" line a minute, and sends everything to
# the run folder's log file instead. A terminal keeps Ray Data's progress bars.
PROGRESS_EVERY_S = 60.0
RAY_LOG = "ray.log"  # in the run folder
RAY_LOGGERS = ("ray.data", "ray.train", "ray.tune")

_reaper: subprocess.Popen | None = None


def connect_ray(
    address: str | None = None, num_cpus: int | None = None, include_dashboard: bool | None = None
) -> None:
    """Join ``address`` (or RAY_ADDRESS) or start a local Ray (of ``num_cpus`` CPUs: the
    machine's when None). Idempotent. Every process it starts gets the offline and CPU
    settings of ``RUNTIME_ENV_VARS``: the one home of that list (tests and benches too)."""
    import ray

    if ray.is_initialized():
        return
    from raydc.infra.models import offline_env

    offline_env()
    starts_local = not address and not os.environ.get("RAY_ADDRESS")
    if starts_local:
        _start_reaper()
    env = {k: os.environ[k] for k in RUNTIME_ENV_VARS if k in os.environ}
    ray.init(
        address=address,
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        runtime_env={"env_vars": env},
        log_to_driver=False,
        configure_logging=True,
        logging_level="WARNING",
    )


class ConsoleQuiet(logging.Filter):
    """For Ray's console handlers: warnings and errors, and a progress line a minute."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S):
        super().__init__()
        self.every_s, self.last = every_s, -math.inf

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        if record.getMessage().startswith("Total Progress"):
            now = time.monotonic()
            if now - self.last >= self.every_s:
                self.last = now
                return True
        return False


class _RunLogHandler(logging.FileHandler):
    """The run folder's ray.log (a type of its own, so raydc finds the handlers it added)."""


def route_ray_logs(log_file: str | os.PathLike) -> None:
    """Send the INFO logs of Ray Data, Train and Tune in this process to ``log_file`` and
    quiet their console handlers (:class:`ConsoleQuiet`). Idempotent; called at each stage
    start, since Ray may rebuild its handlers. A file handler raydc added for another run
    folder is removed: one process running two runs writes each run's logs to its own file."""
    import ray.data  # noqa: F401  (importing it configures the "ray.data" logger)

    target = str(Path(log_file).resolve())
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for h in logger.handlers:
            console = isinstance(h, logging.StreamHandler) and not isinstance(
                h, logging.FileHandler
            )
            if console and not any(isinstance(f, ConsoleQuiet) for f in h.filters):
                h.addFilter(ConsoleQuiet())
        for h in [h for h in logger.handlers if isinstance(h, _RunLogHandler)]:
            if h.baseFilename != target:
                logger.removeHandler(h)
                h.close()
        if not any(isinstance(h, _RunLogHandler) for h in logger.handlers):
            fh = _RunLogHandler(target)
            fh.setLevel(logging.INFO)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(fh)


def _start_reaper() -> None:
    """One reaper per driver, started before the first local Ray so that every Ray
    process inherits the token. Linux only (it reads /proc); elsewhere a no-op."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return
    if not Path("/proc/self/environ").exists():
        return
    # always a fresh token: one inherited from a parent driver names the parent's processes
    token = os.environ[REAP_TOKEN_VAR] = uuid.uuid4().hex
    _reaper = subprocess.Popen(
        [sys.executable, "-m", "raydc.infra.runtime", "reap", token, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the driver's group must not end it first
    )


def processes_with_token(token: str) -> list[int]:
    """PIDs (other than this one) whose initial environment holds the reap token."""
    needle = f"{REAP_TOKEN_VAR}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def reap(token: str, driver_pid: int, poll_s: float = 1.0, grace_s: float = 5.0) -> int:
    """Wait until ``driver_pid`` (this process's parent) is gone, then SIGTERM every
    process holding ``token``, and SIGKILL what is left after ``grace_s``. Returns how many
    outlived both (0 when all went). Re-parenting is the death signal, so a reused PID
    cannot fool it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while os.getppid() == driver_pid:
        time.sleep(poll_s)
    left = processes_with_token(token)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = processes_with_token(token)
        if not left:
            break
    return len(left)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "reap":
        reap(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m raydc.infra.runtime reap <token> <driver pid>")
