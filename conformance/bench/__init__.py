"""Throughput and memory benchmarks of the reference, PEFT and bare bitsandbytes layers.

Entry point: ``python -m conformance.bench [--device cuda] [--quick] [--out DIR] [--compare OLD.json]``.
Modules: ``cases`` (the matrix), ``timing`` (CUDA events / synchronising perf_counter), ``roofline``
(measured and peak floors), ``memory`` (bytes per parameter, peak memory), ``layers`` (what is timed),
``runner`` (walks the matrix), ``compare`` (noise-aware regression compare), ``plot`` (PNG),
``report`` (tables and speed targets). The pytest-benchmark suite is ``suites/bench``.
"""
