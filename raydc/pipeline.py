"""Stage orchestration: prepare -> score -> [select] -> train | tune -> eval, resumable.

Each stage writes under ``<run.output_dir>/<stage>/`` and, when it finishes, a small marker
(``_raydc_stage.json``) holding a fingerprint of everything it read: its config sections,
the fingerprints of the stages upstream, and hashes of its input files and models. A rerun
skips a stage whose marker matches and reruns one whose inputs changed, so a failed job
resumes at the stage that failed (training and Tune also resume from their own checkpoints
there). Every stage that actually runs appends a line to ``<output_dir>/stages.jsonl``:
that is how a test counts that a Tune sweep scored the data once.

The marker also vouches for the stage's outputs: each file's size, an O(1) digest and, for
Parquet, its row count (``outputs``). A reused stage checks them first; a deleted, truncated
or rewritten output reruns the stage that made it. One job at a time owns an output folder
(``.raydc.lock``, an advisory lock the OS drops when the process dies), and a stage folder
is cleared only if raydc made it (``.raydc_stage_dir`` inside). docs/failure-modes.md says
what each fault does.

Configs may name packaged files as ``pkg:assets/example/train.jsonl`` and the built-in
tiny models as ``tiny:student`` / ``tiny:teacher`` (built under ``<output_dir>/models/``
on first use, from ``raydc.models``); ``resolve`` turns both into real paths before any
stage sees the config. The stage functions themselves live in their own modules
(docs/contracts.md); this module only decides what runs and reports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydc.artifacts import (
    OWNED,  # in every stage folder raydc creates: it may clear it
    TOKENIZER_FILES,
)
from raydc.config import RaydcConfig
from raydc.runtime import RAY_LOG, connect_ray, route_ray_logs
from raydc.summary import stage_line

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
MARKER = "_raydc_stage.json"
HISTORY = "stages.jsonl"
LOCK = ".raydc.lock"
LOG = "raydc.log"  # tracebacks of failed stages
# role -> (size role in raydc.models.TINY_SIZES, seed). The teacher is larger than the
# student and shares its tokenizer.
TINY_MODELS = {"tiny:student": ("student", 0), "tiny:teacher": ("teacher", 1)}
# Files above this size are fingerprinted by (name, size, mtime) instead of content: a
# 15 GB checkpoint must not be re-read on every rerun.
HASH_CONTENT_LIMIT = 64 << 20


class StageError(RuntimeError):
    """A stage failed; the message names the stage and where its partial output is."""


class OutputDirBusy(StageError):
    """Another live process holds the output folder's lock."""


# ----------------------------------------------------------------------------- the lock

# Output folder -> the open lock file of this process. A process takes a folder's lock
# once and keeps it until it exits (or ``release_output_dir``): pipelines built one after
# another in one process (tests, notebooks) share it; another process is refused.
_LOCKS: dict[str, Any] = {}


