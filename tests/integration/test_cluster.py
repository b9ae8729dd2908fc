"""cluster.yaml: it validates against Ray's shipped schema, and the autoscaling it asks for
works: on Ray's fake multi-node provider, a job that needs a resource only a worker type
offers makes the autoscaler add that node, and the job runs to completion on it.

``LocalHead`` starts a real ``ray start --head --block`` on non-default ports with its own
temp dir and its own auth token file, and stops exactly the processes it started (by pid),
so it never touches another Ray instance on the machine. test_job.py reuses it.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """A real local Ray head node (token auth on) owned by this test, stopped by pid."""

    def __init__(
        self,
        num_cpus: int = 2,
        autoscaling_config: dict | None = None,
        extra_env: dict | None = None,
    ):
        self.tmp = Path(tempfile.mkdtemp(prefix="rdc-"))  # short: Ray's socket paths
        self.port = _free_port()
        self.dashboard_port = _free_port()
        # Every port a head binds, not just the GCS and dashboard ones: a Ray started
        # earlier in the same session (the suite's in-process ``ray.init``) holds the
        # default agent ports (52365...), and a second head's agent then cannot start, so
        # ``ray job submit`` answers "No available agent" for ever.
        self.agent_ports = {
            "--dashboard-agent-listen-port": _free_port(),
            "--dashboard-agent-grpc-port": _free_port(),
            "--runtime-env-agent-port": _free_port(),
            "--metrics-export-port": _free_port(),
            "--ray-client-server-port": _free_port(),
        }
        self.num_cpus = num_cpus
        self.autoscaling_config = autoscaling_config
        token_file = self.tmp / "auth_token"
        token_file.write_text(uuid.uuid4().hex)
        # Its own token file: clients and every process of this cluster use it; the
        # user's ~/.ray/auth_token is left alone.
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            **(extra_env or {}),
        }
        self.env.pop("RAY_ADDRESS", None)
        self.proc: subprocess.Popen | None = None
        self.log = self.tmp / "head.log"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 120) -> LocalHead:
        cmd = [
            "ray",
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.num_cpus}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            *(f"{flag}={port}" for flag, port in self.agent_ports.items()),
            f"--temp-dir={self.tmp / 'ray'}",
            "--disable-usage-stats",
        ]
        if self.autoscaling_config is not None:
            cfg_path = self.tmp / "autoscaling.yaml"
            cfg_path.write_text(json.dumps(self.autoscaling_config))
            cmd.append(f"--autoscaling-config={cfg_path}")
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited early:\n{self.log.read_text()[-4000:]}")
            if "Ray runtime started" in self.log.read_text() and self._dashboard_up():
                return self
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"head not up after {timeout_s}s:\n{self.log.read_text()[-4000:]}")

    def _dashboard_up(self) -> bool:
        import urllib.request

        try:
            urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2)
            return True
        except Exception as e:  # 401 also means it is up
            return "401" in str(e)

    def run(
        self, args: list[str], timeout: float = 600, env_override: dict | None = None
    ) -> subprocess.CompletedProcess:
        """Run a client command (``ray job submit ...``) with this cluster's auth env
        (or ``env_override`` instead of it)."""
        return subprocess.run(
            args, env=env_override or self.env, capture_output=True, text=True, timeout=timeout
        )

    def submit(self, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
        """``ray job submit --address <this head> ARGS``, retried while the job agent
        that accepts submissions is still starting (the dashboard answers before it)."""
        deadline = time.time() + 300  # the agent can take minutes on a loaded machine
        while True:
            r = self.run(
                ["ray", "job", "submit", "--address", self.dashboard_url, *args], timeout=timeout
            )
            if "No available agent" not in r.stdout + r.stderr or time.time() > deadline:
                return r
            time.sleep(3)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc = None

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def load_cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


# ------------------------------------------------------------------ schema and content


def test_cluster_yaml_validates_against_ray_schema():
    cfg = validate(load_cluster_yaml())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert "GPU" not in head["resources"], "the head is a CPU node"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert {"gpu_score", "gpu_train"} <= set(workers)
    for name, nt in workers.items():
        assert nt["resources"].get("GPU", 0) >= 1, name
        assert 0 <= nt["min_workers"] <= nt["max_workers"], name
    assert cfg["idle_timeout_minutes"] > 0
    assert any("raydc[gpu]" in c for c in cfg["setup_commands"])
    for cmd_list in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in c for c in cfg[cmd_list]), cmd_list
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    assert any("/mnt/raydc" in c for c in cfg["initialization_commands"])


def test_cluster_yaml_with_a_misspelt_key_fails_validation():
    cfg = load_cluster_yaml()
    cfg["idle_timeout_minuets"] = cfg.pop("idle_timeout_minutes")
    with pytest.raises(Exception, match="idle_timeout_minuets"):
        validate(cfg)
    cfg = load_cluster_yaml()
    cfg["available_node_types"]["gpu_score"]["min_worker"] = 0
    with pytest.raises(Exception, match="min_worker"):
        validate(cfg)


# ------------------------------------------------------------------ autoscaling


def fake_multinode_config(gcs_address: str) -> dict:
    """cluster.yaml's node types and scaling settings on the fake multi-node provider.

    Worker types keep their custom resources (what routes a stage to them) but get one
    CPU each, and GPUs that exist only as a resource count: this machine has none.
    """
    real = load_cluster_yaml()
    workers = {}
    for name, nt in real["available_node_types"].items():
        if name == real["head_node_type"]:
            continue
        res = {k: v for k, v in nt["resources"].items() if k not in ("CPU", "GPU")}
        workers[name] = {
            "resources": {"CPU": 1, "GPU": 1, **{k: 1 for k in res}},
            "node_config": {},
            "min_workers": nt["min_workers"],
            "max_workers": min(nt["max_workers"], 1),
        }
    return {
        "cluster_name": "raydc-fake",
        "max_workers": 2,
        "upscaling_speed": real["upscaling_speed"],
        "idle_timeout_minutes": real["idle_timeout_minutes"],
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {"ssh_user": "ubuntu"},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            **workers,
        },
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


# The entrypoint inherits the environment of the node it was placed on (fake nodes share
# one IP, so a driver's own node id would name whichever raylet it attached to).
PROBE = r"""
import json, os, ray
ray.init()
nodes = [dict(id=n["NodeID"], alive=n["Alive"], res=n["Resources"]) for n in ray.nodes()]
env = {k: os.environ.get(k) for k in ("RAY_NODE_TYPE_NAME", "CUDA_VISIBLE_DEVICES")}
print("PROBE " + json.dumps(dict(env=env, nodes=nodes)))
"""


@pytest.mark.integration
def test_autoscaler_adds_a_scoring_node_for_a_job_that_needs_one():
    head = LocalHead(num_cpus=1)
    cfg = fake_multinode_config(head.gcs_address)
    from ray.autoscaler._private.util import validate_config

    validate_config(cfg)  # schema only: prepare_config wants a file the wheel lacks
    head.autoscaling_config = cfg
    head.env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    with head:
        t0 = time.time()
        # The head offers no GPU and no `raydc_score`: only a new gpu_score node can run it.
        r = head.submit(
            [
                "--entrypoint-num-gpus",
                "1",
                "--entrypoint-resources",
                json.dumps({"raydc_score": 1}),
                "--",
                sys.executable,
                "-c",
                PROBE,
            ],
            timeout=300,
        )
        elapsed = time.time() - t0
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in (r.stdout + r.stderr).lower()
        line = next(x for x in r.stdout.splitlines() if x.startswith("PROBE "))
        probe = json.loads(line[len("PROBE ") :])
        alive = [n for n in probe["nodes"] if n["alive"]]
        assert len(alive) >= 2, probe  # the head plus the node the autoscaler added
        added = [n for n in alive if n["res"].get("raydc_score") == 1]
        assert len(added) == 1 and added[0]["res"].get("GPU") == 1, alive
        assert probe["env"]["RAY_NODE_TYPE_NAME"] == "gpu_score", probe["env"]
        assert probe["env"]["CUDA_VISIBLE_DEVICES"] == "0", probe["env"]
        print(f"job needing a gpu_score node finished in {elapsed:.1f}s")
