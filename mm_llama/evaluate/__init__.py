"""Evaluation: held-out text metrics (and, as they land, image, video, speech and preference metrics)."""
