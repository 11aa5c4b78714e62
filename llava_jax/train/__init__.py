"""Training: optimizer, train step, checkpoints, metrics and the trainer loop."""
