"""Stage orchestration: prepare -> score -> [select] -> train | tune -> eval, resumable.

Each stage writes under ``<run.output_dir>/<stage>/`` and, when it finishes, a small marker
(``_raydc_stage.json``) holding a fingerprint of everything it read: its config sections,
the fingerprints of the stages upstream, and hashes of its input files and models. A rerun
skips a stage whose marker matches and reruns one whose inputs changed, so a failed job
resumes at the stage that failed (training and Tune also resume from their own checkpoints
there). Every stage that actually runs appends a line to ``<output_dir>/stages.jsonl``:
that is how a test counts that a Tune sweep scored the data once.

The marker also vouches for the stage's outputs: each file's size, digest and, for
Parquet, its row count (``outputs``). A reused stage checks them first; a deleted, truncated
or rewritten output reruns the stage that made it. One job at a time owns an output folder
(``.raydc.lock``, an advisory lock the OS drops when the process dies), and a stage folder
is cleared only if raydc made it (``.raydc_stage_dir`` inside). The folder contract (marker,
outputs, lock, hashing rule) is ``raydc.infra.artifacts``; docs/failure-modes.md says what each
fault does.

``raydc.pipeline.resolve`` turns the config's packaged paths and tiny models into real paths and
checks the inputs before any stage runs. The stage functions themselves live in their own
modules (docs/contracts.md); this module only decides what runs and reports it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from raydc.config import RaydcConfig
from raydc.infra.artifacts import (
    MARKER,
    OWNED,  # in every stage folder raydc creates: it may clear it
    StageError,
    StageResult,
    append_history,
    changed_outputs,
    fingerprint_parts,
    fingerprint_paths,
    lock_output_dir,
    output_record,
    read_marker,
    release_output_dir,
    tokenizer_fingerprint,
    write_marker,
)
from raydc.infra.runtime import RAY_LOG, connect_ray, route_ray_logs
from raydc.pipeline.resolve import PACKAGE_DIR, check_inputs, resolve, writable_output_dir
from raydc.pipeline.summary import stage_line

CONFIG_DIR = PACKAGE_DIR / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
LOG = "raydc.log"  # tracebacks of failed stages


class Pipeline:
    """Runs stages against one resolved config; each stage's output lives under
    ``<run.output_dir>/<stage>/`` and is reused while its fingerprint matches."""

    def __init__(
        self, cfg: RaydcConfig, log: Callable[[str], None] | None = None, connect_ray: bool = True
    ):
        lock_output_dir(writable_output_dir(cfg))  # before anything is written (tiny models)
        self.cfg = resolve(cfg)
        self.root = Path(self.cfg.run.output_dir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.results: dict[str, StageResult] = {}
        self._connect = connect_ray

    def close(self) -> None:
        """Give up the output folder's lock (a staged run's stage, done)."""
        release_output_dir(self.root)

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
        fp = fingerprint_parts({"stage": name, **parts})
        out = self.root / name
        reused = self._reuse(name, fp, out, resumable)
        if reused is not None:
            return reused
        # Outside the stage folder: stages refuse to write into a folder they did not make.
        pending = self.root / f".{name}.pending.json"
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
        try:  # a full disk here must not leave a marker that says done
            write_marker(out, record)
            pending.unlink(missing_ok=True)
            append_history(self.root, record)
        except OSError as e:
            (out / MARKER).unlink(missing_ok=True)
            raise StageError(
                f"stage {name!r} finished but its marker could not be written to {out}: {e}; "
                f"free space there and rerun"
            ) from e
        res = self.results[name] = StageResult(name, out, fp, summary, skipped=False)
        self.log(f"[raydc] {name:<8} {seconds:7.1f} s  {stage_line(name, summary)}")
        return res

    def _reuse(self, name: str, fp: str, out: Path, resumable: bool) -> StageResult | None:
        """The finished stage when its marker matches ``fp`` and its outputs are as it left
        them; otherwise None, with a marker whose outputs changed removed (a resumable
        stage keeps its checkpoints and resumes from them)."""
        marker = read_marker(out)
        if not marker or marker.get("fingerprint") != fp:
            return None
        bad = changed_outputs(out, marker.get("outputs") or {})
        if not bad:
            res = self.results[name] = StageResult(
                name, out, fp, marker.get("summary", {}), skipped=True
            )
            self.log(f"[raydc] {name:<8} done before (fingerprint {fp}), reusing {out}")
            return res
        self.log(
            f"[raydc] {name:<8} outputs changed since it finished ({'; '.join(bad[:3])}"
            f"{'; ...' if len(bad) > 3 else ''}): running it again"
        )
        (out / MARKER).unlink()
        if resumable:  # its checkpoints are still good: resume from them
            pending = self.root / f".{name}.pending.json"
            pending.write_text(json.dumps({"fingerprint": fp, "started": time.time()}))
        return None

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
            "prompts": fingerprint_paths(cfg.generate.prompts),
            "teacher": fingerprint_paths(teacher),
        }

        def fn(out: Path) -> dict:
            from raydc.generate import run_generate

            return run_generate(cfg, teacher, cfg.generate.prompts, out)

        return self.run_stage("generate", parts, fn)

    def mixed_policy(self) -> StageResult:
        """Mixed-policy traces: the student starts each response, the teacher finishes it
        (``raydc.mixed_policy``)."""
        from raydc.config import ConfigError

        cfg, mcfg = self.cfg, self.cfg.mixed_policy
        traces = mcfg.traces or cfg.data.path
        student = mcfg.student or cfg.train.student or cfg.score.student
        teacher = mcfg.teacher or cfg.generate.teacher or cfg.score.teacher
        if not teacher:
            raise ConfigError(
                "mixed_policy.teacher: not set, nor generate.teacher or score.teacher; name "
                "the model that continues the student's prefixes"
            )
        parts = {
            "mixed_policy": dataclasses.asdict(mcfg),
            "data_keys": dataclasses.asdict(cfg.data),
            "traces": fingerprint_paths(traces),
            "student": fingerprint_paths(student),
            "teacher": fingerprint_paths(teacher),
        }

        def fn(out: Path) -> dict:
            from raydc.mixed_policy import run_mixed_policy

            return run_mixed_policy(cfg, student, teacher, traces, out)

        return self.run_stage("mixed_policy", parts, fn)

    def _traces(self) -> tuple[str, str]:
        """Where prepare reads its traces, and their fingerprint: the mixed-policy or the
        generated traces when those stages are on, else ``data.path``."""
        for name, enabled in (
            ("mixed_policy", self.cfg.mixed_policy.enabled),
            ("generate", self.cfg.generate.enabled),
        ):
            if enabled:
                made = self.results.get(name) or getattr(self, name)()
                return str(made.out_dir / "traces.parquet"), made.fingerprint
        return self.cfg.data.path, fingerprint_paths(self.cfg.data.path)

    def prepare(self) -> StageResult:
        cfg = self.cfg
        tok = cfg.data.tokenizer or cfg.score.student
        traces, data_files = self._traces()
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=traces))
        parts = {
            "data": dataclasses.asdict(cfg.data),
            "data_files": data_files,
            "tokenizer": tokenizer_fingerprint(tok),
        }
        if cfg.data.teacher_tokenizer:
            parts["teacher_tokenizer"] = tokenizer_fingerprint(cfg.data.teacher_tokenizer)
        if cfg.data.teacher_logprobs_path:
            parts["teacher_logprobs"] = fingerprint_paths(cfg.data.teacher_logprobs_path)

        def fn(out: Path) -> dict:
            from raydc.prepare.stage import run_prepare

            return run_prepare(cfg, out)

        return self.run_stage("prepare", parts, fn)

    def score(self) -> StageResult:
        cfg = self.cfg
        prepared = self.results.get("prepare") or self.prepare()
        from raydc.method.weights import needs_teacher

        # cfg.weights is left out on purpose: weights are computed in the loss from the
        # stored log-probs, so changing them (or a Tune trial) never re-scores; the
        # inspection side table (score.inspection) holds them for reading only.
        parts = {
            "score": dataclasses.asdict(cfg.score),
            "prepare": prepared.fingerprint,
            "student": fingerprint_paths(cfg.score.student),
            "teacher": fingerprint_paths(cfg.score.teacher),
            "needs_teacher": needs_teacher(cfg.weights),
        }

        def fn(out: Path) -> dict:
            from raydc.score.stage import run_score

            return run_score(cfg, str(prepared.out_dir), out)

        return self.run_stage("score", parts, fn)

    def select(self) -> StageResult:
        cfg = self.cfg
        scored = self.results.get("score") or self.score()
        parts = {"select": dataclasses.asdict(cfg.select), "score": scored.fingerprint}

        def fn(out: Path) -> dict:
            from raydc.select import run_select

            return run_select(cfg, str(scored.out_dir), out)

        return self.run_stage("select", parts, fn)

    def training_data(self) -> StageResult:
        """The scored rows training reads: selected ones when selection is on."""
        if self.cfg.select.enabled:
            return self.results.get("select") or self.select()
        return self.results.get("score") or self.score()

    def _training_parts(self, data: StageResult) -> dict:
        """What train and tune both read: the training config and weights, the data, the
        student they start from and the seed."""
        cfg = self.cfg
        return {
            "train": dataclasses.asdict(cfg.train),
            "weights": cfg.weights.to_dict(),
            "data": data.fingerprint,
            "student": fingerprint_paths(cfg.train.student or cfg.score.student),
            "seed": cfg.run.seed,
        }

    def train(self) -> StageResult:
        cfg = self.cfg
        data = self.training_data()
        parts = self._training_parts(data)

        def fn(out: Path) -> dict:
            from raydc.train import run_train

            return run_train(cfg, str(data.out_dir), out)

        return self.run_stage("train", parts, fn, resumable=True, vouch=_model_outputs)

    def tune(self) -> StageResult:
        from raydc.tune import check_space

        cfg = self.cfg
        check_space(cfg)  # before scoring: a bad space should not cost a scoring run
        data = self.training_data()
        parts = {"tune": dataclasses.asdict(cfg.tune), **self._training_parts(data)}
        if cfg.tune.metric != "val_nll":  # the trials run eval
            parts["eval"] = dataclasses.asdict(cfg.eval)
            parts["eval_data"] = fingerprint_paths(cfg.eval.path)
            parts["teacher"] = fingerprint_paths(cfg.score.teacher)

        def fn(out: Path) -> dict:
            from raydc.tune import run_tune

            return run_tune(cfg, str(data.out_dir), out)

        return self.run_stage("tune", parts, fn, resumable=True, vouch=_model_outputs)

    def stages(self) -> StageResult:
        """A staged run (``raydc.pipeline.phases``): each stage a job of its own under
        ``stages/<name>/``, from the previous stage's model; returns the last one's."""
        from raydc.pipeline.phases import run_stages

        results = run_stages(Pipeline, self.cfg, self.root, self.log, self._connect)
        for spec, res in zip(self.cfg.stages, results):
            self.results[f"stages/{spec.name}"] = res
        self.results["stages"] = results[-1]
        return results[-1]

    def stage_pipeline(self, name: str) -> Pipeline:
        """Stage ``name`` of a staged run as a Pipeline of its own, the stages before it
        run (or reused) first: ``raydc tune --stage NAME`` searches that stage's weighting."""
        from raydc.pipeline.phases import run_stages

        if not self.cfg.stages:
            raise StageError(f"--stage {name!r}: this config has no stages")
        return run_stages(Pipeline, self.cfg, self.root, self.log, self._connect, until=name)

    def model_stage(self) -> StageResult:
        """Train, or tune when ``tune.enabled``, or the last stage of a staged run: the
        stage that produces the model."""
        if self.cfg.stages:
            return self.results.get("stages") or self.stages()
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
            "eval_data": fingerprint_paths(cfg.eval.path),
            "teacher": fingerprint_paths(cfg.score.teacher),
        }

        initial = None
        if cfg.eval.baseline:
            from raydc.train.trainer import student_path  # the model training starts from

            initial = student_path(cfg)

        def fn(out: Path) -> dict:
            from raydc.eval import run_eval_stage

            return run_eval_stage(cfg, model_dir, out, initial)

        return self.run_stage("eval", parts, fn)

    # -- running them

    def run_all(self) -> dict[str, StageResult]:
        """The whole job: [generate | mixed_policy] -> prepare -> score -> [select] -> train
        or tune -> [eval]; or each of ``stages`` so, then [eval]."""
        if self.cfg.stages:  # each stage checks its own inputs
            check_inputs(self.cfg, ("eval",))
            self.stages()
            if self.cfg.eval.enabled:
                self.eval()
            return self.results
        check_inputs(self.cfg, ("prepare", "score", "select", "model", "eval"))
        if self.cfg.generate.enabled:
            self.generate()
        if self.cfg.mixed_policy.enabled:
            self.mixed_policy()
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
        if self.cfg.stages and stage != "eval":
            if stage in ("train", "tune"):
                return self.model_stage()
            raise StageError(
                f"{stage}: this is a staged run; name the stage (--stage NAME) or run the job"
            )
        if stage == "select" and not self.cfg.select.enabled:
            raise StageError("select: select.enabled is false; set select.enabled=true")
        upstream = {
            "generate": ("generate",),
            "mixed_policy": ("prepare",),
            "prepare": ("prepare",),
            "score": ("prepare", "score"),
            "select": ("prepare", "score", "select"),
            "train": ("prepare", "score", "select", "model"),
            "tune": ("prepare", "score", "select", "model"),
            "eval": ("prepare", "score", "select", "model", "eval"),
        }[stage]
        check_inputs(self.cfg, upstream)
        return getattr(self, stage)()


def _model_outputs(out: Path, summary: dict) -> list[Path]:
    """What train and tune vouch for: the exported model (eval and users read it), not the
    checkpoints, which a user may prune once the run is done."""
    model = summary.get("model_dir")
    return [Path(model)] if model and Path(model).exists() else []
