"""dinotron.train: DINOv2 meta-architecture, schedules, training loop, checkpoints, evaluation and CLI."""
