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
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's raydc

from raydc.cli import add_config_args, load  # noqa: E402
from raydc.pipeline import Pipeline, format_summary, summarize  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_args(parser)
    cfg = load(parser.parse_args(argv))  # validated; errors name the field

    pipe = Pipeline(cfg)
    pipe.prepare()
    pipe.score()
    if pipe.cfg.select.enabled:
        pipe.select()
    pipe.model()  # train, or a Tune sweep when tune.enabled
    if pipe.cfg.eval.enabled:
        pipe.eval()

    summary = summarize(pipe.results, pipe.cfg)
    print(format_summary(summary), flush=True)
    out = Path(pipe.cfg.run.output_dir) / "summary.json"
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"summary: {out}")
    return summary


if __name__ == "__main__":
    main()
