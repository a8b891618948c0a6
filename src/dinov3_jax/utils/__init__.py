"""Small utilities shared by the trainer and the evaluators."""
