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

import contextlib
import logging
import os
import re
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

# Where the notices of the libraries raydc drives go: everything to the run folder's
# ray.log (named in the summary); the console keeps their warnings and errors, except the
# notices of NOTICE_LOGGERS below ERROR. Ray Data's progress becomes raydc's own progress
# lines (raydc.infra.progress.DataProgress).
RAY_LOG = "ray.log"  # in the run folder
LIBRARY_LOGGERS = ("ray", "vllm", "transformers")
# Notices about a library's own set-up that ask nothing of the user: "Token authentication
# is enabled for this Ray cluster" (a local Ray, where it is the default) and "Triton is
# installed, but doesn't include CPU backend" (vLLM's CPU build).
NOTICE_LOGGERS = ("ray._private.authentication", "vllm.triton_utils")

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
    route_library_logs()  # Ray's INFO records are not for the console (route_ray_logs)
    ray.init(
        address=address,
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        runtime_env={"env_vars": env},
        log_to_driver=False,
        configure_logging=True,
        logging_level="INFO",
    )


@contextlib.contextmanager
def restart_args_allowed():
    """Around a ``map_batches`` given ``EngineConfig.actor_pool_args()``: Ray 2.60's
    ``map_batches`` names no parameter for an actor's restarts, so ``max_restarts`` and
    ``max_task_retries`` still go through its ``**ray_remote_args``, for which it warns
    (deprecated, removal in Ray 2.64) on the console of every run. That one warning is
    silenced here; the rest pass."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield


def job_placement_groups() -> set[str]:
    """The ids (hex) of this job's placement groups that are not removed: a placement
    group's id ends with the id of the job that created it, whichever of the job's actors
    created it. Read from the GCS, so it works without the dashboard."""
    import ray
    from ray.util import placement_group_table

    job = ray.get_runtime_context().get_job_id()
    return {
        pid
        for pid, group in placement_group_table().items()
        if pid.endswith(job) and group["state"] != "REMOVED"
    }


def release_placement_groups(before: set[str], wait_s: float = 5.0) -> list[str]:
    """Remove this job's placement groups created since ``before`` (a
    ``job_placement_groups()`` taken earlier) that are still there after ``wait_s``; call it
    once nothing of the job started since then runs any more. Returns the ids removed.

    Why: Ray Train's worker group reserves a placement group from its controller actor,
    which Ray scopes to the job, not to the controller. A controller that dies mid-run (a
    Tune trial that ASHA stops is killed with its controller) leaves it reserved until the
    job ends, unless Ray Train's detached cleaner removes it, and that cleaner asks the
    State API, which only a cluster with a dashboard has. The wait gives that cleaner its
    turn."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    deadline = time.monotonic() + wait_s
    while True:
        left = sorted(job_placement_groups() - before)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    removed = []
    for pid in left:
        with contextlib.suppress(Exception):  # removed meanwhile
            remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pid)))
            removed.append(pid)
    return removed


class ConsoleQuiet(logging.Filter):
    """For the console handlers of Ray, vLLM and transformers: warnings and errors, but not
    the set-up notices of ``NOTICE_LOGGERS`` below ERROR (the run's log keeps them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno < logging.WARNING:
            return False
        return not any(record.name == n or record.name.startswith(n + ".") for n in NOTICE_LOGGERS)


class _RunLogHandler(logging.FileHandler):
    """The run folder's ray.log (a type of its own, so raydc finds the handlers it added)."""


_run_log: Path | None = None  # the ray.log of the run this process runs now


def _is_console(h: logging.Handler) -> bool:
    return isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)


class _Stderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record, like Python's last resort."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _reaches(logger: logging.Logger, kind) -> bool:
    """Whether a record of ``logger`` reaches a handler for which ``kind(h)`` holds (its
    own or an ancestor's)."""
    lg: logging.Logger | None = logger
    while lg is not None:
        if any(kind(h) for h in lg.handlers):
            return True
        lg = lg.parent if lg.propagate else None
    return False


