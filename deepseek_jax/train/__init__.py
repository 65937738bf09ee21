"""Training: data pipeline, state, step, checkpoints and the run loop."""
