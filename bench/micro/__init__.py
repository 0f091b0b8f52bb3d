"""pytest-benchmark micro-benchmarks (``make bench-micro``); not part of the default ``make test``."""
