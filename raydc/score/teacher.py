"""The teacher's engine actor: fills ``teacher_logprobs`` of rows that have none.

Same tokenizer as the student: the student's ids are scored as they are. Another
tokenizer: the conversation is rendered with the teacher's chat template (a turn's span
holds an empty think block exactly when prepare's rendering of the student's does:
``data.train_empty_think``) and tokenised by the teacher, scored, and each assistant
turn's values are carried onto the student's tokens by character spans
(``raydc.method.align.align_turn``). Values beyond the teacher's max_model_len, and
student tokens the teacher does not cover, are NaN ("unknown"), resolved in the finish
step (``raydc.score.store.finish_batch``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from raydc.engines import make_scorer
from raydc.engines.base import ScoreError
from raydc.engines.vllm import max_prompt_len
from raydc.infra.artifacts import batch_key, write_parts
from raydc.score.actors import EngineActor, vocab_size
from raydc.score.store import set_column

if TYPE_CHECKING:
    from raydc.config import ScoreConfig


def _pairs(flat) -> list[tuple[int, int]]:
    return list(zip(flat[::2], flat[1::2]))


class TeacherScorer(EngineActor):
    """Ray Data actor: fills ``teacher_logprobs`` of rows that have none (see the module)."""

    role = "teacher"

    def __init__(
        self,
        model: str,
        score_cfg: ScoreConfig,
        same_tokenizer: bool,
        parts_dir: str | None = None,
        train_empty_think: bool = False,
    ):
        t0 = self._start(parts_dir)
        self.same = same_tokenizer
        # data.train_empty_think: the teacher's turn spans drawn as prepare drew the student's
        self.train_empty_think = train_empty_think
        self.max_len = max_prompt_len(model, score_cfg.engine.max_model_len)
        self.scorer = make_scorer(score_cfg, model, score_cfg.teacher_temperature)
        if not self.same:
            from raydc.infra.chat import special_ids

            self.tok = load_teacher_tokenizer(model)
            self.specials = special_ids(self.tok)
            self.vocab = vocab_size(model)
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
            for i, vals in zip(todo, self._onto_student_tokens(rows, counts)):
                if isinstance(vals, str):
                    rejects.append({"row_id": rids[i], "field": "teacher_logprobs", "reason": vals})
                else:
                    given[i] = np.asarray(vals, dtype=np.float32)
            counts["rows_rejected"] = len(rejects)
            if self.parts_dir:
                write_parts(self.parts_dir, batch_key(rids) + "-align", "score", rejects, counts)
        col = pa.array(given, pa.list_(pa.float32()))
        self._busy(t0, [rids[i] for i in todo], sum(len(ids[i]) for i in todo))
        batch = set_column(batch, "teacher_logprobs", col)
        if rejects:
            gone = {r["row_id"] for r in rejects}
            batch = batch.take([k for k, r in enumerate(rids) if r not in gone])
        return batch

    def _onto_student_tokens(self, rows: list[dict], counts: dict) -> list[list[float] | str]:
        """Per row: the teacher's values on the student's tokens, or a reject reason.
        Each aligned row's placed values sum to its teacher values (checked here)."""
        carried: dict = {}
        out: list[list[float] | str] = []
        for r, teacher_side in zip(rows, self._score_own_rendering(rows)):
            placed = _place_row(r, *teacher_side, carried)
            if isinstance(placed, str):
                out.append(placed)
                continue
            vals, teacher_sum = placed
            got = sum(v for v in vals if not math.isnan(v))
            if abs(got - teacher_sum) > 1e-3 * max(1.0, abs(teacher_sum)):
                raise ScoreError(
                    f"row {r['row_id']}: the student's tokens carry {got:.6f} of the "
                    f"teacher's {teacher_sum:.6f} log-prob (alignment lost mass; a bug)"
                )
            counts["teacher_aligned_rows"] += 1
            out.append(vals)
        counts["teacher_carried_tokens"] += carried.get("carried", 0)
        return out

    def _score_own_rendering(self, rows: list[dict]) -> list[tuple]:
        """Per row: the teacher's log-probs of its own rendering of the conversation, with
        its token offsets, assistant-turn spans and each turn's (content, end-of-turn)
        tokens. Tokens beyond the teacher's context are dropped (they stay unknown)."""
        from raydc.infra.artifacts import RowReject
        from raydc.infra.chat import render, tokenize, turn_tokens

        t_ids, sides = [], []
        for r in rows:
            try:
                text, spans = render(
                    self.tok, json.loads(r["conversation"]), self.train_empty_think
                )
            except RowReject as e:
                raise ScoreError(f"row {r['row_id']}: the teacher's chat template: {e}") from None
            ids, offs = tokenize(self.tok, text)
            ids, offs = ids[: self.max_len], offs[: self.max_len]
            if ids and max(ids) >= self.vocab:
                raise ScoreError(f"row {r['row_id']}: teacher token id {max(ids)} >= its vocab")
            t_ids.append(ids)
            sides.append((offs, spans, turn_tokens(offs, ids, spans, self.specials)))
        lps = self.scorer.score(t_ids)
        return [(lp, *side) for lp, side in zip(lps, sides)]


def _place_row(r: dict, lp, offs, spans, turns, carried: dict) -> tuple[list[float], float] | str:
    """One row's teacher values placed on the student's tokens turn by turn, with the sum
    of the teacher values they carry; or a reject reason when a turn does not align."""
    from raydc.method.align import AlignmentError, align_turn

    s_offs = _pairs(r["offsets"])
    s_spans = _pairs(r["response_spans"])
    mask = r["loss_mask"]
    vals = [0.0] * len(r["input_ids"])
    teacher_sum = 0.0
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
        s_content = [i for i, (s, e) in enumerate(s_offs) if mask[i] and s < sce and e > scs]
        s_eot = next((i for i, (s, _) in enumerate(s_offs) if s >= sce), None)
        has_eot = s_eot is not None and mask[s_eot]
        dst = [(s_offs[i][0] - scs, s_offs[i][1] - scs) for i in s_content]
        try:
            got = align_turn(tce - tcs, src, val, dst, has_eot, counts=carried)
        except AlignmentError as e:
            return f"teacher_alignment: {e}"
        content_len = tce - tcs
        teacher_sum += sum(v for (s, _), v in zip(src, val) if has_eot or s < content_len)
        for i, v in zip([*s_content, *([s_eot] if has_eot else [])], got):
            vals[i] = v
    return vals, teacher_sum


def load_teacher_tokenizer(path: str):
    """The tokenizer a folder's ``tokenizer.json`` describes.

    ``AutoTokenizer`` (transformers 5) picks the tokenizer class from the model type: a
    Qwen2-architecture folder saved with a WordPiece ``tokenizer.json`` (the tiny
    cross-tokenizer teacher) loads as a byte-level ``Qwen2Tokenizer`` that splits every
    character and reports wrong character offsets, which would misalign the teacher's
    log-probs. When the folder declares a plain tokenizers backend, load exactly that.
    """
    from raydc.infra.models import load_tokenizer, offline_env, tokenizer_path

    folder = Path(tokenizer_path(path))
    conf = folder / "tokenizer_config.json"
    if (folder / "tokenizer.json").exists() and conf.exists():
        cls = json.loads(conf.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            offline_env()
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(folder))
    return load_tokenizer(path)
