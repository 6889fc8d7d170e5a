"""Evaluation harnesses: they compose the stages as the service does, so they live above them."""
