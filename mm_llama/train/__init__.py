"""The training engine and its parts: schedules, trainable selection, checkpoints, metrics."""
