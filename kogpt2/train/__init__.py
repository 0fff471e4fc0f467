"""The training loop and its parts: optimizer and schedule, batch losses, safe stops, torchrun, the metrics log."""
