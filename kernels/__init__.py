"""Triton kernels of fma_fast, installed as ``fma_fast.kernels``; reached through
:mod:`fma_fast.ops.dispatch`.

One op per module (kernel, launcher, autograd Function): flow_matching (fused training pair,
loss and in-kernel noise), euler (fused Euler step), cosine_topk (scoring with a running top-k),
step_ensemble (released step ensemble, top-k), cosine_cross_entropy, folded_step (the folded
solver step). _common holds the availability checks, the block-size helper and shared jit
helpers; the tests' support is tests/kernel_support.py.
"""
