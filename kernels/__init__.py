"""Triton kernels of fma_fast, installed as ``fma_fast.kernels``."""
