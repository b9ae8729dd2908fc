"""raydc.score.store: the scored store's finish step keeps the student's entropy at the
log-probs' precision (or a null column), and training reads it back as written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raydc.config import from_dict
from raydc.method.weights import preset
from raydc.score.store import finish_batch, write_store
from raydc.train.batch import RowBlock
from raydc.train.data import ScoredDataError
from tests.unit.test_train_batch import scored_table

ENTROPY = [[0.0, 1.25, 0.0078125], [0.0, 2.5], [0.0, 0.3, 3.1, 0.01]]


def _finished(tmp_path, **over):
    batch = scored_table(
        prompt_id=["p", "q", "r"],
        num_tokens=[3, 2, 4],
        num_loss_tokens=[2, 1, 2],
        teacher_mask=pa.nulls(3, pa.list_(pa.bool_())),
        **over,
    )
    return finish_batch(batch, preset("sft"), str(tmp_path), "float16")


def test_the_entropy_survives_the_store_round_trip_at_float16(tmp_path):
    out = _finished(tmp_path, student_entropy=ENTROPY)
    assert out.schema.field("student_entropy").type == pa.list_(pa.float16())
    block = RowBlock.from_table(out)
    want = np.concatenate([np.asarray(r, np.float16).astype(np.float32) for r in ENTROPY])
    assert np.array_equal(block.student_entropy, want)
    # float16 keeps 11 significant bits: within 2**-11 of the value
    flat = np.concatenate([np.asarray(r, np.float32) for r in ENTROPY])
    assert np.all(np.abs(block.student_entropy - flat) <= np.abs(flat) * 2.0**-11)


def test_a_store_without_entropy_reads_as_none_and_a_partial_one_is_refused(tmp_path):
    out = _finished(tmp_path)
    assert out.column("student_entropy").null_count == 3
    assert RowBlock.from_table(out).student_entropy is None
    partial = _finished(tmp_path, student_entropy=[ENTROPY[0], None, ENTROPY[2]])
    with pytest.raises(ScoredDataError, match=r"'b'.*student_entropy"):
        RowBlock.from_table(partial)


def test_write_store_keeps_a_given_entropy(tmp_path):
    import pyarrow.parquet as pq

    from raydc.infra.models import build_tiny_model

    model = build_tiny_model(tmp_path / "s", "student", seed=0)
    t = scored_table(student_entropy=ENTROPY)
    out = write_store(
        tmp_path / "store", {c: t.column(c).to_pylist() for c in t.column_names}, model
    )
    got = pq.read_table(f"{out}/part-00000.parquet").column("student_entropy").to_pylist()
    assert got == [[pytest.approx(v, rel=1e-6) for v in r] for r in ENTROPY]


@pytest.mark.parametrize(
    "over, stores",
    [
        ({}, False),
        ({"weights": {"preset": "eaft"}, "train": {"student_ref": "current"}}, True),
        ({"weights": {"preset": "eaft"}}, True),  # student_ref init: the store must have it
        ({"score": {"entropy": "on"}}, True),
        (
            {
                "weights": {"preset": "eaft"},
                "score": {"entropy": "off"},
                "train": {"student_ref": "current"},
            },
            False,
        ),  # fmt: skip
        (
            {
                "tune": {"enabled": True, "space": {"weights.preset": ["sft", "eaft"]}},
                "eval": {"path": "/e"},
                "train": {"val_share": 0.1},
            },
            True,
        ),  # fmt: skip
        (
            {
                "tune": {"enabled": True, "space": {"weights.tau": [1, 2]}},
                "eval": {"path": "/e"},
                "train": {"val_share": 0.1},
            },
            False,
        ),  # fmt: skip
    ],
)
def test_auto_stores_the_entropy_when_a_gate_may_read_it(over, stores):
    assert from_dict(over).stores_entropy() is stores


def test_a_gate_with_no_entropy_anywhere_fails_at_load():
    from raydc.config import ConfigError

    with pytest.raises(ConfigError, match=r"weights.gate=entropy_power: needs the student's"):
        from_dict({"weights": {"preset": "eaft"}, "score": {"entropy": "off"}})
