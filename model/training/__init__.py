"""The training companion: data, augmentation, schedules, the training loop, evaluation and IoU."""
