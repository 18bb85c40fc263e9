"""Evaluations: zero-shot segmentation and classification, with metrics, overlays and reports."""
