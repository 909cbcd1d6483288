"""Layer 4, batch scoring: ``score``, resumable top-k outputs for test sets of any size."""
