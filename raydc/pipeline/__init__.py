"""The orchestration: the stage table, running a stage (fingerprint, reuse, lock, marker),
run_all / run_until, the roles resolved once (``resolve``), the run summary (``summary``)
and the DASD training phases (``phases``: phase k+1 from phase k)."""

from __future__ import annotations

from raydc.pipeline.runner import CONFIG_DIR, DEFAULT_CONFIG, LOG, Pipeline

__all__ = ["CONFIG_DIR", "DEFAULT_CONFIG", "LOG", "Pipeline"]
