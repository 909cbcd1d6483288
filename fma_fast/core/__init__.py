"""Layer 0, the core: the project's policies, argument checks, the velocity network, the
pure-PyTorch reference of every op, the few-shot protocol, the torchrun context and the
machine description. Imports nothing else of fma_fast."""