def lock_output_dir(root: Path) -> None:
    """Take ``<root>/.raydc.lock`` for this process or raise OutputDirBusy naming the
    holder. ``fcntl.flock`` is dropped by the kernel when its process dies, so a SIGKILLed
    job never leaves a stale lock (on NFS, flock is only as good as the mount's locking)."""
    import fcntl
    import socket

    key = str(root)
    if key in _LOCKS:
        return
    path = root / LOCK
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise OutputDirBusy(
            f"run.output_dir={root} is in use by another raydc job ({holder}); wait for it "
            f"or give this job another run.output_dir"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%F %T')}")
    fh.flush()
    _LOCKS[key] = fh


def release_output_dir(root: Path) -> None:
    fh = _LOCKS.pop(str(root), None)
    if fh is not None:
        fh.close()


# ----------------------------------------------------------------------------- outputs


def output_record(out: Path, paths: list[Path] | None = None) -> dict[str, dict]:
    """What a marker vouches for: rel path -> size, O(1) digest, rows (Parquet), for every
    file under ``paths`` (default: the whole stage folder), bookkeeping files left out."""
    from raydc.models import file_digest

    record: dict[str, dict] = {}
    for root in [out] if paths is None else paths:
        files = [root] if root.is_file() else sorted(x for x in root.rglob("*") if x.is_file())
        for f in files:
            rel = f.relative_to(out).as_posix()
            if f.name in (MARKER, MARKER + ".tmp", OWNED) or rel.startswith("."):
                continue
            entry = {"bytes": f.stat().st_size, "digest": file_digest(f)}
            if f.suffix == ".parquet":
                entry["rows"] = _parquet_rows(f)
            record[rel] = entry
    return record


def _parquet_rows(path: Path) -> int | None:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # truncated or not Parquet: no count, the check below reports it
        return None


def changed_outputs(out: Path, record: dict[str, dict]) -> list[str]:
    """The recorded outputs that are missing or differ now (empty: all vouched for)."""
    from raydc.models import file_digest

    bad = []
    for rel, want in record.items():
        f = out / rel
        if not f.is_file():
            bad.append(f"{rel} is missing")
        elif f.stat().st_size != want["bytes"] or file_digest(f) != want["digest"]:
            bad.append(f"{rel} changed ({f.stat().st_size:,} bytes, recorded {want['bytes']:,})")
        elif "rows" in want and _parquet_rows(f) != want["rows"]:
            bad.append(f"{rel} holds {_parquet_rows(f)} rows, recorded {want['rows']}")
    return bad


# ----------------------------------------------------------------------------- resolving


def resolve_path(value: str | None) -> str | None:
    """``pkg:<rel>`` -> the packaged file; other paths -> absolute (``~`` expanded)."""
    if not value:
        return value
    if value.startswith("pkg:"):
        return str(PACKAGE_DIR / value[len("pkg:") :])
    if "://" in value:
        return value
    return str(Path(value).expanduser().resolve())


def resolve_model(value: str | None, models_dir: Path, tokenizer: str = "tiny-bpe") -> str | None:
    """``tiny:student`` / ``tiny:teacher`` -> a built random tiny model folder (built if
    missing); ``pkg:<rel>`` -> a model shipped in the package (the default job's trained
    tiny pair); a local folder -> its absolute path; anything else (a hub name) unchanged."""
    if not value:
        return value
    if value.startswith("pkg:"):
        return resolve_path(value)
    if value in TINY_MODELS:
        role, seed = TINY_MODELS[value]
        path = models_dir / role
        if not (path / "config.json").exists():
            from raydc.models import build_tiny_model

            tmp = models_dir / f".{role}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            build_tiny_model(tmp, role, tokenizer=tokenizer, seed=seed)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        return str(path)
    if value.startswith("tiny:"):
        raise ValueError(f"{value!r}: the built-in models are {sorted(TINY_MODELS)}")
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() or value.startswith((".", "/", "~")) else value


def resolve(cfg: RaydcConfig) -> RaydcConfig:
    """A copy of ``cfg`` with packaged paths, tiny models and the output dir made real."""
    out = Path(cfg.run.output_dir).expanduser().resolve()
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    rep = dataclasses.replace
    return rep(
        cfg,
        run=rep(cfg.run, output_dir=str(out)),
        data=rep(
            cfg.data,
            path=resolve_path(cfg.data.path),
            tokenizer=resolve_model(cfg.data.tokenizer, models),
            teacher_tokenizer=resolve_model(cfg.data.teacher_tokenizer, models),
        ),
        score=rep(
            cfg.score,
            student=resolve_model(cfg.score.student, models),
            teacher=resolve_model(cfg.score.teacher, models),
        ),
        train=rep(cfg.train, student=resolve_model(cfg.train.student, models)),
        eval=rep(cfg.eval, path=resolve_path(cfg.eval.path)),
        generate=rep(
            cfg.generate,
            prompts=resolve_path(cfg.generate.prompts),
            teacher=resolve_model(cfg.generate.teacher, models),
        ),
    )


# ----------------------------------------------------------------------------- fingerprints


def _hash_file(h, path: Path, rel: str) -> None:
    st = path.stat()
    h.update(rel.encode())
    if st.st_size > HASH_CONTENT_LIMIT:
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def path_fingerprint(
    path: str | os.PathLike | None, names: tuple[str, ...] | None = None
) -> str | None:
    """Content hash of a file or folder (recursive; ``names`` limits a folder to those
    file names). A path that does not exist locally (a hub name) hashes its name."""
    if not path:
        return None
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        _hash_file(h, p, p.name)
    elif p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            rel = f.relative_to(p).as_posix()
            if names is not None and f.name not in names:
                continue
            if rel.startswith(".") or "/." in rel or f.name == MARKER:
                continue
            _hash_file(h, f, rel)
    else:
        h.update(f"name:{path}".encode())
    return h.hexdigest()[:16]


def fingerprint(parts: dict) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- stages


@dataclass
class StageResult:
    name: str
    out_dir: Path
    fingerprint: str
    summary: dict
    skipped: bool


def read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class Pipeline:
    """Runs stages against one resolved config; each stage's output lives under
    ``<run.output_dir>/<stage>/`` and is reused while its fingerprint matches."""

    def __init__(
        self, cfg: RaydcConfig, log: Callable[[str], None] | None = None, connect_ray: bool = True
    ):
        from raydc.config import ConfigError

        root = Path(cfg.run.output_dir).expanduser().resolve()
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write_probe_{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"run.output_dir={cfg.run.output_dir!r}: cannot write there "
                f"({e.strerror or e}{': ' + str(e.filename) if e.filename else ''})"
            ) from None
        lock_output_dir(root)  # before anything is written there (the tiny models)
        self.cfg = resolve(cfg)
        self.root = Path(self.cfg.run.output_dir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.results: dict[str, StageResult] = {}
        self._connect = connect_ray

    # -- the generic stage runner

    def run_stage(
        self,
        name: str,
        parts: dict,
        fn: Callable[[Path], dict],
        resumable: bool = False,
        vouch: Callable[[Path, dict], list[Path]] | None = None,
    ) -> StageResult:
        """Run ``fn(out_dir) -> summary`` unless a finished run with the same fingerprint is
        there and its outputs are as it left them. A stale or partial folder is cleared
        first (only if raydc made it), except for ``resumable`` stages (train, tune) whose
        partial folder of the same fingerprint holds checkpoints. ``vouch(out, summary)``
        names the outputs the marker vouches for (default: the whole folder)."""
        fp = fingerprint({"stage": name, **parts})
        out = self.root / name
        # Outside the stage folder: stages refuse to write into a folder they did not make.
        pending = self.root / f".{name}.pending.json"
        marker = read_marker(out)
        if marker and marker.get("fingerprint") == fp:
            bad = changed_outputs(out, marker.get("outputs") or {})
            if not bad:
                res = StageResult(name, out, fp, marker.get("summary", {}), skipped=True)
                self.results[name] = res
                self.log(f"[raydc] {name:<8} done before (fingerprint {fp}), reusing {out}")
                return res
            self.log(
                f"[raydc] {name:<8} outputs changed since it finished ({'; '.join(bad[:3])}"
                f"{'; ...' if len(bad) > 3 else ''}): running it again"
            )
            (out / MARKER).unlink()
            if resumable:  # its checkpoints are still good: resume from them
                pending.write_text(json.dumps({"fingerprint": fp, "started": time.time()}))
        keep = (
            resumable
            and pending.exists()
            and json.loads(pending.read_text()).get("fingerprint") == fp
        )
        if out.exists() and not keep:
            self._clear(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / OWNED).touch()
        pending.write_text(json.dumps({"fingerprint": fp, "started": time.time()}))
        if self._connect:
            connect_ray(self.cfg.run.ray_address)
            route_ray_logs(self.root / RAY_LOG)
        self.log(f"[raydc] {name:<8} running{' (resuming)' if keep else ''} -> {out}")
        t0 = time.time()
        try:
            summary = dict(fn(out) or {})
            summary.setdefault("seconds", round(time.time() - t0, 3))
            outputs = output_record(out, vouch(out, summary) if vouch else None)
        except Exception as e:
            self._log_traceback(name)
            raise StageError(
                f"stage {name!r} failed after {time.time() - t0:.1f}s: {type(e).__name__}: {e}\n"
                f"(partial output in {out}; traceback in {self.root / LOG}; rerun the same "
                f"command to resume here)"
            ) from e
        seconds = time.time() - t0
        record = {
            "stage": name,
            "fingerprint": fp,
            "seconds": round(seconds, 3),
            "finished": time.time(),
            "summary": summary,
            "inputs": parts,
            "outputs": outputs,
        }
        try:  # a full disk here must not leave a half-written marker that says done
            tmp = out / (MARKER + ".tmp")
            tmp.write_text(json.dumps(record, indent=2, default=str))
            tmp.replace(out / MARKER)
            pending.unlink(missing_ok=True)
            with open(self.root / HISTORY, "a") as f:
                f.write(
                    json.dumps(
                        {k: record[k] for k in ("stage", "fingerprint", "seconds", "finished")}
                    )
                    + "\n"
                )
        except OSError as e:
            (out / MARKER).unlink(missing_ok=True)
            raise StageError(
                f"stage {name!r} finished but its marker could not be written to {out}: {e}; "
                f"free space there and rerun"
            ) from e
        res = StageResult(name, out, fp, summary, skipped=False)
        self.results[name] = res
        line = stage_line(name, summary)
        self.log(f"[raydc] {name:<8} {seconds:7.1f} s  {line}")
        return res

    @staticmethod
    def _clear(out: Path) -> None:
        """Remove a stale stage folder, only if raydc made it."""
        if (out / OWNED).exists() or (out / MARKER).exists() or not any(out.iterdir()):
            shutil.rmtree(out)
            return
        raise StageError(
            f"{out} exists and raydc did not make it (no {OWNED} inside): raydc clears a "
            f"stage folder before it reruns the stage, so move your files out of it or set "
            f"another run.output_dir"
        )

    def _log_traceback(self, stage: str) -> None:
        import traceback

        try:
            with open(self.root / LOG, "a") as f:
                f.write(f"--- {time.strftime('%F %T')} stage {stage} failed\n")
                f.write(traceback.format_exc())
        except OSError:
            pass

    # -- the stages

    def _student_fp(self) -> str | None:
        cfg = self.cfg
        return path_fingerprint(cfg.train.student or cfg.score.student)

    def generate(self) -> StageResult:
        """Teacher traces for ``generate.prompts`` at ``generate.temperature``, each with
        the teacher's log-probs at that temperature (``raydc.generate``)."""
        from raydc.config import ConfigError

        cfg = self.cfg
        teacher = cfg.generate.teacher or cfg.score.teacher
        if not cfg.generate.prompts:
            raise ConfigError("generate.prompts: not set; name the prompts to sample traces for")
        if not teacher:
            raise ConfigError(
                "generate.teacher: not set and score.teacher is empty; name the model that "
                "writes the traces"
            )
        parts = {
            "generate": dataclasses.asdict(cfg.generate),
            "prompts": path_fingerprint(cfg.generate.prompts),
            "teacher": path_fingerprint(teacher),
        }

        def fn(out: Path) -> dict:
            from raydc.generate import run_generate

            return run_generate(cfg, teacher, cfg.generate.prompts, out)

        return self.run_stage("generate", parts, fn)

    def prepare(self) -> StageResult:
        cfg = self.cfg
        tok = cfg.data.tokenizer or cfg.score.student
        if cfg.generate.enabled:  # the generated traces replace data.path
            generated = self.results.get("generate") or self.generate()
            traces = str(generated.out_dir / "traces.parquet")
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=traces))
            data_files = generated.fingerprint
        else:
            data_files = path_fingerprint(cfg.data.path)
        parts = {
            "data": dataclasses.asdict(cfg.data),
            "data_files": data_files,
            "tokenizer": path_fingerprint(tok, TOKENIZER_FILES),
        }
        if cfg.data.teacher_tokenizer:
            parts["teacher_tokenizer"] = path_fingerprint(
                cfg.data.teacher_tokenizer, TOKENIZER_FILES
            )

        def fn(out: Path) -> dict:
            from raydc.data.ingest import run_prepare

            return run_prepare(cfg, out)

        return self.run_stage("prepare", parts, fn)

    def score(self) -> StageResult:
        cfg = self.cfg
        prepared = self.results.get("prepare") or self.prepare()
        from raydc.weights import needs_teacher

        # cfg.weights is left out on purpose: weights are computed in the loss from the
        # stored log-probs, so changing them (or a Tune trial) never re-scores; the
        # inspection side table (score.inspection) holds them for reading only.
        parts = {
            "score": dataclasses.asdict(cfg.score),
            "prepare": prepared.fingerprint,
            "student": path_fingerprint(cfg.score.student),
            "teacher": path_fingerprint(cfg.score.teacher),
            "needs_teacher": needs_teacher(cfg.weights),
        }

        def fn(out: Path) -> dict:
            from raydc.scoring.score_stage import run_score

            return run_score(cfg, str(prepared.out_dir), out)

        return self.run_stage("score", parts, fn)

    def select(self) -> StageResult:
        cfg = self.cfg
        scored = self.results.get("score") or self.score()
        parts = {"select": dataclasses.asdict(cfg.select), "score": scored.fingerprint}

        def fn(out: Path) -> dict:
            from raydc.scoring.select_stage import run_select

            return run_select(cfg, str(scored.out_dir), out)

        return self.run_stage("select", parts, fn)

    def training_data(self) -> StageResult:
        """The scored rows training reads: selected ones when selection is on."""
        if self.cfg.select.enabled:
            return self.results.get("select") or self.select()
        return self.results.get("score") or self.score()

    def train(self) -> StageResult:
        cfg = self.cfg
        data = self.training_data()
        parts = {
            "train": dataclasses.asdict(cfg.train),
            "weights": cfg.weights.to_dict(),
            "data": data.fingerprint,
            "student": self._student_fp(),
            "seed": cfg.run.seed,
        }

        def fn(out: Path) -> dict:
            from raydc.train import run_train

            return run_train(cfg, str(data.out_dir), out)

        return self.run_stage("train", parts, fn, resumable=True, vouch=_model_outputs)

    def tune(self) -> StageResult:
        from raydc.tune import check_space

        cfg = self.cfg
        check_space(cfg)  # before scoring: a bad space should not cost a scoring run
        data = self.training_data()
        parts = {
            "tune": dataclasses.asdict(cfg.tune),
            "train": dataclasses.asdict(cfg.train),
            "weights": cfg.weights.to_dict(),
            "data": data.fingerprint,
            "student": self._student_fp(),
            "seed": cfg.run.seed,
        }
        if cfg.tune.metric != "val_nll":  # the trials run eval
            parts["eval"] = dataclasses.asdict(cfg.eval)
            parts["eval_data"] = path_fingerprint(cfg.eval.path)
            parts["teacher"] = path_fingerprint(cfg.score.teacher)

        def fn(out: Path) -> dict:
            from raydc.tune import run_tune

            return run_tune(cfg, str(data.out_dir), out)

        return self.run_stage("tune", parts, fn, resumable=True, vouch=_model_outputs)

    def model_stage(self) -> StageResult:
        """Train, or tune when ``tune.enabled``: the stage that produces the model."""
        if self.cfg.tune.enabled:
            return self.results.get("tune") or self.tune()
        return self.results.get("train") or self.train()

    def eval(self) -> StageResult:
        cfg = self.cfg
        upstream = self.model_stage()
        model_dir = upstream.summary.get("model_dir")
        if not model_dir:
            raise StageError(f"stage {upstream.name!r} reported no model_dir to evaluate")
        parts = {
            "eval": dataclasses.asdict(cfg.eval),
            "model": upstream.fingerprint,
            "eval_data": path_fingerprint(cfg.eval.path),
            "teacher": path_fingerprint(cfg.score.teacher),
        }

        initial = None
        if cfg.eval.baseline:
            from raydc.train.trainer import student_path  # the model training starts from

            initial = student_path(cfg)

        def fn(out: Path) -> dict:
            from raydc.eval import run_eval_stage

            return run_eval_stage(cfg, model_dir, out, initial)

        return self.run_stage("eval", parts, fn)

    # -- checks before the first stage

    def check(self, stages: tuple[str, ...] = ("prepare", "score", "select", "model", "eval")):
        """What can fail late, checked before any stage runs: input files, model folders
        (a missing folder would otherwise read as a bad hub repo id a minute in), a
        teacher whose vocabulary is smaller than its tokenizer, the Tune space and the
        eval prompts. Raises ConfigError naming the field."""
        from raydc.config import ConfigError
        from raydc.weights import needs_teacher

        cfg = self.cfg
        generating = "generate" in stages or ("prepare" in stages and cfg.generate.enabled)
        if generating:
            _check_input("generate.prompts", cfg.generate.prompts)
            if cfg.generate.teacher:
                _check_model("generate.teacher", cfg.generate.teacher)
            elif cfg.score.teacher:
                _check_model("score.teacher", cfg.score.teacher)
            if stages == ("generate",):
                return
        elif "prepare" in stages:
            _check_input("data.path", cfg.data.path)
        models = [("score.student", cfg.score.student)]
        if cfg.score.teacher and needs_teacher(cfg.weights):
            models.append(("score.teacher", cfg.score.teacher))
        if "model" in stages and cfg.train.student:
            models.append(("train.student", cfg.train.student))
        if cfg.data.tokenizer:
            models.append(("data.tokenizer", cfg.data.tokenizer))
        if cfg.data.teacher_tokenizer and "prepare" in stages:
            models.append(("data.teacher_tokenizer", cfg.data.teacher_tokenizer))
        for field, value in models:
            _check_model(field, value, tokenizer_only=field.startswith("data."))
        if cfg.score.teacher and Path(cfg.score.teacher).is_dir() and "score" in stages:
            _check_vocab("score.teacher", cfg.score.teacher)
        if "model" in stages and cfg.tune.enabled:
            from raydc.tune import check_space

            check_space(cfg)
        if ("eval" in stages and cfg.eval.enabled) or (
            "model" in stages and cfg.tune.enabled and cfg.tune.metric != "val_nll"
        ):
            if not cfg.eval.path:
                raise ConfigError("eval.path: not set; name the held-out prompts to evaluate on")
            _check_input("eval.path", cfg.eval.path)

    def run_all(self) -> dict[str, StageResult]:
        """The whole job: [generate] -> prepare -> score -> [select] -> train or tune ->
        [eval]."""
        self.check()
        if self.cfg.generate.enabled:
            self.generate()
        self.prepare()
        self.score()
        if self.cfg.select.enabled:
            self.select()
        self.model_stage()
        if self.cfg.eval.enabled:
            self.eval()
        return self.results

    def run_until(self, stage: str) -> StageResult:
        """Run ``stage`` and whatever it needs that is not done yet (``raydc <stage>``)."""
        if stage == "select" and not self.cfg.select.enabled:
            raise StageError("select: select.enabled is false; set select.enabled=true")
        upstream = {
            "generate": ("generate",),
            "prepare": ("prepare",),
            "score": ("prepare", "score"),
            "select": ("prepare", "score", "select"),
            "train": ("prepare", "score", "select", "model"),
            "tune": ("prepare", "score", "select", "model"),
            "eval": ("prepare", "score", "select", "model", "eval"),
        }[stage]
        self.check(upstream)
        return getattr(self, stage)()


