"""Training: loss, optimiser, sharding, train step, checkpoints and the train loop."""
