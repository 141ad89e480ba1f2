"""Training workflows (one per stage), the Trainer subclass, metrics and plots."""
