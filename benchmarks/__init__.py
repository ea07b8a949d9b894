"""Benchmarks of one unrolled generator gradient: unroll vs higher vs torchopt vs a first-order loop."""
