"""The Parquet schemas of prepared and scored rows (docs/contracts.md) and the small file
helpers every stage shares: listing a stage's data shards, collecting rejects and counts
that streaming workers write beside the data, and a stage's summary.

Workers write their rejects and per-batch counts to ``out_dir/_parts/`` under a name derived
from the batch's row ids, so a retried batch overwrites its own file instead of counting
twice; the driver merges them into ``rejects.parquet`` at the end and checks
rows_in == rows_out + rows_rejected. The driver never holds the data itself.
"""

from __future__ import annotations

import pyarrow as pa

PREPARED_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("prompt_id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.bool_())),
        ("sentence_ids", pa.list_(pa.int32())),
        # Given teacher log-probs on student positions (0.0 off the loss mask, NaN where
        # the teacher's tokens say nothing); null when the row has none.
        ("teacher_logprobs", pa.list_(pa.float32())),
        ("num_tokens", pa.int32()),
        ("num_loss_tokens", pa.int32()),
        # Beyond the contract's columns: what a teacher with another tokenizer needs.
        ("text", pa.string()),  # the rendered conversation (student chat template)
        ("offsets", pa.list_(pa.int32())),  # [2T] interleaved (start, end) in `text`
        ("response_spans", pa.list_(pa.int32())),  # [2K] assistant content spans in `text`
        ("conversation", pa.string()),  # the messages as JSON
    ]
)

# The scored store (format 2): only what training and selection read. Log-probs are
# float16 by default (score.logprobs; Parquet FLOAT16, byte-stream-split, zstd): ~2 B a token
# each at most, round-to-nearest error <= 2**-11 of the value (docs/contracts.md). What only
# a human inspects (text, offsets, spans, conversation, weights) goes to the side table
# ``inspect/`` when score.inspection is on; training never reads it.
STORE_FORMAT = 2
SCORED_COLUMNS = (
    "row_id",
    "prompt_id",
    "input_ids",
    "loss_mask",
    "sentence_ids",
    "teacher_logprobs",
    "num_tokens",
    "num_loss_tokens",
    "student_logprobs",
    "teacher_mask",
    "student_entropy",
)
LOGPROB_COLUMNS = ("student_logprobs", "teacher_logprobs")
LOGPROB_TYPES = {"float16": pa.float16(), "float32": pa.float32()}
INSPECT_DIR = "inspect"
INSPECT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("text", pa.string()),
        ("offsets", pa.list_(pa.int32())),
        ("response_spans", pa.list_(pa.int32())),
        ("conversation", pa.string()),
        ("weights", pa.list_(pa.float32())),  # the configured weights, from fp32 log-probs
    ]
)


def scored_schema(logprobs: str = "float16") -> pa.Schema:
    """The scored store's schema with log-probs as ``logprobs`` (float16 | float32)."""
    fields = {f.name: f for f in PREPARED_SCHEMA}
    lp = pa.list_(LOGPROB_TYPES[logprobs])
    fields["student_logprobs"] = pa.field("student_logprobs", lp)
    fields["teacher_logprobs"] = pa.field("teacher_logprobs", lp)
    # False where the teacher has no value (its log-prob was filled with the student's, a
    # neutral ratio); null for a row whose teacher values are all known.
    fields["teacher_mask"] = pa.field("teacher_mask", pa.list_(pa.bool_()))
    # The student's predictive entropy per token (nats, same precision as the log-probs;
    # position 0 holds 0.0); null when the score stage did not store it (score.entropy).
    fields["student_entropy"] = pa.field("student_entropy", lp)
    return pa.schema([fields[n] for n in SCORED_COLUMNS])


SCORED_SCHEMA = scored_schema("float16")

# Parquet writer settings of the scored store: zstd; dictionaries only on the id strings
# (on token ids and floats they cost more than they save); float columns byte-stream-split.
SCORED_WRITE_ARGS = {
    "compression": "zstd",
    "use_dictionary": ["row_id", "prompt_id"],
    "use_byte_stream_split": [f"{c}.list.element" for c in (*LOGPROB_COLUMNS, "student_entropy")],
}

# What the select stage writes instead of a second copy of the rows: the kept row ids (with
# their prompt and score, for people); training reads the scored store through it.
SELECTION_FILE = "selection.parquet"
SELECTION_SCHEMA = pa.schema(
    [("row_id", pa.string()), ("prompt_id", pa.string()), ("score", pa.float64())]
)


# The traces generate and mixed_policy write (prepare reads them under cfg.data's names).
def trace_schema(dcfg, extra: list[str]) -> pa.Schema:
    return pa.schema(
        [
            (dcfg.id_key, pa.string()),
            (dcfg.prompt_id_key, pa.string()),
            (dcfg.prompt_key, pa.string()),
            (dcfg.response_key, pa.string()),
            (dcfg.teacher_logprobs_key, pa.list_(pa.float32())),
            (dcfg.teacher_offsets_key, pa.list_(pa.list_(pa.int32()))),
            ("teacher_pieces", pa.list_(pa.string())),
            ("teacher_token_ids", pa.list_(pa.int32())),
            ("finish_reason", pa.string()),
            ("num_tokens", pa.int32()),
            ("sample", pa.int32()),
            ("temperature", pa.float32()),
            *[(name, pa.string()) for name in extra],
        ]
    )
