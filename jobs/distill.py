"""The end-to-end raydc job: prepare -> score -> [select] -> train or tune -> eval.

    python jobs/distill.py                                   # the embedded tiny example
    python jobs/distill.py --config my.yaml train.lr=3e-4    # your config + overrides
    ray job submit --working-dir . -- python jobs/distill.py --config my.yaml

Each stage writes under run.output_dir/<stage>/ with a fingerprint of its inputs, so a
rerun reuses what is done and a failed job resumes at the stage that failed. Inside
`ray job submit` (RAY_ADDRESS set) or with --address / run.ray_address it runs on that
cluster; otherwise it starts a local Ray.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's raydc

from raydc.cli import add_config_args, execute  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The whole job; returns the exit status (0 done, 2 config error, 1 a stage failed),
    with the one error path of the ``raydc`` command (raydc.cli.execute)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    return execute("run", parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
