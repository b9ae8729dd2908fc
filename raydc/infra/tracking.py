"""Experiment tracking: MLflow and Weights & Biases runs beside TensorBoard (``run.trackers``).

What goes where, for each tracker named in ``run.trackers`` other than ``tensorboard``
(TensorBoard is files the train stage writes itself: ``<stage>/tensorboard/``):

- **the job** (one ``raydc`` command, ``jobs/distill.py``): one run named after the output
  folder, opened by the command line (``start_job``) and closed by it (``finish_job``): the
  config as parameters (and ``config.yaml``), each stage's summary (``stages/<stage>.json``
  and its numbers as ``stages/<stage>/<key>``) and the run summary (``summary.json``,
  ``summary/<key>``), the status FINISHED, FAILED or KILLED;
- **each training** (the train stage, each DASD phase's, each Tune trial's): a run of its
  own under the job's, opened on the Ray Train controller by the train stage's driver-side
  callback (``raydc.train.trainer``, the one that writes ``metrics.jsonl`` and TensorBoard):
  the training's full config as parameters, every report's scalars as ``train/<metric>``
  at its step, the weight histogram (W&B), and at the end the plots (``plots/loss.png``,
  ``plots/weights.png``) and ``metrics.jsonl`` as artifacts;
- **a Tune sweep**: one run under the job's, with each trial's training run under it
  (``mlflow.parentRunId``; in W&B, where runs do not nest, the trials share the group
  ``<job group>/<sweep>``), the results table and the best trial as artifacts.

MLflow writes through ``MlflowClient`` to ``run.mlflow_tracking_uri``, else
``MLFLOW_TRACKING_URI``, else a SQLite store under ``<output_dir>/mlruns/`` (artifacts
beside it); every process addresses a run by its id, so the driver, the Train controller
and the Tune trials can each log. W&B runs live in the process that opened them
(``wandb.init``, ``reinit="create_new"``); ``WANDB_MODE`` (read on the driver and carried to
the controller) picks online or offline; files go under ``<output_dir>/wandb/``.

Why not Ray's own ``ray.air.integrations.mlflow`` / ``.wandb``: their logger callbacks are Ray
Tune ``LoggerCallback``s, which a Ray Train V2 ``RunConfig`` refuses (its callbacks must be
``ray.train.UserCallback``), and in a sweep they see only Tune's result stream and the
sampled values, not the trial's full config, its weight histogram or its plots;
``setup_mlflow`` / ``setup_wandb`` run inside the worker loop, on the workers. Here the
libraries are called directly from the Train V2 callback that already receives every
report on the driver side, so a plain training and a Tune trial log the same way.

The packages are imported only when their tracker is named (``pip install
'raydc[tracking]'``); a missing one is a ``ConfigError`` naming ``run.trackers``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydc.config import ConfigError, RaydcConfig
from raydc.config.sections import TRACKERS

REMOTE = tuple(t for t in TRACKERS if t != "tensorboard")  # trackers with runs of their own
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value (config.yaml holds them whole)
MLFLOW_PARENT = "mlflow.parentRunId"  # the tag MLflow nests runs by


# ----------------------------------------------------------------------------- pure parts


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: mappings recurse, a list of mappings recurses by
    index (``phases.0.name``), anything else is a leaf."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out.update(flatten({str(i): x for i, x in enumerate(v)}, key + "."))
        else:
            out[key] = v
    return out


def params(tree: dict) -> dict[str, str]:
    """The config as tracker parameters: dotted keys, values as text (strings as they are,
    the rest as JSON), cut to MLflow's ``MAX_PARAM_CHARS``."""
    out = {}
    for k, v in flatten(tree).items():
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        out[k] = text[:MAX_PARAM_CHARS]
    return out


