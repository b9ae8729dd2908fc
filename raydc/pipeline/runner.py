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
    LinkRefused,
    StageError,
    StageResult,
    append_history,
    append_private,
    changed_outputs,
    fingerprint_parts,
    lock_output_dir,
    output_record,
    read_marker,
    release_output_dir,
    write_marker,
    write_private,
)
from raydc.infra.runtime import RAY_LOG, connect_ray, route_ray_logs
from raydc.pipeline.resolve import PACKAGE_DIR, check_inputs, resolve, writable_output_dir
from raydc.pipeline.summary import stage_line
from raydc.pipeline.table import MODEL_STAGES, STAGES, stage_named

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
        """Give up the output folder's lock (a DASD phase, done)."""
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
            and pending.is_file()
            and not pending.is_symlink()
            and json.loads(pending.read_text()).get("fingerprint") == fp
        )
        if out.exists() and not keep:
            self._clear(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / OWNED).touch()
        write_private(pending, json.dumps({"fingerprint": fp, "started": time.time()}))
        if self._connect:  # routed first: what Ray says as it starts goes to the file too
            route_ray_logs(self.root / RAY_LOG, stage=name)
            connect_ray(self.cfg.run.ray_address)
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
                f"(partial output in {out}; traceback in {self.root / LOG}; Ray's and vLLM's "
                f"logs in {self.root / RAY_LOG}; rerun the same command to resume here)"
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
        except LinkRefused:
            (out / MARKER).unlink(missing_ok=True)
            raise
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
            write_private(pending, json.dumps({"fingerprint": fp, "started": time.time()}))
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
            text = f"--- {time.strftime('%F %T')} stage {stage} failed\n{traceback.format_exc()}"
            append_private(self.root / LOG, text)
        except OSError:
            pass

    # -- the stages (raydc.pipeline.table)

    def run(self, name: str) -> StageResult:
        """Stage ``name``, after the stages it needs (each run or reused once)."""
        if name in self.results:
            return self.results[name]
        if self.cfg.phases and name in MODEL_STAGES:
            return self._phases()
        stage = stage_named(name)
        up = {need: self.run(need) for need in stage.needs(self.cfg)}
        parts = stage.reads(self.cfg, up)
        return self.run_stage(
            name, parts, lambda out: stage.run(self.cfg, up, out), stage.resumes, stage.vouch
        )

    def model_stage(self) -> StageResult:
        """The stage that produces the job's model: train, or tune when ``tune.enabled``,
        or the last phase of a run with DASD phases."""
        return self.run("tune" if self.cfg.tune.enabled else "train")

    def _phases(self) -> StageResult:
        """Each DASD phase a job of its own under ``phases/<name>/``, from the previous
        phase's model (``raydc.pipeline.phases``); the last one's model stage."""
        from raydc.pipeline.phases import run_phases

        model = "tune" if self.cfg.tune.enabled else "train"
        phases = run_phases(Pipeline, self.cfg, self.root, self.log, self._connect)
        for spec, results in zip(self.cfg.phases, phases):
            for stage, res in results.items():
                self.results[f"phases/{spec.name}/{stage}"] = res
            self.results[f"phases/{spec.name}"] = results[model]  # the phase's model
        self.results[model] = phases[-1][model]
        return self.results[model]

    def phase_pipeline(self, name: str) -> Pipeline:
        """Phase ``name`` as a Pipeline of its own, the phases before it run (or reused)
        first: ``raydc tune --phase NAME`` searches that phase's weighting."""
        from raydc.pipeline.phases import run_phases

        if not self.cfg.phases:
            raise StageError(f"--phase {name!r}: this config has no phases")
        return run_phases(Pipeline, self.cfg, self.root, self.log, self._connect, until=name)

    # -- running them

    def run_all(self) -> dict[str, StageResult]:
        """The whole job: every enabled stage in table order ([generate | mixed_policy] ->
        prepare -> score -> [select] -> train or tune -> [eval]); with DASD phases, each
        phase so (each checks its own inputs), then [eval]. Inputs are checked before the
        first stage runs."""
        if self.cfg.phases:
            names = ["on_policy"] if self.cfg.on_policy.enabled else []
            names += ["eval"] if self.cfg.eval.enabled else []
            self._check(names, phases=True)
            self.model_stage()
        else:
            names = [s.name for s in STAGES if s.enabled(self.cfg)]
            self._check(names)
        for name in names:
            self.run(name)
        return self.results

    def run_until(self, name: str) -> StageResult:
        """Run stage ``name`` and whatever it needs that is not done yet (``raydc <stage>``)."""
        stage_named(name)  # an unknown name fails here, naming the stages
        if self.cfg.phases and name not in ("eval", "on_policy"):
            if name in MODEL_STAGES:
                return self.model_stage()
            raise StageError(
                f"{name}: this config has DASD phases; name the phase (--phase NAME) or run the job"
            )
        self._check([name], phases=bool(self.cfg.phases))
        return self.run(name)

    def _check(self, names: list[str], phases: bool = False) -> None:
        """The input checks of ``names`` and the stages they need; with phases, of ``names``
        alone (the phases check their own stages)."""
        if phases:
            for name in names:
                stage_named(name).check(self.cfg)
        else:
            check_inputs(self.cfg, names)
