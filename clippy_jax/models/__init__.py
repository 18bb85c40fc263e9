"""Flax modules: the ViT image tower, the T5 text tower, pooling heads and the two-tower model."""
