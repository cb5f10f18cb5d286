"""Training: the loop, checkpoints, logging, distributed helpers and the tasks."""
