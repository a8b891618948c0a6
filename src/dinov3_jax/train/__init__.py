"""DINOv3 pretraining: schedules, optimizer, train step and the trainer (RECIPE.md §5)."""
