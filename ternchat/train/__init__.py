"""Training: the loop, schedules, checkpoints, metrics and the run report."""
