"""staple's benchmarks: ``python -m bench [--quick]``. Ratios and per-call costs, not tests."""
