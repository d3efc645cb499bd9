"""Training: the typed configuration, datasets, and (later) the training loop."""