def route_library_logs() -> None:
    """Quiet the console handlers of every logger of ``LIBRARY_LOGGERS`` made so far
    (:class:`ConsoleQuiet`) and send their records to the current run's ray.log, if one
    was named (:func:`route_ray_logs`). Idempotent. A library that sets its handlers up
    when imported (vLLM) is routed again right after its import (raydc.engines.sampler)."""
    import ray  # noqa: F401  (importing it gives the "ray" logger its console handler)

    # ray.llm gives each of its loggers its own console handler unless "ray.llm" has a
    # handler: with one, they propagate to "ray", whose handlers are routed here.
    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        llm.addHandler(logging.NullHandler())
    for lib in LIBRARY_LOGGERS:
        if lib in sys.modules:  # vLLM configures its loggers only in its engines' processes
            logging.getLogger(lib)
    names = [
        name
        for name in sorted(logging.root.manager.loggerDict)  # parents before children
        if any(name == lib or name.startswith(lib + ".") for lib in LIBRARY_LOGGERS)
    ]
    # (a run whose folder is gone, as a test's may be by now, gets nothing more)
    target = str(_run_log) if _run_log is not None and _run_log.parent.is_dir() else None
    for name in names:
        logger = logging.root.manager.loggerDict[name]
        if not isinstance(logger, logging.Logger):  # a placeholder
            continue
        for h in logger.handlers:
            if _is_console(h) and not any(isinstance(f, ConsoleQuiet) for f in h.filters):
                h.addFilter(ConsoleQuiet())
        for h in [h for h in logger.handlers if isinstance(h, _RunLogHandler)]:
            if h.baseFilename != target:  # another run's file (one process, two runs)
                logger.removeHandler(h)
                h.close()
        if target is None or _reaches(logger, lambda h: isinstance(h, _RunLogHandler)):
            continue
        if logger.handlers or not logger.propagate or "." not in name:
            fh = _RunLogHandler(target)
            fh.setLevel(logging.INFO)
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(fh)
        if not _reaches(logger, _is_console):
            # A logger with no console handler had its warnings shown by Python's last
            # resort, which the file handler now stands in the way of: one of its own.
            console = _Stderr()
            console.addFilter(ConsoleQuiet())
            console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(console)


def route_ray_logs(
    log_file: str | os.PathLike,
    stage: str | None = None,
    progress_every_s: float | None = None,
    progress_stream=None,
) -> None:
    """Send the records of Ray (Data, Train, Tune, Core), vLLM and transformers in this
    process to ``log_file`` at INFO and keep only their warnings on the console
    (:func:`route_library_logs`). With ``stage``, Ray Data's progress records (logged off a
    terminal instead of a bar) become ``[raydc] <stage>`` progress lines on
    ``progress_stream`` (stderr), one at most every ``progress_every_s`` seconds
    (:class:`raydc.infra.progress.DataProgress`). Idempotent; called at each stage start,
    before Ray starts (its token notice goes to the file) and since Ray may rebuild its
    handlers. One process running two runs writes each run's logs to its own file."""
    import ray.data  # noqa: F401  (importing it configures the "ray.data" logger)

    from raydc.infra.progress import PROGRESS_EVERY_S, DataProgress

    global _run_log
    _run_log = Path(log_file).resolve()
    logging.getLogger("ray").setLevel(logging.INFO)  # the file has Ray's INFO records
    route_library_logs()
    data = logging.getLogger("ray.data")
    for h in [h for h in data.handlers if isinstance(h, DataProgress)]:
        data.removeHandler(h)
        h.close()
    if stage is not None:
        every = PROGRESS_EVERY_S if progress_every_s is None else progress_every_s
        data.addHandler(DataProgress(stage, every_s=every, stream=progress_stream))