def scalars(tree: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested summary, by dotted-slash key (``engines/student/x``);
    booleans, text, lists and NaN are left out."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(scalars(v, key + "/"))
        elif _number(v):
            out[key] = float(v)
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metric_key(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / : `` and space; 250 chars)."""
    return re.sub(r"[^/\w.\- :]", "_", key)[:250]


def mlflow_uri(cfg: RaydcConfig) -> str:
    """``run.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store under
    ``<output_dir>/mlruns/``."""
    uri = cfg.run.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = Path(cfg.run.output_dir).expanduser().resolve() / "mlruns" / "mlflow.db"
    return f"sqlite:///{db}"


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store's file (MLflow's own
    default is ``./mlruns`` under the current folder); other stores decide for themselves."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    return None


def check_trackers(trackers) -> None:
    """Fail before anything runs when a named tracker's package is not installed."""
    missing = [t for t in trackers if t in REMOTE and importlib.util.find_spec(t) is None]
    if missing:
        raise ConfigError(
            f"run.trackers={list(trackers)}: {', '.join(missing)} is not installed; "
            f"pip install 'raydc[tracking]' (or {' '.join(missing)})"
        )


# ----------------------------------------------------------------------------- plots


def write_plots(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """PNGs of a training's ``metrics.jsonl``: ``loss.png`` (loss and val_nll by step) and
    ``weights.png`` (the last report's weight histogram, when there is one)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from matplotlib.ticker import MaxNLocator

    by_step: dict[int, dict] = {}
    for line in Path(metrics_path).read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            by_step[int(m.get("step", 0))] = m  # a step re-run after a restart replaces it
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    steps = sorted(by_step)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for key in ("loss", "val_nll"):
        pts = [(s, by_step[s][key]) for s in steps if _number(by_step[s].get(key))]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=key)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.savefig(out / "loss.png", dpi=100)
    written.append(out / "loss.png")
    hist = next(
        (
            by_step[s]["weight_histogram"]
            for s in reversed(steps)
            if by_step[s].get("weight_histogram")
        ),
        None,
    )
    if hist and sum(hist["counts"]) > 0:
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        edges = hist["edges"]
        ax.stairs(hist["counts"], edges, fill=True)
        ax.set_xlabel("token weight")
        ax.set_ylabel("tokens")
        fig.savefig(out / "weights.png", dpi=100)
        written.append(out / "weights.png")
    return written


# ----------------------------------------------------------------------------- the backends


class _Mlflow:
    """One MLflow run, addressed by id through ``MlflowClient`` (any process may log)."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, name: str, kind: str, parent_id, tree: dict):
        import logging
        import warnings

        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if "://" not in uri or uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; a user
            # who names a file store wants it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # table creation
        self.uri = uri
        with warnings.catch_warnings():  # SQLAlchemy's deprecation notes on MLflow's store
            warnings.simplefilter("ignore", DeprecationWarning)
            self.client = MlflowClient(tracking_uri=uri)
        self.experiment_id = self._experiment(experiment)
        tags = {"raydc.kind": kind}
        if parent_id:
            tags[MLFLOW_PARENT] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in params(tree).items()]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifact_root(self.uri))
        except Exception:  # created meanwhile by another process (Tune trials start together)
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log(self, metrics: dict[str, float], step: int, histogram: dict | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def summary(self, name: str, summary: dict) -> None:
        self.text(f"{name}.json", json.dumps(summary, indent=2, default=str))
        self.log({f"{name}/{k}": v for k, v in scalars(summary).items()}, 0, None)

    def text(self, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def file(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def close_children(self, status: str) -> None:
        """Children left RUNNING (a trial ASHA stopped, a training that failed) get ``status``."""
        left = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{MLFLOW_PARENT}` = '{self.run_id}' "
            "and attributes.status = 'RUNNING'",
        )
        for r in left:
            self.client.set_terminated(r.info.run_id, status)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def where(self) -> dict:
        return {"uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}


class _Wandb:
    """One W&B run, in the process that opened it (``reinit="create_new"``: a driver may
    hold the job's run and a sweep's at once)."""

    name = "wandb"

    def __init__(self, spec: Tracking, name: str, kind: str, group: str, tree: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=spec.experiment,
            entity=spec.wandb_entity,
            name=name,
            group=group,
            job_type=kind,
            config=tree,
            dir=spec.wandb_dir,
            mode=spec.wandb_mode,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
        # Reports re-run after a restart repeat steps: an x-axis of our own, not W&B's
        # monotonic _step, keeps them
        self.run.define_metric("train/*", step_metric="train/step")

    def log(self, metrics: dict[str, float], step: int, histogram: dict | None) -> None:
        row: dict[str, Any] = {**metrics, "train/step": step}
        if histogram and sum(histogram["counts"]) > 0:
            row["train/weights"] = self.wandb.Histogram(
                np_histogram=(histogram["counts"], histogram["edges"])
            )
        self.run.log(row)

    def summary(self, name: str, summary: dict) -> None:
        self.text(f"{name}.json", json.dumps(summary, indent=2, default=str))
        self.run.summary.update({f"{name}/{k}": v for k, v in scalars(summary).items()})

    def text(self, name: str, text: str) -> None:
        path = Path(self.run.dir) / name  # run.dir's files are uploaded (offline: kept)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def file(self, path: Path, folder: str) -> None:
        dest = Path(self.run.dir) / folder / Path(path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)

    def close_children(self, status: str) -> None:
        pass  # W&B runs do not nest; each process finishes its own

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def where(self) -> dict:
        return {"dir": str(Path(self.run.dir).parent), "run_id": self.run.id}


# ----------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class Tracking:
    """Where runs go, resolved on the driver and carried (pickled) to the Train controller
    and the Tune trials, whose environment may differ."""

    trackers: tuple[str, ...]
    experiment: str
    mlflow_uri: str
    wandb_dir: str
    wandb_mode: str | None = None  # WANDB_MODE on the driver: online / offline / disabled
    wandb_entity: str | None = None  # WANDB_ENTITY on the driver

    @classmethod
    def of(cls, cfg: RaydcConfig) -> Tracking:
        out = Path(cfg.run.output_dir).expanduser().resolve()
        return cls(
            trackers=tuple(t for t in cfg.run.trackers if t in REMOTE),
            experiment=cfg.run.experiment,
            mlflow_uri=mlflow_uri(cfg),
            wandb_dir=os.environ.get("WANDB_DIR") or str(out),
            wandb_mode=os.environ.get("WANDB_MODE"),
            wandb_entity=os.environ.get("WANDB_ENTITY"),
        )


@dataclass(frozen=True)
class Parent:
    """What a run's children need of it: the same stores, its MLflow id, the W&B group."""

    tracking: Tracking
    group: str
    mlflow_run_id: str | None
    root: str | None = None  # the parent's output folder: children are named below it


@dataclass(frozen=True)
class RunSpec:
    """A run to open later, elsewhere (the Train controller opens the training's run)."""

    tracking: Tracking
    name: str
    kind: str  # job | train | trial | sweep
    config: dict  # the config tree: MLflow parameters, W&B config
    parent: Parent | None = None
    group: str | None = None  # the W&B group of a run without parent and of its children

    def start(self) -> Run:
        return Run(self)


class Run:
    """One run in each of the spec's trackers."""

    def __init__(self, spec: RunSpec):
        t = spec.tracking
        self.spec = spec
        # W&B groups runs instead of nesting them: a run joins its parent's group; its
        # children form one of their own (a sweep's trials: "<job group>/<sweep>")
        self.group = spec.parent.group if spec.parent else (spec.group or spec.name)
        self.child_group = spec.group or (
            f"{spec.parent.group}/{spec.name}" if spec.parent else spec.name
        )
        parent_id = spec.parent.mlflow_run_id if spec.parent else None
        self.backends: list = []
        if "mlflow" in t.trackers:
            self.backends.append(
                _Mlflow(t.mlflow_uri, t.experiment, spec.name, spec.kind, parent_id, spec.config)
            )
        if "wandb" in t.trackers:
            self.backends.append(_Wandb(t, spec.name, spec.kind, self.group, spec.config))

    def log(self, metrics: dict[str, float], step: int, histogram: dict | None = None) -> None:
        for b in self.backends:
            b.log(metrics, step, histogram)

    def summary(self, name: str, summary: dict) -> None:
        for b in self.backends:
            b.summary(name, summary)

    def text(self, name: str, text: str) -> None:
        for b in self.backends:
            b.text(name, text)

    def files(self, paths, folder: str) -> None:
        for p in paths:
            for b in self.backends:
                b.file(Path(p), folder)

    def as_parent(self, root: str | None = None) -> Parent:
        mlflow = next((b for b in self.backends if b.name == "mlflow"), None)
        run_id = mlflow.run_id if mlflow else None
        return Parent(self.spec.tracking, self.child_group, run_id, root)

    def finish(self, status: str = "FINISHED", children: str | None = None) -> None:
        """End the run; ``children``: the status its children still RUNNING get."""
        for b in self.backends:
            if children:
                b.close_children(children)
            b.finish(status)

    def where(self) -> dict:
        return {b.name: b.where() for b in self.backends}


def child_name(out: str | os.PathLike, parent: Parent | None) -> str:
    """A stage's run name: its folder below the parent's (``train``, ``phases/p1/train``)."""
    out = Path(out).resolve()
    root = Path(parent.root) if parent and parent.root else out.parent
    return str(out.relative_to(root)) if out.is_relative_to(root) else out.name


def run_spec(
    cfg: RaydcConfig, name: str, kind: str, parent: Parent | None = None, group: str | None = None
) -> RunSpec | None:
    """The spec of a run for ``cfg`` (None when no tracker but TensorBoard is named); a
    child opens in its parent's stores, whatever its own output folder (a DASD phase's)."""
    tracking = parent.tracking if parent else Tracking.of(cfg)
    if not tracking.trackers:
        return None
    check_trackers(tracking.trackers)
    tree = cfg.to_dict()
    return RunSpec(tracking, name, kind, tree, parent, group)


# ----------------------------------------------------------------------------- the job

_job: Run | None = None  # the run of the command in progress in this process
_job_root: str | None = None  # its output folder


def start_job(cfg: RaydcConfig) -> Run | None:
    """Open the job's run (``raydc`` commands call it once the config is resolved): the
    config as parameters and ``config.yaml``. Trainings and sweeps started in this process
    nest under it (``job_parent``)."""
    global _job, _job_root
    from raydc.config import dump_config

    spec = run_spec(cfg, Path(cfg.run.output_dir).name, "job")
    if spec is None:
        return None
    group = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"  # W&B: the job's runs together
    _job = RunSpec(spec.tracking, spec.name, "job", spec.config, group=group).start()
    _job.text("config.yaml", dump_config(cfg))
    _job_root = str(Path(cfg.run.output_dir).expanduser().resolve())
    return _job


def job_parent() -> Parent | None:
    """The job's run as a parent, when this process opened one."""
    return _job.as_parent(root=_job_root) if _job is not None else None


def finish_job(status: str, summary: dict | None = None, results: dict | None = None) -> dict:
    """Log the stage summaries (``results``: name -> StageResult) and the run summary, end
    the job's run (children left RUNNING get ``status`` too, FINISHED ones stay); return
    where each tracker keeps it ({} without a job run)."""
    global _job
    job, _job = _job, None
    if job is None:
        return {}
    for name, r in (results or {}).items():
        job.summary(f"stages/{name}", r.summary)
    if summary is not None:
        job.summary("summary", summary)
    job.finish(status, children="KILLED" if status == "FINISHED" else status)
    return job.where()
