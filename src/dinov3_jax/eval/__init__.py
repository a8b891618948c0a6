"""Evaluation of frozen backbones: k-NN (RECIPE.md §8.1) and, later, linear and dense probes."""