# Ray's C++ core worker writes each of its records of ERROR and above to the process's
# stderr as well as to its own log (ray-project/ray#18577); only RAY_BACKEND_LOG_LEVEL turns
# that off, and it drops them from the log too. In the driver, Ray Data's own actor pools
# set one off on every run ("core_worker.cc: Actor ... has constructor arguments in the
# object store and max_restarts > 0", ray-project/ray#57733). native_stderr_to() sends such
# lines (below FATAL) to the run's log; a FATAL one and every other line stay on stderr.
NATIVE_RECORD = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [TDIWE] \d+ \d+\] \S+:\d+: ")


@contextlib.contextmanager
def native_stderr_to(log_file: str | os.PathLike, ready_timeout_s: float = 30.0):
    """While inside, this process's file descriptor 2 (what C and C++ code writes to) goes
    through a small filter process: lines in the format of Ray's C++ log (below FATAL) are
    appended to ``log_file``, everything else reaches stderr as it came. Python's
    ``sys.stderr`` writes to stderr directly meanwhile, so raydc's own lines keep their
    order with stdout. The filter is a process, not a thread, so that what a crashing
    driver writes last still reaches the console. A no-op where ``sys.stderr`` is not the
    process's own (a test capturing it), off POSIX, or if the filter does not start."""
    if os.name != "posix" or sys.__stderr__ is None or sys.stderr is not sys.__stderr__:
        yield
        return
    sys.stderr.flush()
    console = os.dup(2)
    ready_r, ready_w = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != REAP_TOKEN_VAR}  # the reaper's not
    here = str(Path(__file__).resolve().parents[2])  # this raydc, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    args = [sys.executable, "-m", "raydc.infra.runtime", "native-stderr"]
    try:
        proc = subprocess.Popen(
            [*args, str(Path(log_file).resolve()), str(ready_w)],
            stdin=subprocess.PIPE,
            stdout=console,
            stderr=console,
            pass_fds=(ready_w,),
            env=env,
            start_new_session=True,  # a Ctrl-C to the driver's group must not end it first
        )
    except OSError:
        proc = None
    os.close(ready_w)
    ready = proc is not None and _wait_readable(ready_r, ready_timeout_s)
    os.close(ready_r)
    if not ready:
        if proc is not None:
            proc.kill()
            proc.wait()
        os.close(console)
        yield
        return
    saved = sys.stderr
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()  # fd 2 holds the pipe now; the filter ends when it closes
    # Not closed on the way out: a handler or bar made inside may still hold it.
    sys.stderr = open(  # noqa: SIM115
        os.dup(console), "w", buffering=1, encoding=saved.encoding, errors=saved.errors
    )
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = saved
        os.dup2(console, 2)
        os.close(console)


def _wait_readable(fd: int, timeout_s: float) -> bool:
    import select

    readable, _, _ = select.select([fd], [], [], timeout_s)
    return bool(readable) and os.read(fd, 1) == b"1"


def filter_native(source, console, log_path: str) -> None:
    """The filter of :func:`native_stderr_to`: each line of ``source`` (binary) to the file
    at ``log_path`` if it is a record of Ray's C++ log below FATAL, else to ``console``."""
    with open(log_path, "ab") as log:
        for line in source:
            out = log if NATIVE_RECORD.match(line) else console
            try:
                out.write(line)
                out.flush()
            except OSError:  # a closed console: nothing is left to show it
                pass


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
    elif len(sys.argv) == 4 and sys.argv[1] == "native-stderr":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # it ends when the driver's stderr does
        os.write(int(sys.argv[3]), b"1")
        os.close(int(sys.argv[3]))
        filter_native(sys.stdin.buffer, sys.stdout.buffer, sys.argv[2])
    else:
        sys.exit(
            "usage: python -m raydc.infra.runtime reap <token> <driver pid>\n"
            "       python -m raydc.infra.runtime native-stderr <log file> <ready fd>"
        )
