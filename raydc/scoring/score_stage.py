"""The score stage: prepared rows -> scored Parquet + manifest (Ray Data).

Scoring is one streaming Ray Data pipeline::

    read prepared Parquet
      -> check       (task)   rows longer than score.max_model_len or with ids outside the
                              vocabulary -> rejects
      -> student     (actors) one engine per actor (vLLM or transformers): student_logprobs
      -> teacher     (actors) only with score.teacher set and rows without teacher
                              log-probs; another tokenizer: scored on its own rendering of
                              the conversation and aligned by character spans
      -> finish      (task)   unknown teacher log-probs on loss tokens (NaN) become the
                              student's (a neutral ratio, counted); weights of cfg.weights
      -> write Parquet; rejects + counts merged; manifest.json with weight diagnostics

Engines are actors of a ``map_batches`` actor pool: each loads its model once and then
scores batches as they stream past (the measurement behind this choice over
``ray.data.llm`` is in docs/scoring.md). Light tasks ask for a quarter of a CPU so they run
beside engines on a small machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydc.artifacts import (
    PARTS_DIR,
    REJECTS_FILE,
    batch_key,
    check_reject_share,
    collect_parts,
    column_bytes,
    count_rows,
    data_files,
    prepare_out_dir,
    reason_counts,
    tokenizer_fingerprint,
    write_json,
    write_parts,
)
from raydc.data.schema import (
    INSPECT_DIR,
    INSPECT_SCHEMA,
    SCORED_WRITE_ARGS,
    STORE_FORMAT,
    scored_schema,
)
from raydc.runtime import LIGHT_CPUS
from raydc.scoring import make_scorer
from raydc.scoring.base import ScoreError
from raydc.scoring.vllm_backend import max_prompt_len

if TYPE_CHECKING:
    from raydc.config import ScoreConfig
    from raydc.weights import WeightConfig

# The summary's counts the manifest keeps.
MANIFEST_COUNTS = (
    "rows_in",
    "rows_out",
    "rows_rejected",
    "tokens",
    "loss_tokens",
    "teacher_rows",
    "teacher_unknown_tokens",
    "teacher_aligned_rows",
    "teacher_carried_tokens",
)
DIAGNOSTICS_MAX_TOKENS = 2_000_000  # weight diagnostics over at most this many loss tokens


def _pairs(flat) -> list[tuple[int, int]]:
    return list(zip(flat[::2], flat[1::2]))


# ----------------------------------------------------------------------------- check


def check_batch(batch: pa.Table, max_len: int, vocab: int, parts_dir: str) -> pa.Table:
    """Reject rows the engines cannot score; count rows in."""
    ids = batch.column("input_ids").to_pylist()
    keep, rejects = [], []
    for k, (rid, row) in enumerate(zip(batch.column("row_id").to_pylist(), ids)):
        if len(row) > max_len:
            rejects.append(
                {
                    "row_id": rid,
                    "field": "input_ids",
                    "reason": f"too_long: {len(row)} tokens > score.max_model_len={max_len}",
                }
            )
        elif row and (max(row) >= vocab or min(row) < 0):
            bad = max(row) if max(row) >= vocab else min(row)
            rejects.append(
                {
                    "row_id": rid,
                    "field": "input_ids",
                    "reason": f"vocab: token id {bad} outside the model's {vocab} ids",
                }
            )
        else:
            keep.append(k)
    stats = {"rows_in": batch.num_rows, "rows_rejected": len(rejects)}
    write_parts(parts_dir, batch_key(batch.column("row_id").to_pylist()), "score", rejects, stats)
    return batch.take(keep) if len(keep) < batch.num_rows else batch


# ----------------------------------------------------------------------------- engines


class _Timed:
    """Engine start-up and busy time of an actor, written beside the data so the stage
    summary reports start-up apart from scoring."""

    role = "engine"

    def _start(self, parts_dir: str | None) -> float:
        self.parts_dir = parts_dir
        return time.perf_counter()

    def _started(self, t0: float) -> None:
        if self.parts_dir:
            stats = {"startup_s": time.perf_counter() - t0, "engines": 1}
            write_parts(
                self.parts_dir, f"{self.role}-{os.getpid()}-init", f"eng{self.role}", [], stats
            )

    def _busy(self, t0: float, rows: list[str], tokens: int) -> None:
        if self.parts_dir:
            stats = {"busy_s": time.perf_counter() - t0, "tokens": tokens, "calls": 1}
            write_parts(self.parts_dir, batch_key(rows), f"eng{self.role}", [], stats)


class StudentScorer(_Timed):
    """Ray Data actor: adds ``student_logprobs`` to each batch."""

    role = "student"

    def __init__(self, model: str, score_cfg: ScoreConfig, parts_dir: str | None = None):
        t0 = self._start(parts_dir)
        self.scorer = make_scorer(score_cfg, model)
        self._started(t0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        ids = batch.column("input_ids").to_pylist()
        lps = self.scorer.score(ids)
        col = pa.array([x.astype(np.float32) for x in lps], pa.list_(pa.float32()))
        self._busy(t0, batch.column("row_id").to_pylist(), sum(map(len, ids)))
        return _set_column(batch, "student_logprobs", col)


class TeacherScorer(_Timed):
    """Ray Data actor: fills ``teacher_logprobs`` of rows that have none.

    Same tokenizer as the student: the student's ids are scored as they are. Another
    tokenizer: the conversation is rendered with the teacher's chat template and
    tokenised by the teacher, scored, and each assistant turn's values are carried onto
    the student's tokens by character spans (``raydc.data.align.align_turn``). Values
    beyond the teacher's max_model_len, and student tokens the teacher does not cover,
    are NaN ("unknown"), resolved in the finish step.
    """

    role = "teacher"

    def __init__(
        self,
        model: str,
        score_cfg: ScoreConfig,
        same_tokenizer: bool,
        parts_dir: str | None = None,
    ):
        t0 = self._start(parts_dir)
        self.same = same_tokenizer
        self.max_len = max_prompt_len(model, score_cfg.max_model_len)
        self.scorer = make_scorer(score_cfg, model, score_cfg.teacher_temperature)
        if not self.same:
            from raydc.data.render import special_ids

            self.tok = load_teacher_tokenizer(model)
            self.specials = special_ids(self.tok)
            self.vocab = _vocab_size(model)
        self._started(t0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        given = batch.column("teacher_logprobs").to_pylist()
        todo = [i for i, t in enumerate(given) if t is None]
        if not todo:
            return batch
        t0 = time.perf_counter()
        ids = batch.column("input_ids").to_pylist()
        if self.same:
            lps = self.scorer.score([ids[i] for i in todo])
            for i, lp in zip(todo, lps):
                given[i] = lp.astype(np.float32)
        rids = batch.column("row_id").to_pylist()
        rejects: list[dict] = []
        if not self.same:
            counts = {"teacher_aligned_rows": 0, "teacher_carried_tokens": 0}
            rows = [batch.slice(i, 1).to_pylist()[0] for i in todo]
            for i, vals in zip(todo, self._cross(rows, counts)):
                if isinstance(vals, str):
                    rejects.append({"row_id": rids[i], "field": "teacher_logprobs", "reason": vals})
                else:
                    given[i] = np.asarray(vals, dtype=np.float32)
            counts["rows_rejected"] = len(rejects)
            if self.parts_dir:
                write_parts(self.parts_dir, batch_key(rids) + "-align", "score", rejects, counts)
        col = pa.array(given, pa.list_(pa.float32()))
        self._busy(t0, [rids[i] for i in todo], sum(len(ids[i]) for i in todo))
        batch = _set_column(batch, "teacher_logprobs", col)
        if rejects:
            gone = {r["row_id"] for r in rejects}
            batch = batch.take([k for k, r in enumerate(rids) if r not in gone])
        return batch

    def _cross(self, rows: list[dict], counts: dict) -> list[list[float] | str]:
        """Per row: the teacher's values on the student's tokens, or a reject reason.
        Each aligned row's placed values sum to its teacher values (checked here)."""
        from raydc.data.align import AlignmentError, align_turn
        from raydc.data.render import RowReject, render, tokenize, turn_tokens

        t_ids, t_offs, t_spans, t_turns = [], [], [], []
        carried: dict = {}
        for r in rows:
            try:
                text, spans = render(self.tok, json.loads(r["conversation"]))
            except RowReject as e:
                raise ScoreError(f"row {r['row_id']}: the teacher's chat template: {e}") from None
            ids, offs = tokenize(self.tok, text)
            # Beyond the teacher's context: dropped here, so those tokens stay unknown.
            ids, offs = ids[: self.max_len], offs[: self.max_len]
            if ids and max(ids) >= self.vocab:
                raise ScoreError(f"row {r['row_id']}: teacher token id {max(ids)} >= its vocab")
            t_ids.append(ids)
            t_offs.append(offs)
            t_spans.append(spans)
            t_turns.append(turn_tokens(offs, ids, spans, self.specials))
        lps = self.scorer.score(t_ids)
        out = []
        for r, lp, offs, spans, turns in zip(rows, lps, t_offs, t_spans, t_turns):
            s_offs = _pairs(r["offsets"])
            s_spans = _pairs(r["response_spans"])
            mask = r["loss_mask"]
            vals = [0.0] * len(r["input_ids"])
            teacher_sum = 0.0
            reason = None
            if len(spans) != len(s_spans):
                raise ScoreError(
                    f"row {r['row_id']}: the teacher's template shows {len(spans)} assistant "
                    f"turns, the student's {len(s_spans)}"
                )
            for (tcs, tce), (tcontent, teot), (scs, sce) in zip(spans, turns, s_spans):
                src = [(offs[i][0] - tcs, offs[i][1] - tcs) for i in tcontent]
                val = [float(lp[i]) for i in tcontent]
                if teot is not None and teot < len(lp):
                    src.append((tce - tcs, tce - tcs + 1))  # at the content's end: end-of-turn
                    val.append(float(lp[teot]))
                s_content = [
                    i for i, (s, e) in enumerate(s_offs) if mask[i] and s < sce and e > scs
                ]
                s_eot = next((i for i, (s, _) in enumerate(s_offs) if s >= sce), None)
                has_eot = s_eot is not None and mask[s_eot]
                dst = [(s_offs[i][0] - scs, s_offs[i][1] - scs) for i in s_content]
                try:
                    got = align_turn(tce - tcs, src, val, dst, has_eot, counts=carried)
                except AlignmentError as e:
                    reason = f"teacher_alignment: {e}"
                    break
                content_len = tce - tcs
                teacher_sum += sum(v for (s, _), v in zip(src, val) if has_eot or s < content_len)
                for i, v in zip([*s_content, *([s_eot] if has_eot else [])], got):
                    vals[i] = v
            if reason is not None:
                out.append(reason)
                continue
            placed = sum(v for v in vals if not math.isnan(v))
            if abs(placed - teacher_sum) > 1e-3 * max(1.0, abs(teacher_sum)):
                raise ScoreError(
                    f"row {r['row_id']}: the student's tokens carry {placed:.6f} of the "
                    f"teacher's {teacher_sum:.6f} log-prob (alignment lost mass; a bug)"
                )
            counts["teacher_aligned_rows"] += 1
            out.append(vals)
        counts["teacher_carried_tokens"] += carried.get("carried", 0)
        return out


