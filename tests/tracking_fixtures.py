"""Reading what the trackers wrote, through their own formats: MLflow through its client,
W&B offline runs from their ``run-<id>.wandb`` files (records of W&B's ``Record`` protobuf,
framed as a LevelDB log: 32 KiB blocks of chunks with a 7-byte header)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = b":W&B"  # + 2 bytes of magic and 1 of version: 7 bytes, like a chunk header


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == HEADER, f"{path}: not a W&B run file"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the block's end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def wandb_runs(root: str | Path) -> list[dict]:
    """Every offline W&B run under ``root/wandb``: id, name, group, job_type, config (the
    top-level keys, decoded), history (one dict per ``log`` call), summary, exit code and
    the names of its files (paths below ``files/``)."""
    runs = []
    for run_dir in sorted(Path(root, "wandb").glob("offline-run-*")):
        run: dict = {"config": {}, "history": [], "summary": {}, "exit_code": None}
        for r in _records(next(run_dir.glob("run-*.wandb"))):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(
                    id=r.run.run_id,
                    name=r.run.display_name,
                    group=r.run.run_group,
                    job_type=r.run.job_type,
                )
                for item in r.run.config.update:
                    run["config"][_key(item)] = json.loads(item.value_json)
            elif kind == "config":
                for item in r.config.update:
                    run["config"][_key(item)] = json.loads(item.value_json)
            elif kind == "history":
                run["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary":
                for item in r.summary.update:
                    run["summary"][_key(item)] = json.loads(item.value_json)
            elif kind == "exit":
                run["exit_code"] = r.exit.exit_code
        files = run_dir / "files"
        run["files"] = {str(p.relative_to(files)) for p in files.rglob("*") if p.is_file()}
        run["dir"] = run_dir
        runs.append(run)
    return runs


def mlflow_runs(uri: str, experiment: str = "raydc") -> list:
    """The experiment's runs (``mlflow.entities.Run``, read by MLflow's client), oldest
    first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
