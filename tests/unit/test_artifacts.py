"""The stage-folder contract: the one hashing rule and the common head of a stage summary."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc.infra.artifacts import (
    HISTORY,
    LOCK,
    PARTS_DIR,
    REJECTS_FILE,
    TOKENIZER_FILES,
    LinkRefused,
    StageError,
    append_history,
    fingerprint_paths,
    lock_output_dir,
    release_output_dir,
    summarize_parts,
    tokenizer_fingerprint,
    write_parts,
    write_private,
)


def test_fingerprint_paths_hashes_several_files_and_only_named_ones(tmp_path):
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    a.write_bytes(b"first")
    b.write_bytes(b"second")
    both = fingerprint_paths(str(a), str(b))
    assert both == fingerprint_paths(a, b) and both != fingerprint_paths(a)
    assert fingerprint_paths(b, a) != both  # the order is part of the identity
    b.write_bytes(b"Second")  # same size, other bytes: small files are hashed whole
    assert fingerprint_paths(a, b) != both
    assert fingerprint_paths(None, "") is None

    tok = tmp_path / "model"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "model.safetensors").write_bytes(b"weights")
    fp = tokenizer_fingerprint(tok)
    assert fp == fingerprint_paths(tok, names=TOKENIZER_FILES)
    (tok / "model.safetensors").write_bytes(b"other weights")
    assert tokenizer_fingerprint(tok) == fp  # the weights are not the tokenizer
    assert fingerprint_paths(tok) != fingerprint_paths(tok, names=TOKENIZER_FILES)
    # a folder with no tokenizer files hashes its name, like a hub name
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tokenizer_fingerprint(empty) != tokenizer_fingerprint(tmp_path / "empty2")


def test_summarize_parts_gives_the_summary_head_and_refuses_lost_rows(tmp_path):
    out = tmp_path / "stage"
    (out / PARTS_DIR).mkdir(parents=True)
    pq.write_table(pa.table({"x": [1, 2]}), out / "part-0.parquet")
    rejects = [{"row_id": "r3", "field": "text", "reason": "too_long: 9 tokens"}]
    write_parts(str(out / PARTS_DIR), "k0", "prepare", rejects, {"rows_in": 3, "tokens": 7})
    head, totals = summarize_parts(out, "prepare", error=ValueError)
    assert head == {
        "stage": "prepare",
        "rows_in": 3,
        "rows_out": 2,
        "rows_rejected": 1,
        "reasons": {"too_long": 1},
    }
    assert totals["tokens"] == 7 and (out / REJECTS_FILE).exists()

    (out / PARTS_DIR).mkdir()
    write_parts(str(out / PARTS_DIR), "k0", "prepare", [], {"rows_in": 5})
    with pytest.raises(ValueError, match="prepare lost rows: 5 in != 2 out \\+ 0 rejected"):
        summarize_parts(out, "prepare", error=ValueError)


# ----------------------------------------------------------------------------- no links

PRECIOUS = b"a file of the user's, not raydc's\n"


def _planted(tmp_path, name: str):
    """``<tmp>/run/<name>`` as a symbolic link to a file of the user's; both paths."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    victim = tmp_path / f"victim-{name.strip('.')}"
    victim.write_bytes(PRECIOUS)
    (run / name).symlink_to(victim)
    return run, victim


def _refusal(path, victim) -> str:
    return (
        f"{path} is a symbolic link (to {victim}): raydc writes this file itself and does not "
        "follow a link there (it would overwrite the link's target); remove the link"
    )


def test_a_symlink_planted_as_the_lock_is_refused_and_its_target_untouched(tmp_path, capsys):
    from raydc.cli import main

    run, victim = _planted(tmp_path, LOCK)
    with pytest.raises(LinkRefused) as e:
        lock_output_dir(run)
    assert str(e.value) == _refusal(run / LOCK, victim)
    assert isinstance(e.value, StageError) and isinstance(e.value, OSError)
    assert victim.read_bytes() == PRECIOUS
    # The command stops on it with one line and exit 1, before it checks the config (the
    # model below does not exist): the target used to be truncated even then.
    capsys.readouterr()
    assert main(["prepare", f"run.output_dir={run}", "score.student=/no/such/model"]) == 1
    assert capsys.readouterr().err == f"raydc: {_refusal(run / LOCK, victim)}\n"
    assert victim.read_bytes() == PRECIOUS and (run / LOCK).is_symlink()
    # A real lock file works as before.
    (run / LOCK).unlink()
    lock_output_dir(run)
    assert (run / LOCK).read_text().startswith(f"pid {os.getpid()} on ")
    release_output_dir(run)


def test_a_symlink_planted_as_the_history_is_refused_and_its_target_untouched(tmp_path):
    run, victim = _planted(tmp_path, HISTORY)
    record = {"stage": "prepare", "fingerprint": "f0", "seconds": 1.5, "finished": 2.0}
    with pytest.raises(LinkRefused) as e:
        append_history(run, record)
    assert str(e.value) == _refusal(run / HISTORY, victim)
    assert victim.read_bytes() == PRECIOUS
    (run / HISTORY).unlink()
    append_history(run, record)
    append_history(run, {**record, "stage": "score"})
    assert (run / HISTORY).read_text() == (
        '{"stage": "prepare", "fingerprint": "f0", "seconds": 1.5, "finished": 2.0}\n'
        '{"stage": "score", "fingerprint": "f0", "seconds": 1.5, "finished": 2.0}\n'
    )


def test_write_private_writes_a_file_and_never_through_a_link(tmp_path):
    run, victim = _planted(tmp_path, ".train.pending.json")
    with pytest.raises(LinkRefused) as e:
        write_private(run / ".train.pending.json", '{"fingerprint": "f1"}')
    assert str(e.value) == _refusal(run / ".train.pending.json", victim)
    assert victim.read_bytes() == PRECIOUS
    # A dangling link is refused too: its target is not created.
    (run / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(LinkRefused):
        write_private(run / "dangling", "x")
    assert not (tmp_path / "nowhere").exists()
    # A plain file is written whole, replacing what was there.
    write_private(run / "plain.json", "a longer first text")
    write_private(run / "plain.json", "second")
    assert (run / "plain.json").read_text() == "second"