def _check_input(field: str, value: str | None) -> None:
    from raydc.config import ConfigError

    if value and "://" not in value and not Path(value).exists():
        raise ConfigError(f"{field}={value!r}: no such file or folder")


def _check_model(field: str, value: str | None, tokenizer_only: bool = False) -> None:
    """A model (or tokenizer) named by a config field must be a local folder holding it,
    or a hub name that can be reached (or is cached when the hub is offline)."""
    from raydc.config import ConfigError
    from raydc.models import TOKENIZERS

    if not value or (tokenizer_only and value in TOKENIZERS):
        return
    p = Path(value).expanduser()
    need = "tokenizer_config.json" if tokenizer_only else "config.json"
    if p.exists() or value.startswith((".", "/", "~")):
        if not p.is_dir():
            raise ConfigError(f"{field}={value!r}: no such model folder")
        if not (p / need).is_file() and not (p / "config.json").is_file():
            raise ConfigError(f"{field}={value!r}: not a model folder (no {need} inside)")
        return
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(value, need), str):
            raise ConfigError(
                f"{field}={value!r}: not a local folder, and the hub is offline "
                f"(HF_HUB_OFFLINE=1) with no cached copy; give the model's folder"
            )


def _check_vocab(field: str, path: str) -> None:
    """vLLM fails on a model whose embedding is smaller than its tokenizer's ids, late and
    with the cause only in a worker log."""
    from raydc.config import ConfigError
    from raydc.models import load_tokenizer

    try:
        vocab = json.loads((Path(path) / "config.json").read_text()).get("vocab_size")
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{field}={path!r}: unreadable config.json ({e})") from None
    if not isinstance(vocab, int):
        return
    n = len(load_tokenizer(path))
    if n > vocab:
        raise ConfigError(
            f"{field}={path!r}: its tokenizer has {n:,} tokens but the model's vocab_size is "
            f"{vocab:,}; token ids >= {vocab:,} cannot be scored (is this the right tokenizer?)"
        )


def _model_outputs(out: Path, summary: dict) -> list[Path]:
    """What train and tune vouch for: the exported model (eval and users read it), not the
    checkpoints, which a user may prune once the run is done."""
    model = summary.get("model_dir")
    return [Path(model)] if model and Path(model).exists() else []