def load_teacher_tokenizer(path: str):
    """The tokenizer a folder's ``tokenizer.json`` describes.

    ``AutoTokenizer`` (transformers 5) picks the tokenizer class from the model type: a
    Qwen2-architecture folder saved with a WordPiece ``tokenizer.json`` (the tiny
    cross-tokenizer teacher) loads as a byte-level ``Qwen2Tokenizer`` that splits every
    character and reports wrong character offsets, which would misalign the teacher's
    log-probs. When the folder declares a plain tokenizers backend, load exactly that.
    """
    from raydc.models import load_tokenizer, offline_env, tokenizer_path

    folder = Path(tokenizer_path(path))
    conf = folder / "tokenizer_config.json"
    if (folder / "tokenizer.json").exists() and conf.exists():
        cls = json.loads(conf.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            offline_env()
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return load_tokenizer(path)


def _set_column(batch: pa.Table, name: str, col: pa.Array) -> pa.Table:
    if name in batch.column_names:
        return batch.set_column(batch.column_names.index(name), name, col)
    return batch.append_column(name, col)


def _vocab_size(model: str) -> int:
    cfg = Path(model) / "config.json"
    if not cfg.exists():
        raise ScoreError(
            f"{model}: no config.json (score.student / score.teacher must be a model folder)"
        )
    data = json.loads(cfg.read_text())
    data = data.get("text_config", data)
    return int(data["vocab_size"])


# ----------------------------------------------------------------------------- finish


def batch_weights(s_rows, t_rows, m_rows, sid_rows, wcfg) -> list[np.ndarray]:
    """``compute_weights`` of ``wcfg`` for rows given as lists (ragged). Rows with and without
    teacher log-probs are weighted apart: without, d = log p_S."""
    import torch

    from raydc.weights import compute_weights

    B, T = len(m_rows), max((len(m) for m in m_rows), default=0)
    m_BT = torch.zeros(B, T, dtype=torch.bool)
    s_BT = torch.zeros(B, T)
    sid_BT = torch.zeros(B, T, dtype=torch.long)
    t_BT = torch.zeros(B, T)
    has_t = [t is not None for t in t_rows]
    for b in range(B):
        n = len(m_rows[b])
        m_BT[b, :n] = torch.as_tensor(np.asarray(m_rows[b], bool))
        s_BT[b, :n] = torch.as_tensor(np.asarray(s_rows[b], np.float32))
        sid_BT[b, :n] = torch.as_tensor(np.asarray(sid_rows[b], np.int64))
        if has_t[b]:
            t_BT[b, :n] = torch.as_tensor(np.asarray(t_rows[b], np.float32))
    w_BT = torch.zeros(B, T)
    for group in (True, False):
        rows = [b for b in range(B) if has_t[b] == group]
        if rows:
            w_BT[rows] = compute_weights(
                s_BT[rows], t_BT[rows] if group else None, m_BT[rows], wcfg, sid_BT[rows]
            )
    return [w_BT[b, : len(m_rows[b])].numpy() for b in range(B)]


def to_store(rows: list, logprobs: str) -> pa.Array:
    """Log-prob rows as the store's list column: float16 rounds to nearest (values below
    float16's range, never seen in practice, clamp to its lowest finite value)."""
    if logprobs == "float32":
        return pa.array(rows, pa.list_(pa.float32()))
    lo = float(np.finfo(np.float16).min)
    return pa.array(
        [None if r is None else np.maximum(np.asarray(r, np.float32), lo) for r in rows],
        pa.list_(pa.float32()),
    ).cast(pa.list_(pa.float16()))


def finish_batch(
    batch: pa.Table,
    weights: WeightConfig,
    parts_dir: str,
    logprobs: str = "float16",
    inspect_dir: str | None = None,
) -> pa.Table:
    """Resolve unknown teacher log-probs and cast to the scored store's schema. With
    ``inspect_dir``, also write the rows' text, offsets, conversation and configured weights
    (from the fp32 log-probs, under ``weights``) to a side-table part named by the batch's
    row ids."""
    s_rows = batch.column("student_logprobs").to_pylist()
    t_rows = batch.column("teacher_logprobs").to_pylist()
    m_rows = batch.column("loss_mask").to_pylist()
    filled = 0
    tm_rows: list[list[bool] | None] = [None] * len(t_rows)
    for k, (s, t, m) in enumerate(zip(s_rows, t_rows, m_rows)):
        if t is None:
            continue
        t = [math.nan if x is None else float(x) for x in t]
        known = [True] * len(t)
        for i, on in enumerate(m):
            if on and math.isnan(t[i]):
                t[i] = s[i]  # the teacher said nothing here: a neutral ratio of 1
                known[i] = False
                filled += 1
            elif not on and math.isnan(t[i]):
                t[i] = 0.0
        t_rows[k] = t
        if not all(known):
            tm_rows[k] = known  # training keeps these at weight 1 under any student reference
    key = batch_key(batch.column("row_id").to_pylist())
    if inspect_dir is not None:
        sid_rows = batch.column("sentence_ids").to_pylist()
        w_rows = batch_weights(s_rows, t_rows, m_rows, sid_rows, weights)
        side = batch.select([n for n in INSPECT_SCHEMA.names if n != "weights"])
        side = side.append_column("weights", pa.array(w_rows, pa.list_(pa.float32())))
        os.makedirs(inspect_dir, exist_ok=True)
        tmp = os.path.join(inspect_dir, f".{key}.parquet.tmp")
        pq.write_table(side.cast(INSPECT_SCHEMA), tmp, compression="zstd")
        os.replace(tmp, os.path.join(inspect_dir, f"{key}.parquet"))
    batch = _set_column(batch, "teacher_logprobs", to_store(t_rows, logprobs))
    batch = _set_column(batch, "student_logprobs", to_store(s_rows, logprobs))
    batch = _set_column(batch, "teacher_mask", pa.array(tm_rows, pa.list_(pa.bool_())))
    stats = {
        "rows_out": batch.num_rows,
        "tokens": int(sum(len(m) for m in m_rows)),
        "loss_tokens": int(sum(sum(m) for m in m_rows)),
        "teacher_rows": int(sum(t is not None for t in t_rows)),
        "teacher_unknown_tokens": filled,
    }
    write_parts(parts_dir, key, "finish", [], stats)
    schema = scored_schema(logprobs)
    return batch.select(schema.names).cast(schema)


# ----------------------------------------------------------------------------- the stage


def _same_tokenizer(student: str, teacher: str) -> bool:
    from raydc.models import load_tokenizer

    a, b = load_tokenizer(student), load_tokenizer(teacher)
    return a.get_vocab() == b.get_vocab()


def _engine_args(scfg) -> dict:
    import ray

    args = dict(
        compute=ray.data.ActorPoolStrategy(size=int(scfg.num_engines)),
        batch_size=int(scfg.batch_size),
        num_cpus=float(scfg.cpus_per_engine),
        batch_format="pyarrow",
    )
    if scfg.gpus_per_engine > 0:
        args["num_gpus"] = float(scfg.gpus_per_engine) * int(scfg.tensor_parallel_size)
    return args


def _input_fingerprint(files: list[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.basename(f)}:{st.st_size}".encode())
        h.update(pq.ParquetFile(f).metadata.to_dict().__repr__().encode()[:4096])
    return h.hexdigest()[:16]


def _first_row_without_teacher(files: list[str]) -> str | None:
    """The first prepared row with no teacher log-probs, reading one batch at a time."""
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(columns=["row_id", "teacher_logprobs"]):
            nulls = batch.column("teacher_logprobs").is_null()
            if nulls.true_count:
                return batch.column("row_id")[nulls.to_pylist().index(True)].as_py()
    return None


def _check_prepared(cfg, prepared_dir: str | os.PathLike) -> tuple[list[str], dict]:
    """The prepared shards and their summary, refused before any engine starts when they
    do not fit the student (another tokenizer) or mix rows with and without teacher
    log-probs that no teacher will fill."""
    scfg = cfg.score
    if not scfg.student:
        raise ScoreError("score.student is empty: set it to the student model folder")
    student = str(scfg.student)
    files = data_files(prepared_dir)
    summary_path = Path(prepared_dir) / "summary.json"
    if not files or not summary_path.exists():
        raise ScoreError(f"{prepared_dir}: no prepared data (run the prepare stage first)")
    prep = json.loads(summary_path.read_text())
    tok_fp = tokenizer_fingerprint(student)
    if prep.get("tokenizer_fingerprint") != tok_fp:
        raise ScoreError(
            f"{prepared_dir} was tokenised with {prep.get('tokenizer')!r} (fingerprint "
            f"{prep.get('tokenizer_fingerprint')}), not the student's tokenizer {student!r} "
            f"({tok_fp}); prepare again with data.tokenizer unset or set to the student"
        )
    given = int(prep.get("given_teacher_rows", 0))
    if not scfg.teacher and 0 < given < prep["rows_out"]:
        # Training needs every row of a micro-batch to have teacher log-probs or none.
        row = _first_row_without_teacher(files)
        raise ScoreError(
            f"row {row!r}: no teacher_logprobs, but {given} of {prep['rows_out']} rows give "
            "them; give them for every row or for none, or set score.teacher to score the rest"
        )
    return files, prep


def _write_scored(cfg, files: list[str], out: Path, teacher: str | None, same: bool | None) -> None:
    """The streaming pipeline: check -> student -> (teacher) -> finish -> Parquet."""
    import ray

    scfg = cfg.score
    student = str(scfg.student)
    parts = str(out / PARTS_DIR)
    ds = ray.data.read_parquet(files, num_cpus=LIGHT_CPUS)
    ds = ds.map_batches(
        check_batch,
        batch_format="pyarrow",
        num_cpus=LIGHT_CPUS,
        fn_kwargs=dict(
            max_len=max_prompt_len(student, int(scfg.max_model_len)),
            vocab=_vocab_size(student),
            parts_dir=parts,
        ),
    )
    ds = ds.map_batches(
        StudentScorer,
        fn_constructor_kwargs=dict(model=student, score_cfg=scfg, parts_dir=parts),
        **_engine_args(scfg),
    )
    if teacher is not None:
        ds = ds.map_batches(
            TeacherScorer,
            fn_constructor_kwargs=dict(
                model=teacher, score_cfg=scfg, same_tokenizer=same, parts_dir=parts
            ),
            **_engine_args(scfg),
        )
    ds = ds.map_batches(
        finish_batch,
        batch_format="pyarrow",
        num_cpus=LIGHT_CPUS,
        fn_kwargs=dict(
            weights=cfg.weights,
            parts_dir=parts,
            logprobs=scfg.logprobs,
            inspect_dir=str(out / INSPECT_DIR) if scfg.inspection else None,
        ),
    )
    ds.write_parquet(str(out), ray_remote_args={"num_cpus": LIGHT_CPUS}, **SCORED_WRITE_ARGS)


def _engine_stats(out: Path) -> dict:
    """Per role: engines, mean start-up, busy time and tokens, tokens/s while busy."""
    engines = {}
    for role in ("student", "teacher"):
        eng = _collect_stats(out, f"eng{role}")
        if eng:
            busy = eng.get("busy_s", 0.0)
            engines[role] = {
                "engines": int(eng.get("engines", 0)),
                "startup_s": round(eng.get("startup_s", 0.0) / max(1, eng.get("engines", 1)), 3),
                "busy_s": round(busy, 3),
                "tokens": int(eng.get("tokens", 0)),
                "tokens_per_s_busy": round(eng.get("tokens", 0) / busy, 1) if busy else None,
            }
    return engines


def run_score(cfg, prepared_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Score prepared rows under the student (and teacher); write scored Parquet,
    ``rejects.parquet`` and ``manifest.json`` to ``out_dir``; return the summary."""
    from raydc.models import fingerprint, offline_env
    from raydc.runtime import connect_ray

    t0 = time.time()
    offline_env()
    scfg = cfg.score
    files, prep = _check_prepared(cfg, prepared_dir)
    student = str(scfg.student)
    teacher = str(scfg.teacher) if scfg.teacher else None
    needs_teacher_scoring = (
        teacher is not None and prep.get("given_teacher_rows", 0) < prep["rows_out"]
    )
    same = _same_tokenizer(student, teacher) if needs_teacher_scoring else None

    connect_ray(cfg.run.ray_address)
    out = prepare_out_dir(out_dir)
    _write_scored(cfg, files, out, teacher if needs_teacher_scoring else None, same)

    totals_in = _collect_stats(out, "finish")
    engines = _engine_stats(out)
    totals, rejects = collect_parts(out, "score")
    rows_out = count_rows(data_files(out))
    on_disk = column_bytes(data_files(out))
    summary = {
        "stage": "score",
        "rows_in": int(totals.get("rows_in", 0)),
        "rows_out": rows_out,
        "rows_rejected": rejects.num_rows,
        "tokens": int(totals_in.get("tokens", 0)),
        "loss_tokens": int(totals_in.get("loss_tokens", 0)),
        "teacher_rows": int(totals_in.get("teacher_rows", 0)),
        "teacher_unknown_tokens": int(totals_in.get("teacher_unknown_tokens", 0)),
        # cross-tokenizer rows whose placed teacher log-probs were checked to sum to the
        # teacher's, and teacher values carried past a gap or from an empty span
        "teacher_aligned_rows": int(totals.get("teacher_aligned_rows", 0)),
        "teacher_carried_tokens": int(totals.get("teacher_carried_tokens", 0)),
        "reasons": reason_counts(rejects),
        "engines": engines,  # start-up (mean per engine) apart from busy scoring time
        "store_bytes_per_token": _per_token(
            on_disk,
            int(totals_in.get("tokens", 0)),
            sum(os.path.getsize(f) for f in data_files(out)),
        ),
        "seconds": round(time.time() - t0, 3),
    }
    if summary["rows_in"] != rows_out + rejects.num_rows or totals_in.get("rows_out") != rows_out:
        raise ScoreError(
            f"score lost rows: {summary['rows_in']} in != {rows_out} out + "
            f"{rejects.num_rows} rejected (a bug; please report)"
        )
    backend_version = _backend_version(scfg.backend)
    manifest = {
        "student": {"path": student, "fingerprint": fingerprint(student)},
        "tokenizer_fingerprint": prep["tokenizer_fingerprint"],
        "teacher": None
        if teacher is None
        else {
            "path": teacher,
            "fingerprint": fingerprint(teacher),
            "scored": needs_teacher_scoring,
            "same_tokenizer": same,
            "tokenizer_fingerprint": tokenizer_fingerprint(teacher),
            # softmax(logits / T): the distribution the traces were sampled from
            "temperature": float(scfg.teacher_temperature) if needs_teacher_scoring else None,
        },
        "backend": scfg.backend,
        "vllm_version": backend_version.get("vllm"),
        "versions": backend_version,
        "counts": {k: summary[k] for k in MANIFEST_COUNTS},
        "config": {"score": dataclasses.asdict(scfg), "data": prep.get("config")},
        "weights": cfg.weights.to_dict(),
        "weight_diagnostics": _weight_diagnostics(data_files(out), cfg.weights),
        "store": {**store_info(scfg), "column_bytes": on_disk},
        "input_fingerprint": _input_fingerprint(files),
        "prepared": str(prepared_dir),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": summary["seconds"],
        "engines": engines,
    }
    write_json(out / "manifest.json", manifest)
    check_reject_share(
        "score", summary, cfg.data.max_reject_share, out / REJECTS_FILE, error=ScoreError
    )
    summary["paths"] = {
        "data": str(out),
        "manifest": str(out / "manifest.json"),
        "rejects": str(out / REJECTS_FILE),
    }
    return summary


def _collect_stats(out: Path, stage: str) -> dict:
    totals: dict = {}
    for f in sorted((out / PARTS_DIR).glob(f"stats-{stage}-*.json")):
        for k, v in json.loads(f.read_text()).items():
            totals[k] = totals.get(k, 0) + v
        f.unlink()
    return totals


def _backend_version(backend: str) -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("vllm", "torch", "transformers", "ray"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            try:
                out[pkg] = md.version(f"{pkg}-cpu") if pkg == "vllm" else None
            except md.PackageNotFoundError:
                out[pkg] = None
    if backend != "vllm":
        out["vllm"] = None
    return out


def store_info(scfg) -> dict:
    """The manifest's description of the scored store (training checks ``format``)."""
    return {
        "format": STORE_FORMAT,
        "logprobs": scfg.logprobs,
        "inspection": INSPECT_DIR if scfg.inspection else None,
    }


def _per_token(on_disk: dict[str, int], tokens: int, file_bytes: int) -> dict[str, float]:
    """Bytes per scored token: per column (compressed chunks), the files' footers and page
    headers (``metadata``), and the whole files (``total``)."""
    if not tokens:
        return {}
    per = {k: round(v / tokens, 3) for k, v in sorted(on_disk.items())}
    meta = max(0, file_bytes - sum(on_disk.values()))
    return {**per, "metadata": round(meta / tokens, 3), "total": round(file_bytes / tokens, 3)}


def _weight_diagnostics(files: list[str], wcfg) -> dict:
    """``raydc.weights.weight_diagnostics`` of the configured weights, recomputed from the
    stored log-probs (what training sees), over the first DIAGNOSTICS_MAX_TOKENS loss
    tokens; ``sampled`` says whether that cut anything."""
    import torch

    from raydc.weights import weight_diagnostics

    columns = ["student_logprobs", "teacher_logprobs", "loss_mask", "sentence_ids"]
    ws, ms, n, sampled = [], [], 0, False
    for f in files:
        if sampled:
            break
        for b in pq.ParquetFile(f).iter_batches(batch_size=256, columns=columns):
            if n >= DIAGNOSTICS_MAX_TOKENS:
                sampled = True
                break
            m_rows = b.column("loss_mask").to_pylist()
            ws += batch_weights(
                b.column("student_logprobs").to_pylist(),
                b.column("teacher_logprobs").to_pylist(),
                m_rows,
                b.column("sentence_ids").to_pylist(),
                wcfg,
            )
            ms += m_rows
            n += sum(sum(m) for m in m_rows)
    if not ws:
        return {"tokens": 0, "sampled": False}
    T = max(len(w) for w in ws)
    w_BT = torch.zeros(len(ws), T)
    m_BT = torch.zeros(len(ws), T, dtype=torch.bool)
    for b, (w, m) in enumerate(zip(ws, ms)):
        w_BT[b, : len(w)] = torch.as_tensor(w)
        m_BT[b, : len(m)] = torch.tensor(m)
    diag = weight_diagnostics(w_BT, m_BT, wcfg)
    diag["sampled"] = sampled
    if isinstance(diag.get("corr_weight_length"), float) and math.isnan(diag["corr_weight_length"]):
        diag["corr_weight_length"] = None  # JSON has no NaN
    return diag
