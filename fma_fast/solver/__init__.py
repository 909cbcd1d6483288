"""Layer 2, the solve: the public functions (:mod:`~fma_fast.solver.api`), the route of a call,
the folded plan, and the runtimes that execute it (CPU GEMM chain, compiled steps, fused
Triton kernels), plus solving over torchrun ranks."""
