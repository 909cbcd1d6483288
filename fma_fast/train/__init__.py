"""Layer 3, training: ``fit``, the flow-matching training loop of the velocity network."""
