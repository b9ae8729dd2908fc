"""A config file is plain YAML data: a tag that would build a Python object is refused with
one line naming the file, line and tag, and nothing in the file runs."""

from __future__ import annotations

import pytest

from raydc.config import ConfigError, load_config


def test_a_python_object_tag_is_refused_naming_the_file_and_nothing_runs(tmp_path, capsys):
    from raydc.cli import main

    marker = tmp_path / "ran"
    config = tmp_path / "job.yaml"
    config.write_text(
        "run:\n"
        f"  output_dir: !!python/object/apply:os.system ['touch {marker}']\n"
        "train:\n"
        "  lr: 3.0e-4\n"
    )
    message = (
        f"{config}, line 2, column 15: the YAML tag !!python/object/apply:os.system is not "
        "allowed: a config is plain data (mappings, lists, strings, numbers) and nothing in "
        "it was executed"
    )
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert str(e.value) == message
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no YAML traceback
    # The command: one line, exit 2 (a config error), and the command never ran.
    assert main(["config", "--config", str(config)]) == 2
    assert capsys.readouterr().err == f"raydc: config error: {message}\n"
    assert not marker.exists()


def test_other_tags_and_broken_yaml_name_the_place(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("train:\n  lr: !mine 3\n")
    with pytest.raises(ConfigError, match=r"line 2, column 7: the YAML tag !mine is not allowed"):
        load_config(config)
    config.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert str(e.value).startswith(f"{config}, line 2, column 1: not valid YAML (")
    # The standard tags of plain data still load.
    config.write_text("train:\n  lr: !!float 3e-4\n")
    assert load_config(config).train.lr == 3e-4
