"""Evaluations of the paper: top-down zero-shot segmentation, bottom-up grouping, unsupervised
segmentation, zero-shot classification and Waterbirds, with clu metrics, overlays and reports; run them
with `python -m clippy_jax.evaluate` (README.md in this folder)."""
