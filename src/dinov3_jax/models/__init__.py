"""DINOv3 backbones in Flax NNX."""
