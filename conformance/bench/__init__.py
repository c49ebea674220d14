"""Throughput and memory benchmarks of the reference, PEFT and bare bitsandbytes layers.

Entry point: ``python -m conformance.bench [--device cuda] [--quick] [--out DIR] [--compare OLD.json]``.
Modules: ``cases`` (the matrix), ``timing`` (CUDA events / synchronising perf_counter), ``roofline``
(measured and peak floors), ``memory`` (bytes per parameter, peak memory), ``layers`` (what is timed),
``runner`` (walks the matrix), ``compare`` (noise-aware regression compare), ``plot`` (PNG),
``report`` (tables and speed targets). The pytest-benchmark suite is ``suites/bench``.
"""

from conformance.core.vocabulary import Method

#: Methods the matrix can time, in its priority order (``cases.matrix``; one per ``Method``).
METHODS: tuple[str, ...] = (Method.LORA.value, Method.OFT.value, Method.DORA.value)
#: What a run times unless ``--methods`` says otherwise: the matrix of the stored baselines (``baselines/bench``;
#: ``suites/test_bench_compare.py`` keeps the GPU matrix key for key the stored one). DoRA is timed on request
#: (``--methods dora``) until a baseline with its rows is stored.
DEFAULT_METHODS: tuple[str, ...] = (Method.LORA.value, Method.OFT.value)


def parse_methods(value: str) -> tuple[str, ...]:
    """The methods of a ``--methods`` value (``lora,dora``), in the matrix's order; ValueError naming the valid set."""
    got = [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in got if m not in METHODS]
    if unknown or not got:
        raise ValueError(f"--methods {value!r}: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(METHODS)}, comma-separated (e.g. --methods dora)")
    return tuple(m for m in METHODS if m in got)
