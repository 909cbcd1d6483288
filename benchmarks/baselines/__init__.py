"""What the benchmarks measure fma_fast against: the released loop's structure and the GEMM-only
chain of the folded solve."""
