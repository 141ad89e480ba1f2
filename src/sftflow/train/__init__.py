"""The training library the stage recipes use: trainers, checkpoints, shared steps, loss, attention, perf, plots."""
