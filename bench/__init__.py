"""Benchmarks: speed and memory scripts, the quality benchmark (``bench.quality``) and
their shared /proc load sampler (``bench.machine``). Not part of the wheel."""
