"""Layer 1, ops: one entry per op choosing its Triton kernel or its torch twin
(:mod:`~fma_fast.ops.dispatch`), scoring in torch class tiles, and per-row class tables."""
