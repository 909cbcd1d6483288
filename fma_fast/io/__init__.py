"""Layer 1, files: atomic writes and JSON reading, model checkpoints, feature files and the
row sources that batch scoring reads a chunk at a time."""
