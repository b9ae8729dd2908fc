"""Stage orchestration: prepare -> score -> [select] -> train | tune -> eval, resumable.

Each stage writes under ``<run.output_dir>/<stage>/`` and, when it finishes, a small marker
(``_raydc_stage.json``) holding a fingerprint of everything it read: its config sections,
the fingerprints of the stages upstream, and hashes of its input files and models. A rerun
skips a stage whose marker matches and reruns one whose inputs changed, so a failed job
resumes at the stage that failed (training and Tune also resume from their own checkpoints
there). Every stage that actually runs appends a line to ``<output_dir>/stages.jsonl``:
that is how a test counts that a Tune sweep scored the data once.

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

from raydc.config import RaydcConfig

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
MARKER = "_raydc_stage.json"
HISTORY = "stages.jsonl"
# role -> (size role in raydc.models.TINY_SIZES, seed). The teacher is larger than the
# student and shares its tokenizer.
TINY_MODELS = {"tiny:student": ("student", 0), "tiny:teacher": ("teacher", 1)}
# Files above this size are fingerprinted by (name, size, mtime) instead of content: a
# 15 GB checkpoint must not be re-read on every rerun.
HASH_CONTENT_LIMIT = 64 << 20
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.txt",
)


EVAL_HEADLINE = (
    "pass@1",
    "pass@1_stderr",
    "prompts",
    "n_samples",
    "mean_response_tokens",
    "no_answer_share",
    "truncated_share",
    "tokens_per_second",
)


class StageError(RuntimeError):
    """A stage failed; the message names the stage and where its partial output is."""


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
    """``tiny:student`` / ``tiny:teacher`` -> a built tiny model folder (built if missing);
    a local folder -> its absolute path; anything else (a hub name) unchanged."""
    if not value:
        return value
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
        ),
        score=rep(
            cfg.score,
            student=resolve_model(cfg.score.student, models),
            teacher=resolve_model(cfg.score.teacher, models),
        ),
        train=rep(cfg.train, student=resolve_model(cfg.train.student, models)),
        eval=rep(cfg.eval, path=resolve_path(cfg.eval.path)),
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


def _fmt_int(x) -> str:
    return f"{int(x):,}" if isinstance(x, (int, float)) else "?"


def _rate(summary: dict, key: str = "tokens") -> float | None:
    if isinstance(summary.get("tokens_per_s"), (int, float)):
        return float(summary["tokens_per_s"])
    tokens = summary.get(key) or (summary.get("counts") or {}).get(key)
    secs = summary.get("seconds")
    if isinstance(tokens, (int, float)) and isinstance(secs, (int, float)) and secs > 0:
        return tokens / secs
    return None


def stage_line(name: str, summary: dict) -> str:
    """The one-line report of a stage: counts, throughput, headline metric."""
    bits = []
    if "rows_in" in summary and "rows_out" in summary:
        rej = summary.get("rows_rejected", 0)
        bits.append(
            f"rows {_fmt_int(summary['rows_in'])} -> {_fmt_int(summary['rows_out'])}"
            + (f" ({_fmt_int(rej)} rejected)" if rej else "")
        )
    if name == "score":
        r = _rate(summary)
        if r:
            bits.append(f"{r:,.0f} tokens/s")
    if name in ("train", "tune"):
        m = summary.get("metrics") or {}
        if "steps" in summary or "step" in m:
            bits.append(f"{summary.get('steps', m.get('step'))} steps")
        for k in ("loss", "val_nll", "tokens_per_s"):
            if isinstance(m.get(k), (int, float)):
                bits.append(f"{k} {m[k]:,.4g}")
        if name == "tune" and "num_trials" in summary:
            bits.append(
                f"{summary['num_trials']} trials, best {summary.get('metric')}="
                f"{summary.get('best_metric')}"
            )
    if name == "eval":
        for k in EVAL_HEADLINE[:2]:
            v = summary.get(k)
            if isinstance(v, (int, float)):
                bits.append(f"{k} {v:.4g}")
        if "prompts" in summary:
            bits.append(f"{summary['prompts']} prompts")
    return ", ".join(bits)


class Pipeline:
    """Runs stages against one resolved config; each stage's output lives under
    ``<run.output_dir>/<stage>/`` and is reused while its fingerprint matches."""

    def __init__(
        self, cfg: RaydcConfig, log: Callable[[str], None] | None = None, connect_ray: bool = True
    ):
        self.cfg = resolve(cfg)
        self.root = Path(self.cfg.run.output_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.results: dict[str, StageResult] = {}
        self._connect = connect_ray

    # -- the generic stage runner

    def run_stage(
        self, name: str, parts: dict, fn: Callable[[Path], dict], resumable: bool = False
    ) -> StageResult:
        """Run ``fn(out_dir) -> summary`` unless a finished run with the same fingerprint is
        there. A stale or partial folder is cleared first, except for ``resumable`` stages
        (train, tune) whose partial folder of the same fingerprint holds checkpoints."""
        fp = fingerprint({"stage": name, **parts})
        out = self.root / name
        marker = read_marker(out)
        if marker and marker.get("fingerprint") == fp:
            res = StageResult(name, out, fp, marker.get("summary", {}), skipped=True)
            self.results[name] = res
            self.log(f"[raydc] {name:<8} done before (fingerprint {fp}), reusing {out}")
            return res
        # Outside the stage folder: stages refuse to write into a folder they did not make.
        pending = self.root / f".{name}.pending.json"
        keep = (
            resumable
            and pending.exists()
            and json.loads(pending.read_text()).get("fingerprint") == fp
        )
        if out.exists() and not keep:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        pending.write_text(json.dumps({"fingerprint": fp, "started": time.time()}))
        if self._connect:
            connect(self.cfg)
        self.log(f"[raydc] {name:<8} running{' (resuming)' if keep else ''} -> {out}")
        t0 = time.time()
        try:
            summary = fn(out)
        except Exception as e:
            raise StageError(
                f"stage {name!r} failed after {time.time() - t0:.1f}s: {type(e).__name__}: {e}\n"
                f"(partial output in {out}; rerun the same command to resume here)"
            ) from e
        seconds = time.time() - t0
        summary = dict(summary or {})
        summary.setdefault("seconds", round(seconds, 3))
        record = {
            "stage": name,
            "fingerprint": fp,
            "seconds": round(seconds, 3),
            "finished": time.time(),
            "summary": summary,
            "inputs": parts,
        }
        tmp = out / (MARKER + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        tmp.replace(out / MARKER)
        pending.unlink(missing_ok=True)
        with open(self.root / HISTORY, "a") as f:
            f.write(
                json.dumps({k: record[k] for k in ("stage", "fingerprint", "seconds", "finished")})
                + "\n"
            )
        res = StageResult(name, out, fp, summary, skipped=False)
        self.results[name] = res
        line = stage_line(name, summary)
        self.log(f"[raydc] {name:<8} {seconds:7.1f} s  {line}")
        return res

    # -- the stages

    def _student_fp(self) -> str | None:
        cfg = self.cfg
        return path_fingerprint(cfg.train.student or cfg.score.student)

    def prepare(self) -> StageResult:
        cfg = self.cfg
        tok = cfg.data.tokenizer or cfg.score.student
        parts = {
            "data": dataclasses.asdict(cfg.data),
            "data_files": path_fingerprint(cfg.data.path),
            "tokenizer": path_fingerprint(tok, TOKENIZER_FILES),
        }

        def fn(out: Path) -> dict:
            from raydc.data.ingest import run_prepare

            return run_prepare(cfg, out)

        return self.run_stage("prepare", parts, fn)

    def score(self) -> StageResult:
        cfg = self.cfg
        prepared = self.results.get("prepare") or self.prepare()
        from raydc.weights import needs_teacher

        # cfg.weights is left out on purpose: weights are computed again in the loss, so
        # changing them (or a Tune trial) never re-scores; the `weights` column of the
        # scored rows is for inspection and the manifest records the config it used.
        parts = {
            "score": dataclasses.asdict(cfg.score),
            "prepare": prepared.fingerprint,
            "student": path_fingerprint(cfg.score.student),
            "teacher": path_fingerprint(cfg.score.teacher),
            "needs_teacher": needs_teacher(cfg.weights),
        }

        def fn(out: Path) -> dict:
            from raydc.scoring.stage import run_score

            return run_score(cfg, str(prepared.out_dir), out)

        return self.run_stage("score", parts, fn)

    def select(self) -> StageResult:
        cfg = self.cfg
        scored = self.results.get("score") or self.score()
        parts = {"select": dataclasses.asdict(cfg.select), "score": scored.fingerprint}

        def fn(out: Path) -> dict:
            from raydc.scoring.stage import run_select

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

        return self.run_stage("train", parts, fn, resumable=True)

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

        return self.run_stage("tune", parts, fn, resumable=True)

    def model(self) -> StageResult:
        """Train, or tune when ``tune.enabled``: the stage that produces the model."""
        if self.cfg.tune.enabled:
            return self.results.get("tune") or self.tune()
        return self.results.get("train") or self.train()

    def eval(self) -> StageResult:
        cfg = self.cfg
        upstream = self.model()
        model_dir = upstream.summary.get("model_dir")
        if not model_dir:
            raise StageError(f"stage {upstream.name!r} reported no model_dir to evaluate")
        parts = {
            "eval": dataclasses.asdict(cfg.eval),
            "model": upstream.fingerprint,
            "eval_data": path_fingerprint(cfg.eval.path),
            "teacher": path_fingerprint(cfg.score.teacher),
        }

        def fn(out: Path) -> dict:
            from raydc.eval import run_eval

            return run_eval(cfg, model_dir, out)

        return self.run_stage("eval", parts, fn)

    def run_all(self) -> dict[str, StageResult]:
        """The whole job: prepare -> score -> [select] -> train or tune -> [eval]."""
        self.prepare()
        self.score()
        if self.cfg.select.enabled:
            self.select()
        self.model()
        if self.cfg.eval.enabled:
            self.eval()
        return self.results

    def run_until(self, stage: str) -> StageResult:
        """Run ``stage`` and whatever it needs that is not done yet (``raydc <stage>``)."""
        if stage == "select" and not self.cfg.select.enabled:
            raise StageError("select: select.enabled is false; set select.enabled=true")
        return getattr(self, stage)()


# ----------------------------------------------------------------------------- Ray


RUNTIME_ENV_VARS = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "HF_HUB_DISABLE_TELEMETRY",
    "VLLM_NO_USAGE_STATS",
    "TOKENIZERS_PARALLELISM",
    "DS_ACCELERATOR",
)


def connect(cfg: RaydcConfig) -> None:
    """Join ``run.ray_address`` (or RAY_ADDRESS, as inside ``ray job submit``), else start a
    local Ray. Idempotent. Offline/hub settings of this process travel to the workers."""
    import ray

    if ray.is_initialized():
        return
    from raydc.models import offline_env

    offline_env()
    env = {k: os.environ[k] for k in RUNTIME_ENV_VARS if k in os.environ}
    ray.init(
        address=cfg.run.ray_address,
        runtime_env={"env_vars": env},
        log_to_driver=False,
        configure_logging=True,
        logging_level="WARNING",
    )


# ----------------------------------------------------------------------------- summary


def summarize(results: dict[str, StageResult], cfg: RaydcConfig) -> dict:
    """The end-of-job figures: rows, throughputs, metrics, best Tune config, paths."""
    s: dict[str, Any] = {"output_dir": cfg.run.output_dir, "stages": {}}
    for name, r in results.items():
        s["stages"][name] = {
            "out_dir": str(r.out_dir),
            "reused": r.skipped,
            "seconds": r.summary.get("seconds"),
        }
    if "prepare" in results:
        p = results["prepare"].summary
        s["rows"] = {k: p.get(k) for k in ("rows_in", "rows_out", "rows_rejected")}
        s["rejects"] = (p.get("paths") or {}).get("rejects")
    if "score" in results:
        s["scoring_tokens_per_s"] = _rate(results["score"].summary)
        engines = results["score"].summary.get("engines") or {}
        s["scoring_engines"] = {
            role: {k: e.get(k) for k in ("tokens_per_s_busy", "startup_s")}
            for role, e in engines.items()
            if isinstance(e, dict)
        }
        s["scored_rows"] = results["score"].summary.get("rows_out")
    if "select" in results:
        s["selected_rows"] = results["select"].summary.get("rows_out")
    model = results.get("tune") or results.get("train")
    if model is not None:
        m = model.summary.get("metrics") or {}
        s["training_tokens_per_s"] = m.get("tokens_per_s")
        s["train_metrics"] = {
            k: v for k, v in m.items() if k in ("step", "loss", "val_nll", "tokens_per_s", "ess")
        }
        s["model_dir"] = model.summary.get("model_dir")
        if "tune" in results:
            t = results["tune"].summary
            s["tune"] = {
                k: t.get(k)
                for k in (
                    "metric",
                    "mode",
                    "best_metric",
                    "best_config",
                    "best_checkpoint",
                    "results_csv",
                    "num_trials",
                )
            }
    if "eval" in results:
        e = results["eval"].summary
        s["eval_metrics"] = {k: e[k] for k in EVAL_HEADLINE if e.get(k) is not None}
        s["eval_dir"] = str(results["eval"].out_dir)
    return s


def format_summary(s: dict) -> str:
    lines = ["", "=" * 72, "raydc run summary", "-" * 72]
    rows = s.get("rows")
    if rows:
        lines.append(
            f"rows              in {_fmt_int(rows['rows_in'])}, out "
            f"{_fmt_int(rows['rows_out'])}, rejected {_fmt_int(rows['rows_rejected'])}"
            + (f"  ({s['rejects']})" if rows.get("rows_rejected") and s.get("rejects") else "")
        )
    for key, label in (("scored_rows", "scored rows"), ("selected_rows", "selected rows")):
        if s.get(key) is not None:
            lines.append(f"{label:<18}{_fmt_int(s[key])}")
    for key, label in (("scoring_tokens_per_s", "scoring"), ("training_tokens_per_s", "training")):
        if key not in s:
            continue
        v = s.get(key)
        text = f"{v:,.0f} tokens/s" if isinstance(v, (int, float)) else "n/a"
        if key == "scoring_tokens_per_s" and s.get("scoring_engines"):
            # End to end includes vLLM start-up; the engines' busy rate is the steady state.
            text += " end to end; busy: " + ", ".join(
                f"{role} {e['tokens_per_s_busy']:,.0f} tokens/s (start-up {e['startup_s']:.0f} s)"
                for role, e in s["scoring_engines"].items()
                if isinstance(e.get("tokens_per_s_busy"), (int, float))
                and isinstance(e.get("startup_s"), (int, float))
            )
        lines.append(f"{label:<18}{text}")
    if s.get("train_metrics"):
        lines.append(
            "final train       "
            + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in s["train_metrics"].items()
            )
        )
    if s.get("tune"):
        t = s["tune"]
        lines.append(
            f"tune              {t.get('num_trials')} trials; best {t.get('metric')} "
            f"= {t.get('best_metric')} ({t.get('mode')})"
        )
        lines.append(f"best config       {json.dumps(t.get('best_config'), default=str)}")
        lines.append(f"tune results      {t.get('results_csv')}")
    if s.get("eval_metrics"):
        lines.append(
            "eval              "
            + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in s["eval_metrics"].items()
            )
        )
    lines.append("-" * 72)
    lines.append(f"output dir        {s['output_dir']}")
    for name, st in s["stages"].items():
        sec = st.get("seconds")
        tag = (
            "reused" if st["reused"] else (f"{sec:.1f} s" if isinstance(sec, (int, float)) else "")
        )
        lines.append(f"  {name:<16}{st['out_dir']}  [{tag}]")
    if s.get("model_dir"):
        lines.append(f"model             {s['model_dir']}")
    lines.append("=" * 72)
    return "\n".join(lines)
