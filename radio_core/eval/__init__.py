"""Evaluation of distilled students: fidelity to teachers, kNN, zero-shot, linear-probe
segmentation, the resolution sweep, and pictures. ``python -m radio_core.eval --help``."""
