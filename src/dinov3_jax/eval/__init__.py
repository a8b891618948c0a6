"""Evaluation of frozen backbones: k-NN, linear probe and logistic regression on global features
(RECIPE.md §8), a linear segmentation probe on patch features, and pictures of the features."""
